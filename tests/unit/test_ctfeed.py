"""The conntrack feed's C decoder (csrc/ctfeed.c) against the Python reference decoder
(conntrack._parse / _events_of): synthesized messages of every shape pyflow reads,
messages the kernel sent (recorded in tests/unit/data/ctnetlink.hex), and every
truncation and byte flip of them; the result record's counters; the batch primitive's
bookkeeping with a fake socket pair."""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import pytest

from pyflow.control import conntrack as ct
from pyflow.control import ctfeed
from pyflow.control.model import Conn, EventType, Tuple
from pyflow.netlink import uapi, wire

DATA = Path(__file__).parent / "data" / "ctnetlink.hex"

T4 = Tuple("198.18.1.2", "198.18.2.2", 40000, 80)
R4 = Tuple("198.18.2.2", "198.18.9.1", 80, 61000)
T6 = Tuple("2001:2::1", "2001:2:0:1::2", 50000, 443)
R6 = Tuple("2001:2:0:1::2", "2001:2::1", 443, 50000)
NEW_FLAGS = uapi.NLM_F_CREATE | uapi.NLM_F_EXCL


def tup(atype: int, family: int, proto: int, t: Tuple, zone: int | None = None) -> bytes:
    raw = ct._tuple_attr(atype, Conn(family, proto, t, t))
    if zone is None:
        return raw
    # the tuple's own zone (original direction only) goes inside the nest
    inner = raw[4:] + wire.nla(uapi.CTA_TUPLE_ZONE, struct.pack(">H", zone))
    return wire.nest(atype, inner)


def entry(family: int = socket.AF_INET, proto: int = 6, *, orig: Tuple = T4, reply: Tuple = R4,
          status: int | None = 0x19E, mark: int | None = 0x100, timeout: int | None = 300,
          ct_id: int | None = 77, tcp_state: int | None = 3, zone: int | None = None,
          tuple_zone: int | None = None, helper: bytes | None = None) -> bytes:
    """A ctnetlink entry's attributes in the order the kernel writes them."""
    out = (tup(uapi.CTA_TUPLE_ORIG, family, proto, orig, tuple_zone)
           + tup(uapi.CTA_TUPLE_REPLY, family, proto, reply))
    if status is not None:
        out += wire.nla(uapi.CTA_STATUS, struct.pack(">I", status))
    if timeout is not None:
        out += wire.nla(uapi.CTA_TIMEOUT, struct.pack(">I", timeout))
    if mark is not None:
        out += wire.nla(uapi.CTA_MARK, struct.pack(">I", mark))
    if tcp_state is not None:
        state = wire.nla(uapi.CTA_PROTOINFO_TCP_STATE, bytes([tcp_state]))
        out += wire.nest(uapi.CTA_PROTOINFO, wire.nest(uapi.CTA_PROTOINFO_TCP, state))
    if helper is not None:
        out += wire.nest(uapi.CTA_HELP, wire.nla(uapi.CTA_HELP_NAME, helper))
    if ct_id is not None:
        out += wire.nla(uapi.CTA_ID, struct.pack(">I", ct_id))
    if zone is not None:
        out += wire.nla(uapi.CTA_ZONE, struct.pack(">H", zone))
    return out


def msg(payload: bytes, *, family: int = socket.AF_INET, mtype: int = ct._MSG_NEW, flags: int = 0,
        seq: int = 0, pid: int = 0) -> bytes:
    return wire.request(mtype, flags, seq, ct._nfgen(family) + payload, pid)


def c_events(buf: bytes, skip: int = 0) -> list:
    feed = ctfeed.Feed(max(len(buf), 1))
    got, _res = feed.decode(buf, len(buf), ctfeed.EVENTS, 0, skip)
    return got


def c_dump(buf: bytes, seq: int) -> tuple[list, object]:
    feed = ctfeed.Feed(max(len(buf), 1))
    return feed.decode(buf, len(buf), ctfeed.DUMP, seq)


def py_dump(buf: bytes, seq: int) -> tuple[list, int, int]:
    """(conns, done, errno) as CtNetlink.dump read a datagram before the decoder moved to C."""
    conns = []
    for mtype, _f, mseq, _pid, off, length in wire.messages(buf, len(buf)):
        if mseq != seq:
            continue
        if mtype == uapi.NLMSG_DONE:
            return conns, 1, 0
        if mtype == uapi.NLMSG_ERROR:
            err = wire.errno_of(buf, off, length)
            if err:
                return conns, 0, err
            continue
        if mtype == ct._MSG_NEW:
            c = ct._parse(buf, off, length)
            if c is not None:
                conns.append(c)
    return conns, 0, 0


