"""The conntrack adapter: ctnetlink through netlink sockets of our own.

The sockets are plain ``AF_NETLINK`` sockets, so that this module controls
what pyroute2 0.9.7's asyncio sockets hide: the receive buffer size, ENOBUFS
on event overruns, non-blocking reads and a file descriptor for select().
Both are created in the constructor, so they belong to the network namespace
of the thread that built the object and stay there even if that thread later
moves (setns(2) is per thread; a socket keeps the namespace it was made in).

Messages are coded here with ``struct``, using the attribute numbers of
pyroute2's ctnetlink message class (``nfct_msg``): pyroute2's generic
marshalling measured about 180 us to encode a refresh and 200 us to decode an
entry on this machine, which would make a dump of 100k entries take 20 s.

Two sockets, two jobs: the *event* socket only listens (NEW, UPDATE and
DESTROY groups, large receive buffer); the *request* socket sends dumps and
changes and reads their answers, which therefore never queue behind events
or get lost in an event overrun. A change we make (refresh, mark) makes the
kernel broadcast an UPDATE like any other; it carries the port id of the
socket that asked, so the event reader drops those echoes of our own work.

Not thread-safe: one thread owns a CtNetlink.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Iterator

from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
)
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IP_CT_TCP_FLAG_BE_LIBERAL,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    nfct_msg,
)

from pyflow.control.model import Conn, CtEvent, EventType, Tuple
from pyflow.errors import PyflowError

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module lacks it

_MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
_MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# multicast group n is bit n-1 of the bind() group mask
_EVENT_GROUPS = (
    (1 << (NFNLGRP_CONNTRACK_NEW - 1))
    | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1))
    | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
)

_NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_NLMSGERR = struct.Struct("=i")  # struct nlmsgerr starts with the (negative) errno
_NFGENMSG = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (unused: 0)
_NLA_HDR = struct.Struct("=HH")  # struct nlattr: len, type
_U16 = struct.Struct(">H")  # ctnetlink values are big-endian
_U32 = struct.Struct(">I")
_TCP_FLAGS = struct.Struct("=BB")  # struct nf_ct_tcp_flags: flags, mask
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF


def _numbers(cls: type) -> dict[str, int]:
    """Attribute name -> number, from a pyroute2 message class (numbers are positions)."""
    return {entry[0]: i for i, entry in enumerate(cls.nla_map)}  # type: ignore[attr-defined]


_CTA = _numbers(nfct_msg)
_TUPLE = _numbers(nfct_msg.cta_tuple)
_IP = _numbers(nfct_msg.cta_tuple.cta_ip)
_PROTO = _numbers(nfct_msg.cta_tuple.cta_proto)
_PROTOINFO = _numbers(nfct_msg.cta_protoinfo)
_TCP = _numbers(nfct_msg.cta_protoinfo.cta_protoinfo_tcp)
CTA_TUPLE_ORIG = _CTA["CTA_TUPLE_ORIG"]
CTA_TUPLE_REPLY = _CTA["CTA_TUPLE_REPLY"]
CTA_STATUS = _CTA["CTA_STATUS"]
CTA_PROTOINFO = _CTA["CTA_PROTOINFO"]
CTA_HELP = _CTA["CTA_HELP"]
CTA_TIMEOUT = _CTA["CTA_TIMEOUT"]
CTA_MARK = _CTA["CTA_MARK"]
CTA_ID = _CTA["CTA_ID"]
CTA_ZONE = _CTA["CTA_ZONE"]
CTA_MARK_MASK = _CTA["CTA_MARK_MASK"]
CTA_TUPLE_IP = _TUPLE["CTA_TUPLE_IP"]
CTA_TUPLE_PROTO = _TUPLE["CTA_TUPLE_PROTO"]
CTA_PROTO_NUM = _PROTO["CTA_PROTO_NUM"]
CTA_PROTO_SRC_PORT = _PROTO["CTA_PROTO_SRC_PORT"]
CTA_PROTO_DST_PORT = _PROTO["CTA_PROTO_DST_PORT"]
CTA_PROTOINFO_TCP = _PROTOINFO["CTA_PROTOINFO_TCP"]
CTA_PROTOINFO_TCP_STATE = _TCP["CTA_PROTOINFO_TCP_STATE"]
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = _TCP["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL"]
CTA_PROTOINFO_TCP_FLAGS_REPLY = _TCP["CTA_PROTOINFO_TCP_FLAGS_REPLY"]
CTA_HELP_NAME = 1  # enum ctattr_help; pyroute2 0.9.7 wrongly declares CTA_HELP a plain string
CTA_TUPLE_ZONE = 3  # enum ctattr_tuple; pyroute2 0.9.7 lacks it

_TRACKED = {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
# family -> (source attribute, destination attribute, address length)
_ADDR: dict[int, tuple[int, int, int]] = {
    socket.AF_INET: (_IP["CTA_IP_V4_SRC"], _IP["CTA_IP_V4_DST"], 4),
    socket.AF_INET6: (_IP["CTA_IP_V6_SRC"], _IP["CTA_IP_V6_DST"], 16),
}

DEFAULT_RCVBUF = 8 << 20
_RECV_SIZE = 1 << 16  # dump skbs are at most a few pages; events are one message each
_REQUEST_TIMEOUT = 2.0  # ctnetlink answers within sendmsg(); this only bounds a broken kernel


class ConntrackError(PyflowError):
    """A ctnetlink request failed in an unexpected way."""


def _describe(conn: Conn) -> str:
    proto = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(conn.proto, str(conn.proto))
    o = conn.orig
    return f"{proto} {o.src}:{o.sport} -> {o.dst}:{o.dport} zone {conn.zone}"


class CtNetlink:
    """ctnetlink adapter implementing :class:`pyflow.control.model.Conntrack`.

    ``rcvbuf`` sizes the event socket's receive buffer (SO_RCVBUFFORCE, so it
    may exceed net.core.rmem_max when we have CAP_NET_ADMIN). When the kernel
    cannot queue an event because the buffer is full, the socket overruns:
    the kernel drops that event and every later one until we have read the
    queue empty, and reports ENOBUFS once. ``lost_events`` counts those
    overrun *occurrences*; how many messages each one lost is unknowable,
    since the kernel keeps no count. After an overrun :meth:`poll` returns
    the events read before it followed by ``None``, the RESYNC marker: the
    caller must reconcile from :meth:`dump`. Events still queued behind the
    overrun are discarded unread (``discarded_events`` counts them), because
    they are older than that dump and replaying them after it would undo it
    (a stale NEW would resurrect a connection whose DESTROY was lost).

    ``offload_mark`` is the conntrack mark bit (or bits) that
    :meth:`mark_offloaded` sets and clears, so that ``conntrack -L`` shows
    which entries are offloaded; 0 leaves the mark alone.

    ``subscribe=False`` makes an adapter for dumps and changes only (no event
    socket: nothing to poll, nothing to overrun). ``batch`` bounds the
    messages one poll() reads, so an event storm cannot keep it busy forever.
    """

    def __init__(self, *, rcvbuf: int = DEFAULT_RCVBUF, offload_mark: int = 0,
                 subscribe: bool = True, batch: int = 8192) -> None:
        if not 0 <= offload_mark <= 0xFFFFFFFF:
            raise ValueError(f"offload_mark must fit 32 bits: {offload_mark:#x}")
        if rcvbuf <= 0 or batch <= 0:
            raise ValueError(f"rcvbuf and batch must be positive: {rcvbuf}, {batch}")
        self.lost_events = 0
        self.discarded_events = 0
        self.offload_mark = offload_mark
        self._batch = batch
        self._seq = itertools.count(int(time.monotonic()) & 0xFFFF)
        self._buf = bytearray(_RECV_SIZE)
        self._ev: socket.socket | None = None
        self._req: socket.socket | None = None
        try:
            self._req = _open(0)
            self._req_portid = self._req.getsockname()[0]
            if subscribe:
                self._ev = _open(_EVENT_GROUPS, rcvbuf)
        except OSError as e:
            self.close()
            raise ConntrackError(f"ctnetlink socket: {e.strerror or e}") from None

    # -- lifecycle -----------------------------------------------------

    def fileno(self) -> int:
        """The event socket's descriptor: readable when poll() has work."""
        return self._events().fileno()

    @property
    def rcvbuf(self) -> int:
        """The event socket's receive buffer as the kernel sized it (twice the asked size)."""
        return self._events().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def close(self) -> None:
        for s in (self._ev, self._req):
            if s is not None:
                s.close()
        self._ev = self._req = None

    def __enter__(self) -> CtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self) -> socket.socket:
        if self._ev is None:
            raise ConntrackError("ctnetlink adapter has no event socket (closed or subscribe=False)")
        return self._ev

    def _requests(self) -> socket.socket:
        if self._req is None:
            raise ConntrackError("ctnetlink adapter is closed")
        return self._req

    # -- dump ----------------------------------------------------------

    def dump(self) -> list[Conn]:
        """Every IPv4/IPv6 TCP and UDP entry of this namespace, all zones."""
        s = self._requests()
        seq = self._next_seq()
        # AF_UNSPEC: ctnetlink dumps every layer-3 family in one pass
        _send(s, _request(_MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, socket.AF_UNSPEC))
        conns: list[Conn] = []
        while True:
            n = self._recv_answer(s, "conntrack dump")
            for mtype, _flags, mseq, _pid, off, length in _messages(self._buf, n):
                if mseq != seq:
                    continue  # a late answer to an earlier request that timed out
                if mtype == NLMSG_DONE:
                    return conns
                if mtype == NLMSG_ERROR:
                    err = -_NLMSGERR.unpack_from(self._buf, off + _NLMSGHDR.size)[0]
                    raise ConntrackError(f"conntrack dump: {os.strerror(err)}")
                if mtype == _MSG_NEW:
                    conn = _parse(self._buf, off, length)
                    if conn is not None:
                        conns.append(conn)

    # -- events --------------------------------------------------------

    def poll(self, timeout: float) -> list[CtEvent | None]:
        """Events received within ``timeout`` seconds (at most ``batch`` per call).

        Returns as soon as something arrived. After an overrun the list ends
        with ``None`` (RESYNC): reconcile from dump() before trusting later
        events. Echoes of our own refresh/mark changes are left out.
        """
        s = self._events()
        try:
            ready, _, _ = select.select([s], [], [], max(timeout, 0))
        except InterruptedError:
            ready = []
        out: list[CtEvent | None] = []
        if not ready:
            return out
        for _ in range(self._batch):
            try:
                n = s.recv_into(self._buf, _RECV_SIZE, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise ConntrackError(f"conntrack events: {e.strerror}") from None
                self.lost_events += 1
                self._discard_queue(s)
                out.append(None)
                break
            if n > _RECV_SIZE:
                raise ConntrackError(f"conntrack events: message of {n} bytes truncated")
            self._events_in(n, out)
        return out

    def _events_in(self, n: int, out: list[CtEvent | None]) -> None:
        for mtype, flags, _seq, pid, off, length in _messages(self._buf, n):
            if pid == self._req_portid and pid != 0:
                continue  # the echo of a change we made
            if mtype == _MSG_DELETE:
                kind = EventType.DESTROY
            elif mtype == _MSG_NEW:
                # the kernel flags the first event of an entry CREATE|EXCL, later ones neither
                new = flags & (NLM_F_CREATE | NLM_F_EXCL) == NLM_F_CREATE | NLM_F_EXCL
                kind = EventType.NEW if new else EventType.UPDATE
            else:
                continue
            conn = _parse(self._buf, off, length)
            if conn is not None:
                out.append(CtEvent(kind, conn))

    def _discard_queue(self, s: socket.socket) -> None:
        # Empty the queue: the kernel queues nothing new for us until it is
        # empty, and what is queued predates the dump the caller is about to
        # make. Bounded, though a congested queue holds at most rcvbuf bytes.
        for _ in range(1 << 20):
            try:
                n = s.recv_into(self._buf, _RECV_SIZE, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost_events += 1
                    continue
                raise ConntrackError(f"conntrack events: {e.strerror}") from None
            self.discarded_events += sum(1 for _ in _messages(self._buf, min(n, _RECV_SIZE)))

    # -- changes -------------------------------------------------------

    def refresh(self, conn: Conn, timeout_s: int) -> bool:
        """Set the entry's remaining lifetime to ``timeout_s`` seconds; False if it is gone."""
        if not 0 <= timeout_s <= 0xFFFFFFFF:
            raise ValueError(f"timeout must fit 32 bits: {timeout_s}")
        return self._change(conn, _nla(CTA_TIMEOUT, _U32.pack(timeout_s)), "refresh")

    def mark_offloaded(self, conn: Conn, offloaded: bool) -> bool:
        """Set or clear ``offload_mark`` (other mark bits untouched) and, for TCP
        when offloading, the be-liberal window-tracking flag on both directions.

        Liberal stays set when a connection returns to the slow path, as with
        the kernel's own flowtable: conntrack missed the window updates the
        fast path forwarded, and strict tracking would call the next packets
        INVALID. False if the entry is gone.
        """
        attrs = b""
        if self.offload_mark:
            # the kernel keeps the bits outside CTA_MARK_MASK: (mark & ~mask) | value
            attrs += _nla(CTA_MARK, _U32.pack(self.offload_mark if offloaded else 0))
            attrs += _nla(CTA_MARK_MASK, _U32.pack(self.offload_mark))
        if offloaded and conn.proto == socket.IPPROTO_TCP:
            liberal = _TCP_FLAGS.pack(IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
            attrs += _nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_TCP,
                                                _nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, liberal),
                                                _nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, liberal)))
        if not attrs:
            # Nothing to change, but say whether the entry exists: a GET does,
            # without the UPDATE event an empty change would broadcast.
            return self._change(conn, b"", "mark_offloaded", msg_type=_MSG_GET)
        return self._change(conn, attrs, "mark_offloaded")

    def _change(self, conn: Conn, attrs: bytes, what: str, msg_type: int = _MSG_NEW) -> bool:
        """Send a request about ``conn`` and wait for its ACK. A CT_NEW without
        NLM_F_CREATE only ever changes an existing entry."""
        s = self._requests()
        head = _tuple_attr(CTA_TUPLE_ORIG, conn)
        if conn.zone:
            head += _nla(CTA_ZONE, _U16.pack(conn.zone))  # the lookup is per zone
        seq = self._next_seq()
        _send(s, _request(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, conn.family, head + attrs))
        while True:
            n = self._recv_answer(s, f"conntrack {what} {_describe(conn)}")
            for mtype, _flags, mseq, _pid, off, _length in _messages(self._buf, n):
                if mtype != NLMSG_ERROR or mseq != seq:
                    continue  # the entry a GET returns, or a late answer to an earlier request
                err = -_NLMSGERR.unpack_from(self._buf, off + _NLMSGHDR.size)[0]
                if err == 0:
                    return True
                # ETIME: the entry is dying, its timeout can no longer change
                if err in (errno.ENOENT, errno.ETIME):
                    return False
                raise ConntrackError(f"conntrack {what} {_describe(conn)}: {os.strerror(err)}")

    # -- wire ----------------------------------------------------------

    def _next_seq(self) -> int:
        return next(self._seq) & 0xFFFFFFFF

    def _recv_answer(self, s: socket.socket, what: str) -> int:
        """One datagram of answers into self._buf; its length."""
        deadline = time.monotonic() + _REQUEST_TIMEOUT
        while True:
            try:
                n = s.recv_into(self._buf, _RECV_SIZE, socket.MSG_TRUNC)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConntrackError(f"{what}: no answer from the kernel") from None
                select.select([s], [], [], remaining)
                continue
            except OSError as e:
                raise ConntrackError(f"{what}: {e.strerror}") from None
            if n > _RECV_SIZE:
                raise ConntrackError(f"{what}: answer of {n} bytes truncated")
            return n


