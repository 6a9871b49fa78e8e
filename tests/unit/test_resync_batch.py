"""The resync's batched bookkeeping against the per-connection path it replaces: the engine's
decisions over a dump (Engine._consider_all), the records of a batch written together
(Slots.take_many, PathGroups.add_many), the conntrack change requests packed in one go
(conntrack._change_request) and the Conns the C feed's entries become (ctfeed.Feed.build)."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from pyflow._native import ffi
from pyflow.control import conntrack as ct
from pyflow.control.engine import BATCH, Engine, EngineConfig
from pyflow.control.keepalive import Slots
from pyflow.control.model import (
    IPS_DYING,
    IPS_SEEN_REPLY,
    Conn,
    CtEvent,
    EventType,
    NoPath,
    NotYet,
    Offloaded,
    Tuple,
)
from pyflow.control.pathgroups import PathGroups
from pyflow.datapath.abi import KEY_SIZE
from pyflow.netlink.uapi import NLM_F_ACK, NLM_F_REQUEST
from tests.support.fakes import LIVE, TCP, UDP, Clock, FakeConntrack, FakeDevices, FakeFlows, FakePaths

CONFIG = EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120, exclude_mark_mask=0x10)
WAITING, UNROUTED = "198.19.0.77", "198.19.0.66"  # servers whose path is NotYet, NoPath


class MixedPaths(FakePaths):
    def egress(self, family, src, dst, *, iif, mark):
        if dst == WAITING:
            raise NotYet()
        if dst == UNROUTED:
            raise NoPath("no_route")
        return super().egress(family, src, dst, iif=iif, mark=mark)


def conn(i: int, *, server: str = "", proto: int = TCP, status: int = LIVE, mark: int = 0) -> Conn:
    client = f"198.18.0.{10 + i % 7}"
    server = server or f"198.19.0.{50 + i % 5}"
    return Conn(socket.AF_INET, proto, Tuple(client, server, 20000 + i, 443),
                Tuple(server, "198.19.0.1", 443, 30000 + i), status=status,
                tcp_state=3 if proto == TCP else None, mark=mark)


def per_connection(eng: Engine) -> None:
    """The resync as it was: _consider for each connection of the dump."""
    def consider_all(live):
        for ident, c in live.items():
            eng._consider(c, ident, queue=True)

    eng._consider_all = consider_all  # type: ignore[method-assign]


def scene(reference: bool) -> tuple[Engine, FakeConntrack, FakeFlows]:
    ct_, flows = FakeConntrack(), FakeFlows()
    eng = Engine(ct_, MixedPaths(), flows, FakeDevices(), CONFIG, clock=Clock())
    if reference:
        per_connection(eng)
    # before the resync: some offloaded, one waiting for its neighbour, some waiting for
    # their path to come back
    early = [conn(i) for i in range(20)] + [conn(900, server=WAITING)]
    for c in early:
        ct_.table[c.ident] = c
    eng.handle([CtEvent(EventType.NEW, c) for c in early])
    for i in (700, 701):
        back = conn(i)
        eng.returning.add(back.ident, back, eng.clock())
    # the dump: more than a few batches that qualify, and every other case among them
    dump = [conn(i, proto=UDP if i % 3 else TCP) for i in range(1000, 1000 + 3 * BATCH + 17)]
    dump += [conn(i) for i in range(10)]  # offloaded, unchanged
    dump += [conn(i, status=LIVE | IPS_DYING) for i in range(10, 14)]  # offloaded, now dying
    dump += [conn(i, status=LIVE & ~IPS_SEEN_REPLY) for i in range(800, 805)]
    dump += [conn(i, mark=0x10) for i in range(805, 808)]
    dump += [conn(i, server=WAITING) for i in range(900, 904)]
    dump += [conn(i, server=UNROUTED) for i in range(910, 913)]
    dump += [conn(700), conn(701, status=LIVE | IPS_DYING)]
    ct_.table = {c.ident: c for c in dump}
    eng.resync()
    return eng, ct_, flows


def state(eng: Engine, ct_: FakeConntrack, flows: FakeFlows) -> dict:
    slots = eng.slots
    return {
        "offloaded": {i: (o.conn, o.path, o.since_ns, o.keys_raw, o.slot, o.key_bytes)
                      for i, o in eng.offloaded.items()},
        "owners": [None if o is None else o.conn.ident for o in slots.owner[:slots.top]],
        "slots": bytes(ffi.buffer(slots.conns, slots.top * ffi.sizeof("struct pyflow_ka_conn"))),
        "keys": bytes(ffi.buffer(slots.keys, slots.top * 2 * KEY_SIZE)),
        "free": list(slots.free), "touched": set(slots.touched), "cap": slots.cap,
        "groups": {k: (set(g.members), g.path) for k, g in eng.groups.groups.items()},
        "pending": dict(eng.pending), "returning": dict(eng.returning._deadline),
        "stats": dataclasses.asdict(eng.stats),
        "map": dict(flows.entries), "marked": set(ct_.marked), "timeouts": dict(ct_.timeout),
        "released": list(ct_.released),
    }


def test_a_resync_decides_records_and_counts_as_one_connection_at_a_time():
    got, want = state(*scene(reference=False)), state(*scene(reference=True))
    assert got == want
    # and the scene holds what it should: otherwise the equality above proves little
    assert len(got["offloaded"]) == 3 * BATCH + 17 + 10 + 1  # the batches, the unchanged, the one back
    assert got["stats"]["refused"] == {"no_reply_yet": 5, "excluded_by_mark": 3, "neighbour_pending": 4,
                                       "no_path": 3, "dying": 1}
    assert got["stats"]["removed"] == {"dying": 4, "gone_at_resync": 6}
    assert set(got["pending"]) == {conn(i, server=WAITING).ident for i in range(900, 904)}
    # one came back (and waits there until the next path change, which skips it), one let go
    assert set(got["returning"]) == {conn(700).ident}


def test_take_many_gives_the_slots_and_state_take_gives():
    def records(n, first):
        return [Offloaded(conn(first + i), (), 5, keys_raw=bytes([i % 251]) * (2 * KEY_SIZE))
                for i in range(n)]

    one, many = Slots(cap=4), Slots(cap=4)
    for s in (one, many):  # three free slots to hand out first, then growth past the cap
        early = records(6, 0)
        for off in early:
            s.take(off, last_seen_ns=1, deadline_ns=2)
        for off in early[1:4]:
            s.drop(off)
        s.touched.clear()
    a, b = records(11, 100), records(11, 100)
    for off in a:
        one.take(off, last_seen_ns=7, deadline_ns=9)
    many.take_many(b, last_seen_ns=7, deadline_ns=9)
    assert [o.slot for o in a] == [o.slot for o in b]
    assert (one.top, one.cap, one.free, one.touched) == (many.top, many.cap, many.free, many.touched)
    size = ffi.sizeof("struct pyflow_ka_conn")
    assert bytes(ffi.buffer(one.conns, one.cap * size)) == bytes(ffi.buffer(many.conns, many.cap * size))
    keys = 2 * KEY_SIZE
    assert bytes(ffi.buffer(one.keys, one.cap * keys)) == bytes(ffi.buffer(many.keys, many.cap * keys))
    assert [x is None for x in one.owner] == [x is None for x in many.owner]
    assert all(many.owner[o.slot] is o for o in b)
    assert many.activity(b[-1]) == (0, 7, 9)
    with pytest.raises(ValueError, match="bytes of keys"):
        many.take_many([Offloaded(conn(1), (), 5, keys_raw=b"short")], last_seen_ns=7, deadline_ns=9)


def test_add_many_groups_as_add_does():
    p, q = ("p",), ("q",)
    # two groups (by mark) with members of either path, one whose members all have p
    members = [(conn(70 * i).ident, Offloaded(conn(70 * i, mark=i % 2), p if i % 4 else q, 0))
               for i in range(40)]
    members += [(conn(70 * i + 1).ident, Offloaded(conn(70 * i + 1), p, 0)) for i in range(5)]
    one, many = PathGroups(), PathGroups()
    for ident, off in members:
        one.add(ident, off)
    many.add_many(members)
    assert {k: (g.members, g.path) for k, g in one.groups.items()} == \
        {k: (g.members, g.path) for k, g in many.groups.items()}
    assert any(g.path is None for g in many.groups.values()) and any(g.path for g in many.groups.values())


T6 = Tuple("2001:2::1", "2001:2::2", 5000, 443)


@pytest.mark.parametrize("c", [conn(1), conn(2, proto=UDP),
                               dataclasses.replace(conn(3), zone=7),
                               Conn(socket.AF_INET6, TCP, T6, Tuple(T6.dst, T6.src, 443, 5000), zone=65535)])
def test_a_change_request_is_the_bytes_of_the_general_path(c, monkeypatch):
    adapter = ct.CtNetlink.__new__(ct.CtNetlink)
    adapter.offload_mark = 0x100
    changes = [adapter._mark_change(c, True, 86400), adapter._mark_change(c, False, 30),
               adapter._mark_change(c, False, None), (b"", ct._MSG_GET)]
    for change, msg_type in changes:
        for seq in (1, 2, 0xFFFFFFFF, 0x01020304):
            want = ct._message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, ct._change_body(c, change))
            form = ct._change_form(c, change, msg_type)
            assert form is not None and form[0] == len(want)
            assert ct._change_request(form, c, change, msg_type, seq) == want
    # the addresses are cached now: the bytes above came from the one-pack path, not the general one
    monkeypatch.setattr(ct, "_change_body", lambda *a: pytest.fail("general path taken"))
    change, msg_type = changes[0]
    assert ct._change_request(ct._change_form(c, change, msg_type), c, change, msg_type, 9)[8:12] == \
        (9).to_bytes(4, "little" if socket.htons(1) != 1 else "big")


@pytest.mark.parametrize("bad", [Conn(socket.AF_INET, 6, Tuple("198.18.0.1", "198.18.0.2", 70000, 2),
                                      Tuple("198.18.0.2", "198.18.0.1", 2, 1)),
                                 Conn(socket.AF_INET, 300, Tuple("198.18.0.1", "198.18.0.2", 1, 2),
                                      Tuple("198.18.0.2", "198.18.0.1", 2, 1)),
                                 Conn(socket.AF_UNSPEC, 6, Tuple("198.18.0.1", "198.18.0.2", 1, 2),
                                      Tuple("198.18.0.2", "198.18.0.1", 2, 1))])
def test_a_request_that_cannot_be_encoded_is_the_same_clear_error(bad):
    ct._change_request(None, conn(1), b"", ct._MSG_GET, 1)  # its addresses cached
    with pytest.raises(ct.ConntrackError, match="cannot encode its tuple"):
        ct._change_request(ct._change_form(bad, b"", ct._MSG_GET), bad, b"", ct._MSG_GET, 1)


def test_the_feed_builds_real_frozen_conns():
    from tests.unit.test_ctfeed import NEW_FLAGS, T4, c_events, entry, msg

    (ev,) = c_events(msg(entry(orig=T4), flags=NEW_FLAGS))
    c = ev.conn
    assert type(c) is Conn and type(c.orig) is Tuple and type(c.reply) is Tuple
    twin = Conn(c.family, c.proto, Tuple(*dataclasses.astuple(c.orig)), Tuple(*dataclasses.astuple(c.reply)),
                c.status, c.tcp_state, c.mark, c.zone, c.helper, c.timeout, c.ct_id)
    assert c == twin and hash(c) == hash(twin) and c.ident == twin.ident and hash(c.orig) == hash(twin.orig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mark = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.orig.sport = 1  # type: ignore[misc]