SHAPES = [
    entry(),
    entry(socket.AF_INET, 17, tcp_state=None, mark=None, ct_id=None),
    entry(socket.AF_INET6, 6, orig=T6, reply=R6, zone=7),
    entry(socket.AF_INET6, 17, orig=T6, reply=R6, tcp_state=None, tuple_zone=3, timeout=None),
    entry(zone=0, tuple_zone=9),  # CTA_ZONE present (0) wins over the tuple's zone
    entry(helper=b"ftp\0"),
    entry(helper=b"\0"),  # a helper without a name reads as none
    entry(helper=b"sip-5060\xff"),  # not NUL-terminated, not ASCII
    entry(status=None, mark=None, timeout=None, ct_id=None, tcp_state=None),
    entry(socket.AF_INET, 132, tcp_state=None),  # SCTP: ignored
    entry(),  # sent as IPv6 (families()): IPv4-sized addresses in an IPv6 message, malformed
]


def families(i: int) -> int:
    return socket.AF_INET6 if i in (2, 3, 10) else socket.AF_INET


def test_every_shape_decodes_as_the_reference_does() -> None:
    for i, payload in enumerate(SHAPES):
        for mtype, flags in ((ct._MSG_NEW, NEW_FLAGS), (ct._MSG_NEW, 0), (ct._MSG_DELETE, 0)):
            m = msg(payload, family=families(i), mtype=mtype, flags=flags)
            assert c_events(m) == ct._events_of(m, len(m)), (i, mtype, flags)
    whole = entry(helper=b"ftp\0", zone=5)
    m = msg(whole, flags=NEW_FLAGS)
    (ev,) = c_events(m)
    assert ev.type == EventType.NEW
    assert ev.conn == Conn(socket.AF_INET, 6, T4, R4, status=0x19E, tcp_state=3, mark=0x100, zone=5,
                           helper="ftp", timeout=300, ct_id=77)


def test_a_datagram_of_many_messages_sorts_events_and_skips_echoes_and_other_types() -> None:
    parts = [msg(SHAPES[0], flags=NEW_FLAGS, pid=0), msg(SHAPES[1], pid=4242),  # an echo
             msg(SHAPES[2], family=socket.AF_INET6), msg(SHAPES[0], mtype=ct._MSG_DELETE),
             msg(SHAPES[0], mtype=ct._MSG_GET), msg(SHAPES[9]), msg(SHAPES[10], family=socket.AF_INET6),
             msg(b"", family=socket.AF_UNSPEC)]
    buf = b"".join(parts)
    feed = ctfeed.Feed(len(buf))
    got, res = feed.decode(buf, len(buf), ctfeed.EVENTS, 0, 4242)
    assert got == ct._events_of(buf, len(buf), 4242)
    assert [e.type for e in got] == [EventType.NEW, EventType.UPDATE, EventType.DESTROY]
    assert (res.messages, res.echoes, res.ignored, res.malformed) == (8, 1, 3, 1)
    assert (feed.echoes, feed.ignored, feed.malformed) == (1, 3, 1)
    # without a port id to skip, the echo is an event like any other
    assert len(c_events(buf)) == 4


def test_dump_mode_keeps_its_sequence_and_stops_at_done_or_error() -> None:
    seq = 0xFFFF_FF01
    parts = [msg(SHAPES[0], seq=seq), msg(SHAPES[1], seq=seq - 1),  # a late answer to another request
             msg(SHAPES[2], family=socket.AF_INET6, seq=seq)]
    done = wire.request(uapi.NLMSG_DONE, 0, seq, b"\0\0\0\0")
    buf = b"".join(parts) + done + msg(SHAPES[0], seq=seq)  # nothing after DONE counts
    got, res = c_dump(buf, seq)
    assert (got, res.done, res.err) == py_dump(buf, seq)
    assert len(got) == 2 and res.done == 1
    refused = b"".join(parts[:1]) + wire.request(uapi.NLMSG_ERROR, 0, seq, struct.pack("=i", -1) + bytes(16))
    got, res = c_dump(refused, seq)
    assert (got, res.done, res.err) == py_dump(refused, seq) and res.err == 1
    short = wire.request(uapi.NLMSG_ERROR, 0, seq, b"\1")
    assert c_dump(short, seq)[1].err == 74  # EBADMSG: too short to hold an errno, never success


