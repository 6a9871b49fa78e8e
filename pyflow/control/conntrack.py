"""The conntrack adapter: ctnetlink through netlink sockets of our own.

Messages are encoded and decoded with pyroute2's ctnetlink message class
(``nfct_msg``); the sockets are plain ``AF_NETLINK`` sockets so that this module
controls what pyroute2 0.9.7's asyncio sockets hide: the receive buffer size,
ENOBUFS on event overruns, non-blocking reads and a file descriptor for
select(). Both sockets are created in the constructor, so they belong to the
network namespace of the thread that built the object and stay there even if
that thread later moves (setns(2) is per thread, a socket keeps its namespace).

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
_NLA_HDR = struct.Struct("=HH")  # struct nlattr: len, type
_CTA_HELP_NAME = 1  # enum ctattr_help: the helper's name, nested inside CTA_HELP

_TRACKED = {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
_IP_ATTRS = {
    socket.AF_INET: ("CTA_IP_V4_SRC", "CTA_IP_V4_DST"),
    socket.AF_INET6: ("CTA_IP_V6_SRC", "CTA_IP_V6_DST"),
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
        _send(s, _encode(_MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, socket.AF_UNSPEC, []))
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
        return self._change(conn, [["CTA_TIMEOUT", timeout_s]], "refresh")

    def mark_offloaded(self, conn: Conn, offloaded: bool) -> bool:
        """Set or clear ``offload_mark`` (other mark bits untouched) and, for TCP
        when offloading, the be-liberal window-tracking flag on both directions.

        Liberal stays set when a connection returns to the slow path, as with
        the kernel's own flowtable: conntrack missed the window updates the
        fast path forwarded, and strict tracking would call the next packets
        INVALID. False if the entry is gone.
        """
        attrs: list[list] = []
        if self.offload_mark:
            attrs.append(["CTA_MARK", self.offload_mark if offloaded else 0])
            attrs.append(["CTA_MARK_MASK", self.offload_mark])
        if offloaded and conn.proto == socket.IPPROTO_TCP:
            liberal = (IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)  # nf_ct_tcp_flags {flags, mask}
            tcp = {"attrs": [["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", {"value": liberal}],
                             ["CTA_PROTOINFO_TCP_FLAGS_REPLY", {"value": liberal}]]}
            attrs.append(["CTA_PROTOINFO", {"attrs": [["CTA_PROTOINFO_TCP", tcp]]}])
        if not attrs:
            # Nothing to change, but say whether the entry exists: a GET does,
            # without the UPDATE event an empty change would broadcast.
            return self._change(conn, [], "mark_offloaded", msg_type=_MSG_GET)
        return self._change(conn, attrs, "mark_offloaded")

    def _change(self, conn: Conn, attrs: list[list], what: str, msg_type: int = _MSG_NEW) -> bool:
        """Send a request about ``conn`` and wait for its ACK. A CT_NEW without
        NLM_F_CREATE only ever changes an existing entry."""
        s = self._requests()
        head = [["CTA_TUPLE_ORIG", _tuple_nla(conn.family, conn.proto, conn.orig)]]
        if conn.zone:
            head.append(["CTA_ZONE", conn.zone])  # the lookup is per zone
        seq = self._next_seq()
        _send(s, _encode(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, conn.family, head + attrs))
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


def _encode(msg_type: int, flags: int, seq: int, family: int, attrs: list[list]) -> bytearray:
    msg = nfct_msg()
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = family
    msg["version"] = 0  # NFNETLINK_V0
    msg["res_id"] = 0
    msg["attrs"] = attrs
    msg.encode()
    return msg.data


def _messages(buf: bytearray, n: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(type, flags, seq, pid, offset, length) of each netlink message in buf[:n]."""
    off = 0
    while off + _NLMSGHDR.size <= n:
        length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > n:
            break
        yield mtype, flags, seq, pid, off, length
        off += (length + 3) & ~3


def _tuple_nla(family: int, proto: int, t: Tuple) -> dict:
    try:
        src_attr, dst_attr = _IP_ATTRS[family]
    except KeyError:
        raise ConntrackError(f"conntrack tuple {t}: unknown address family {family}") from None
    return {"attrs": [
        ["CTA_TUPLE_IP", {"attrs": [[src_attr, t.src], [dst_attr, t.dst]]}],
        ["CTA_TUPLE_PROTO", {"attrs": [["CTA_PROTO_NUM", proto],
                                       ["CTA_PROTO_SRC_PORT", t.sport],
                                       ["CTA_PROTO_DST_PORT", t.dport]]}],
    ]}


def _parse(buf: bytearray, off: int, length: int) -> Conn | None:
    """The Conn in one ctnetlink message, or None for entries we do not
    offload (not IPv4/IPv6, not TCP/UDP) and for messages missing a tuple."""
    msg = nfct_msg(bytes(buf[off:off + length]))
    try:
        msg.decode()
    except Exception:  # pyroute2 raises assorted errors on malformed input
        return None
    family = msg.get("nfgen_family")
    if family not in _IP_ATTRS:
        return None
    orig = _tuple_of(family, msg.get_attr("CTA_TUPLE_ORIG"))
    reply = _tuple_of(family, msg.get_attr("CTA_TUPLE_REPLY"))
    if orig is None or reply is None or orig[0] != reply[0]:
        return None
    tcp_state = None
    protoinfo = msg.get_attr("CTA_PROTOINFO")
    if protoinfo is not None:
        tcp = protoinfo.get_attr("CTA_PROTOINFO_TCP")
        if tcp is not None:
            tcp_state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
    return Conn(
        family=family,
        proto=orig[0],
        orig=orig[1],
        reply=reply[1],
        status=msg.get_attr("CTA_STATUS") or 0,
        tcp_state=tcp_state,
        mark=msg.get_attr("CTA_MARK") or 0,
        zone=msg.get_attr("CTA_ZONE") or 0,
        helper=_helper(msg),
        timeout=msg.get_attr("CTA_TIMEOUT"),
        ct_id=msg.get_attr("CTA_ID"),
    )


def _tuple_of(family: int, nla) -> tuple[int, Tuple] | None:
    if nla is None:
        return None
    ip = nla.get_attr("CTA_TUPLE_IP")
    proto = nla.get_attr("CTA_TUPLE_PROTO")
    if ip is None or proto is None:
        return None
    num = proto.get_attr("CTA_PROTO_NUM")
    if num not in _TRACKED:
        return None
    src_attr, dst_attr = _IP_ATTRS[family]
    src, dst = ip.get_attr(src_attr), ip.get_attr(dst_attr)
    sport, dport = proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT")
    if src is None or dst is None or sport is None or dport is None:
        return None
    return num, Tuple(src, dst, sport, dport)


def _helper(msg) -> str | None:
    # The kernel nests the name (CTA_HELP_NAME) inside CTA_HELP; pyroute2
    # 0.9.7 declares CTA_HELP a plain string, so read the nest from the raw bytes.
    for slot in msg["attrs"]:
        if slot.name != "CTA_HELP":
            continue
        cell = slot.cell[1]
        raw = bytes(cell.data[cell.offset + 4:cell.offset + cell.length])
        pos = 0
        while pos + _NLA_HDR.size <= len(raw):
            alen, atype = _NLA_HDR.unpack_from(raw, pos)
            if alen < _NLA_HDR.size:
                break
            if atype & 0x3FFF == _CTA_HELP_NAME:
                name = raw[pos + 4:pos + alen].split(b"\0", 1)[0]
                return name.decode("ascii", "replace") or None
            pos += (alen + 3) & ~3
    return None