def _open(groups: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        s.setblocking(False)
        if rcvbuf is not None:
            # SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN;
            # without it the plain option gets what rmem_max allows.
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((0, groups))
    except OSError:
        s.close()
        raise
    return s


def _send(s: socket.socket, data: bytes | bytearray) -> None:
    try:
        s.sendto(data, (0, 0))
    except OSError as e:
        raise ConntrackError(f"ctnetlink send: {e.strerror}") from None


def _messages(buf: bytearray, n: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(type, flags, seq, pid, offset, length) of each netlink message in buf[:n]."""
    off = 0
    while off + _NLMSGHDR.size <= n:
        length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > n:
            break
        yield mtype, flags, seq, pid, off, length
        off += (length + 3) & ~3


# -- encoding --------------------------------------------------------------


def _nla(atype: int, payload: bytes) -> bytes:
    n = _NLA_HDR.size + len(payload)
    return _NLA_HDR.pack(n, atype) + payload + bytes(-n & 3)


def _nest(atype: int, *children: bytes) -> bytes:
    return _nla(atype | NLA_F_NESTED, b"".join(children))


def _request(msg_type: int, flags: int, seq: int, family: int, payload: bytes = b"") -> bytes:
    body = _NFGENMSG.pack(family, 0, 0) + payload  # version 0: NFNETLINK_V0
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _tuple_attr(atype: int, conn: Conn) -> bytes:
    """conn's original tuple as CTA_TUPLE_ORIG (or whichever ``atype``) for a lookup."""
    try:
        src_attr, dst_attr, _ = _ADDR[conn.family]
        t = conn.orig
        return _nest(
            atype,
            _nest(CTA_TUPLE_IP, _nla(src_attr, socket.inet_pton(conn.family, t.src)),
                  _nla(dst_attr, socket.inet_pton(conn.family, t.dst))),
            _nest(CTA_TUPLE_PROTO, _nla(CTA_PROTO_NUM, bytes([conn.proto])),
                  _nla(CTA_PROTO_SRC_PORT, _U16.pack(t.sport)),
                  _nla(CTA_PROTO_DST_PORT, _U16.pack(t.dport))),
        )
    except (KeyError, OSError, ValueError, struct.error) as e:
        raise ConntrackError(f"conntrack entry {_describe(conn)}: cannot encode its tuple ({e})") from None


# -- decoding --------------------------------------------------------------

_Span = tuple[int, int]  # payload start, end in the receive buffer


def _attrs(buf: bytearray, span: _Span) -> dict[int, _Span]:
    """type -> payload span of each attribute in buf[span]; the first of a type wins."""
    out: dict[int, _Span] = {}
    pos, end = span
    unpack = _NLA_HDR.unpack_from  # hot: every message walks about ten attribute lists
    while pos + 4 <= end:
        alen, atype = unpack(buf, pos)
        if alen < 4 or pos + alen > end:
            break  # malformed: keep what was sound
        atype &= NLA_TYPE_MASK
        if atype not in out:
            out[atype] = (pos + 4, pos + alen)
        pos += (alen + 3) & ~3
    return out


def _int(buf: bytearray, span: _Span | None, codec: struct.Struct) -> int | None:
    if span is None or span[1] - span[0] < codec.size:
        return None
    return codec.unpack_from(buf, span[0])[0]


def _u8(buf: bytearray, span: _Span | None) -> int | None:
    return buf[span[0]] if span is not None and span[1] > span[0] else None


def _parse(buf: bytearray, off: int, length: int) -> Conn | None:
    """The Conn in one ctnetlink message, or None for entries we do not
    offload (not IPv4/IPv6, not TCP/UDP) and for messages missing a tuple.
    Any other attribute may be missing (a DESTROY event carries no timeout
    and no TCP state): its field is then None (0 for status, mark, zone)."""
    head = off + _NLMSGHDR.size
    if length < _NLMSGHDR.size + _NFGENMSG.size:
        return None
    family = buf[head]
    if family not in _ADDR:
        return None
    top = _attrs(buf, (head + _NFGENMSG.size, off + length))
    orig = _tuple_of(buf, family, top.get(CTA_TUPLE_ORIG))
    reply = _tuple_of(buf, family, top.get(CTA_TUPLE_REPLY))
    if orig is None or reply is None or orig[0] != reply[0]:
        return None
    # CTA_ZONE is there when the zone covers both directions; a zone of the
    # original direction only (nft "ct original zone set") sits inside that
    # tuple. Either way it is the zone a lookup by the original tuple needs.
    zone = _int(buf, top.get(CTA_ZONE), _U16)
    if zone is None:
        orig_span = top[CTA_TUPLE_ORIG]
        zone = _int(buf, _attrs(buf, orig_span).get(CTA_TUPLE_ZONE), _U16)
    tcp_state = None
    protoinfo = top.get(CTA_PROTOINFO)
    if protoinfo is not None:
        tcp = _attrs(buf, protoinfo).get(CTA_PROTOINFO_TCP)
        if tcp is not None:
            tcp_state = _u8(buf, _attrs(buf, tcp).get(CTA_PROTOINFO_TCP_STATE))
    return Conn(
        family=family,
        proto=orig[0],
        orig=orig[1],
        reply=reply[1],
        status=_int(buf, top.get(CTA_STATUS), _U32) or 0,
        tcp_state=tcp_state,
        mark=_int(buf, top.get(CTA_MARK), _U32) or 0,
        zone=zone or 0,
        helper=_helper(buf, top.get(CTA_HELP)),
        timeout=_int(buf, top.get(CTA_TIMEOUT), _U32),
        ct_id=_int(buf, top.get(CTA_ID), _U32),
    )


def _tuple_of(buf: bytearray, family: int, span: _Span | None) -> tuple[int, Tuple] | None:
    if span is None:
        return None
    t = _attrs(buf, span)
    ip_span, proto_span = t.get(CTA_TUPLE_IP), t.get(CTA_TUPLE_PROTO)
    if ip_span is None or proto_span is None:
        return None
    proto = _attrs(buf, proto_span)
    num = _u8(buf, proto.get(CTA_PROTO_NUM))
    if num not in _TRACKED:
        return None
    sport = _int(buf, proto.get(CTA_PROTO_SRC_PORT), _U16)
    dport = _int(buf, proto.get(CTA_PROTO_DST_PORT), _U16)
    src_attr, dst_attr, alen = _ADDR[family]
    ip = _attrs(buf, ip_span)
    src, dst = ip.get(src_attr), ip.get(dst_attr)
    if (src is None or dst is None or sport is None or dport is None
            or src[1] - src[0] != alen or dst[1] - dst[0] != alen):
        return None
    return num, Tuple(socket.inet_ntop(family, bytes(buf[src[0]:src[1]])),
                      socket.inet_ntop(family, bytes(buf[dst[0]:dst[1]])), sport, dport)


def _helper(buf: bytearray, span: _Span | None) -> str | None:
    if span is None:
        return None
    name = _attrs(buf, span).get(CTA_HELP_NAME)
    if name is None:
        return None
    return bytes(buf[name[0]:name[1]]).split(b"\0", 1)[0].decode("ascii", "replace") or None