def _recorded() -> list[tuple[str, bytes]]:
    out = []
    for line in DATA.read_text().splitlines():
        if line and not line.startswith("#"):
            kind, hexdata = line.split(None, 1)
            out.append((kind, bytes.fromhex(hexdata)))
    return out


def test_recorded_kernel_messages_decode_as_the_reference_does() -> None:
    recorded = _recorded()
    assert {k for k, _ in recorded} == {"event", "dump"} and len(recorded) >= 10
    seen = 0
    for kind, buf in recorded:
        if kind == "event":
            got = c_events(buf)
            assert got == ct._events_of(buf, len(buf)) and got
        else:
            seq = struct.unpack_from("=I", buf, 8)[0]
            got, res = c_dump(buf, seq)
            assert (got, res.done, res.err) == py_dump(buf, seq)
        seen += len(got)
    assert seen >= 10


def _mutations(buf: bytes, rng: random.Random, flips: int) -> list[bytes]:
    out = [buf[:cut] for cut in range(len(buf))]
    for pos in range(len(buf)):
        b = bytearray(buf)
        b[pos] ^= 0xFF
        out.append(bytes(b))
    for _ in range(flips):
        b = bytearray(buf)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("which", ["synthesized", "recorded"])
def test_truncated_and_corrupted_input_never_crashes_and_matches_the_reference(which: str) -> None:
    rng = random.Random(17)
    if which == "synthesized":
        bases = [msg(p, family=families(i), flags=NEW_FLAGS) for i, p in enumerate(SHAPES[:6])]
        bases.append(b"".join(bases[:3]))
    else:
        bases = [buf for _k, buf in _recorded()][:6]
    feed = ctfeed.Feed(max(len(b) for b in bases))
    for base in bases:
        for m in _mutations(base, rng, 300):
            got, res = feed.decode(m, len(m), ctfeed.EVENTS)
            assert got == ct._events_of(m, len(m))
            assert res.n == len(got) and res.messages >= len(got)
            seq = struct.unpack_from("=I", m, 8)[0] if len(m) >= 12 else 0
            got, res = feed.decode(m, len(m), ctfeed.DUMP, seq)
            assert (got, res.done, res.err) == py_dump(m, seq)


def test_truncated_datagram_is_counted_malformed() -> None:
    m = msg(SHAPES[0], flags=NEW_FLAGS)
    feed = ctfeed.Feed(len(m))
    got, res = feed.decode(m, len(m) - 1, ctfeed.EVENTS)
    assert got == [] and res.malformed == 1 and res.messages == 0
    got, res = feed.decode(m[:20] + bytes(4), 24, ctfeed.EVENTS)  # a header claiming more than is there
    assert got == [] and res.malformed == 1


def test_decode_refuses_a_length_past_the_buffer() -> None:
    feed = ctfeed.Feed(4096)
    with pytest.raises(ValueError, match="bytes asked"):
        feed.decode(b"\0" * 10, 11)
    with pytest.raises(ValueError, match="room for"):
        feed.decode(bytes(1 << 20), 1 << 20)


def test_entry_layout_matches_the_compiler() -> None:
    from pyflow._native import ffi

    assert ctfeed.ENTRY.size == ffi.sizeof("struct pyflow_ct_entry")
    assert ffi.offsetof("struct pyflow_ct_entry", "orig_src") == 32
    assert ffi.offsetof("struct pyflow_ct_entry", "helper") == 96


def test_addresses_and_ports_are_shared_objects() -> None:
    a = msg(entry(orig=T4), flags=NEW_FLAGS)
    b = msg(entry(orig=Tuple(T4.src, T4.dst, 40001, 80)), flags=NEW_FLAGS)
    (ea,) = c_events(a)
    (eb,) = c_events(b)
    assert ea.conn.orig.src is eb.conn.orig.src and ea.conn.reply.sport is eb.conn.reply.sport


def _tuple_nested(atype: int, conn: Conn) -> bytes:
    """A tuple attribute built attribute by attribute, as the kernel's own nla_put calls lay it."""
    src_attr, dst_attr, _ = ct._ADDR[conn.family]
    t = conn.orig
    return wire.nest(
        atype,
        wire.nest(uapi.CTA_TUPLE_IP, wire.nla(src_attr, socket.inet_pton(conn.family, t.src)),
                  wire.nla(dst_attr, socket.inet_pton(conn.family, t.dst))),
        wire.nest(uapi.CTA_TUPLE_PROTO, wire.nla(uapi.CTA_PROTO_NUM, bytes([conn.proto])),
                  wire.nla(uapi.CTA_PROTO_SRC_PORT, struct.pack(">H", t.sport)),
                  wire.nla(uapi.CTA_PROTO_DST_PORT, struct.pack(">H", t.dport))))


EDGES = Tuple("0.0.0.0", "255.255.255.255", 0, 65535)


@pytest.mark.parametrize("conn", [Conn(socket.AF_INET, 6, T4, R4), Conn(socket.AF_INET6, 17, T6, R6),
                                  Conn(socket.AF_INET, 17, EDGES, R4)])
def test_packed_tuple_is_the_attribute_by_attribute_one(conn: Conn) -> None:
    for atype in (uapi.CTA_TUPLE_ORIG, uapi.CTA_TUPLE_REPLY):
        assert ct._tuple_attr(atype, conn) == _tuple_nested(atype, conn)
        assert ct._tuple_attr(atype, conn) == _tuple_nested(atype, conn)  # from the cache too


@pytest.mark.parametrize("bad", [Conn(socket.AF_INET, 6, Tuple("2001:2::1", "198.18.0.1", 1, 2), R4),
                                 Conn(socket.AF_INET6, 6, T4, R4),
                                 Conn(socket.AF_INET, 6, Tuple("198.18.0.1", "198.18.0.2", 70000, 2), R4),
                                 Conn(socket.AF_INET, 300, T4, R4), Conn(socket.AF_UNSPEC, 6, T4, R4)])
def test_a_tuple_that_cannot_be_encoded_is_a_clear_error(bad: Conn) -> None:
    with pytest.raises(ct.ConntrackError, match="cannot encode its tuple"):
        ct._tuple_attr(uapi.CTA_TUPLE_ORIG, bad)


def test_receive_loop_stops_at_its_bounds_and_says_more_is_queued() -> None:
    """pyflow_ct_recv over a datagram socket pair standing in for the netlink socket: every
    queued datagram decoded in one call, up to max_datagrams and to what the entry array can
    take, then EAGAIN ends it quietly."""
    import errno

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        b.setblocking(False)
        sent = [msg(entry(orig=Tuple(T4.src, T4.dst, 40000 + i, 80)), flags=NEW_FLAGS) for i in range(5)]
        for d in sent:
            a.send(d)
        feed = ctfeed.Feed(1 << 12)
        buf = bytearray(1 << 12)
        got, res, ret = feed.recv(b.fileno(), buf, 3, ctfeed.EVENTS)
        assert ret == 0 and res.datagrams == 3 and res.more == 1
        assert [e.conn.orig.sport for e in got] == [40000, 40001, 40002]
        got, res, ret = feed.recv(b.fileno(), buf, 10, ctfeed.EVENTS)
        assert ret == 0 and res.datagrams == 2 and res.more == 0 and len(got) == 2
        got, res, ret = feed.recv(b.fileno(), buf, 10, ctfeed.EVENTS)
        assert (got, ret, res.datagrams, res.more) == ([], 0, 0, 0)  # nothing queued: EAGAIN

        # an array with room for one datagram's worth stops after it, the rest stays queued
        small = ctfeed.Feed(240, room=1)
        for d in sent[:2]:
            a.send(d)
        got, res, ret = small.recv(b.fileno(), bytearray(240), 10, ctfeed.EVENTS)
        assert ret == 0 and len(got) == 1 and res.more == 1
        got, res, ret = small.recv(b.fileno(), bytearray(240), 10, ctfeed.EVENTS)
        assert ret == 0 and len(got) == 1

        # a datagram larger than the buffer is an error, never a silently cut message
        a.send(b"".join(sent))
        got, res, ret = feed.recv(b.fileno(), bytearray(256), 10, ctfeed.EVENTS)
        assert ret == -errno.EMSGSIZE and res.err == errno.EMSGSIZE and got == []

        # drain: what is queued is read and counted, not decoded
        for d in sent:
            a.send(d)
        assert ctfeed.drain(b.fileno(), buf) == (5, 0, 0)
    finally:
        a.close()
        b.close()
