"""The conntrack adapter: ctnetlink through netlink sockets of our own.

The sockets are plain ``AF_NETLINK`` sockets, so that this module controls
what pyroute2 0.9.7's asyncio sockets hide: the receive buffer size, ENOBUFS
on event overruns, non-blocking reads and a file descriptor for select().
Both are created in the constructor, so they belong to the network namespace
of the thread that built the object and stay there even if that thread later
moves (setns(2) is per thread; a socket keeps the namespace it was made in).

Received datagrams (events, dump answers) are decoded in C
(csrc/ctfeed.c, with libmnl, through :mod:`pyflow.control.ctfeed`): one call
receives and decodes every queued datagram into an array, and Python only
builds the Conn objects, about 5 us an entry instead of the 25 us the Python
decoder below (``_parse``, kept as the reference the C one is tested against)
takes. Requests are built with :mod:`pyflow.netlink.wire` and the attribute
numbers of :mod:`pyflow.netlink.uapi`; several changes (a pass's marks) go
out in one sendmsg() (:class:`ChangeQueue`).

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
import logging
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence

from pyflow.control import ctfeed
from pyflow.control.model import Conn, CtEvent, EventType, Tuple
from pyflow.errors import PyflowError
from pyflow.netlink.errors import error_text
from pyflow.netlink.sock import REQUEST_TIMEOUT, NetlinkSocket, group_mask
from pyflow.netlink.uapi import (
    CTA_HELP,
    CTA_HELP_NAME,
    CTA_ID,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY,
    CTA_PROTOINFO_TCP_STATE,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_TUPLE_ZONE,
    CTA_ZONE,
    IP_CT_TCP_FLAG_BE_LIBERAL,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    NETLINK_NETFILTER,
    NFNETLINK_V0,
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_HDRLEN,
    SO_RCVBUFFORCE,
)
from pyflow.netlink.wire import (
    BE16,
    BE32,
    NLATTR,
    NLMSGHDR,
    Buffer,
    Span,
    attrs,
    messages,
    nest,
    nested,
    nla,
    string,
    u8,
    value,
)
from pyflow.netlink.wire import request as _message

# nlmsg_type of a ctnetlink message: the subsystem in the high byte, the message in the low
_MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
_MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

_EVENT_GROUPS = group_mask(NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)

_NFGENMSG = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (unused: 0)
_TCP_FLAGS = struct.Struct("=BB")  # struct nf_ct_tcp_flags: flags, mask

_TRACKED = {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
# family -> (source attribute, destination attribute, address length)
_ADDR: dict[int, tuple[int, int, int]] = {
    socket.AF_INET: (CTA_IP_V4_SRC, CTA_IP_V4_DST, 4),
    socket.AF_INET6: (CTA_IP_V6_SRC, CTA_IP_V6_DST, 16),
}

DEFAULT_RCVBUF = 8 << 20
# After an overrun the event buffer doubles, up to this (as conntrackd does, its
# SocketBufferSizeMaxGrown): an overrun costs a resync, a bigger buffer only memory
# that is used while events queue.
DEFAULT_RCVBUF_MAX = 64 << 20
# The request socket's buffer holds a batch's answers: an ACK is a small datagram, but
# the kernel charges each a few hundred bytes of overhead against the buffer.
REQUEST_RCVBUF = 2 << 20
CHANGES_PER_SEND = 256  # requests in one sendmsg() (and answers queued at once)
CHANGE_BYTES_PER_SEND = 64 << 10  # well under the socket's send buffer (about 208 KiB)
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10  # refusals without a copy of the request: small answers

log = logging.getLogger(__name__)

# The kernel's timeouts of the states pyflow offloads (per network namespace), read where
# the adapter was made; the kernel's defaults when a file cannot be read.
TIMEOUT_SYSCTLS = {
    socket.IPPROTO_TCP: ("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established", 432000),
    socket.IPPROTO_UDP: ("/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream", 120),
}
TIMEOUTS_TTL_S = 10.0  # how long a read of them is used (hand-backs come by the thousand)


def read_timeouts(sysctls: dict[int, tuple[str, int]] = TIMEOUT_SYSCTLS) -> dict[int, int]:
    """{protocol: seconds} from the sysctl files of the calling thread's namespace."""
    out = {}
    for proto, (path, default) in sysctls.items():
        try:
            with open(path) as f:
                out[proto] = int(f.read().strip())
        except (OSError, ValueError):
            out[proto] = default
    return out


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
    since the kernel keeps no count. Each overrun doubles the buffer, up to
    ``rcvbuf_max`` (default: 64 MiB or rcvbuf if larger; ``rcvbuf_grown``
    counts the times). After an overrun :meth:`poll` returns
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

    Messages received that are not entries pyflow can offload are counted, not
    errors: ``ignored_messages`` (another family or protocol, another message
    type), ``malformed_messages`` (a tuple missing or broken, a truncated header).
    """

    def __init__(self, *, rcvbuf: int = DEFAULT_RCVBUF, offload_mark: int = 0,
                 subscribe: bool = True, batch: int = 8192, rcvbuf_max: int | None = None) -> None:
        if not 0 <= offload_mark <= 0xFFFFFFFF:
            raise ValueError(f"offload_mark must fit 32 bits: {offload_mark:#x}")
        if rcvbuf <= 0 or batch <= 0:
            raise ValueError(f"rcvbuf and batch must be positive: {rcvbuf}, {batch}")
        if rcvbuf_max is None:
            rcvbuf_max = max(DEFAULT_RCVBUF_MAX, rcvbuf)
        if rcvbuf_max < rcvbuf or rcvbuf_max > 0x3FFFFFFF:
            raise ValueError(f"rcvbuf_max must be at least rcvbuf ({rcvbuf}) and under 1 GiB: {rcvbuf_max}")
        self.lost_events = 0
        self.discarded_events = 0
        self.rcvbuf_grown = 0
        self._rcvbuf_asked = rcvbuf
        self.rcvbuf_max = rcvbuf_max
        self.offload_mark = offload_mark
        self._timeouts = read_timeouts()  # in the namespace the sockets are made in
        self._timeouts_at = time.monotonic()
        self._batch = batch
        # events read off the socket while our own changes were being sent, for poll()
        self._backlog: list[CtEvent | None] = []
        self._ev: NetlinkSocket | None = None
        self._req: NetlinkSocket | None = None
        try:
            self._req = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=REQUEST_RCVBUF)
            self._req.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            self._req_portid = self._req.portid
            if subscribe:
                self._ev = NetlinkSocket(NETLINK_NETFILTER, _EVENT_GROUPS, rcvbuf=rcvbuf)
        except OSError as e:
            self.close()
            raise ConntrackError(f"ctnetlink socket: {error_text(e)}") from None
        self._req_feed = ctfeed.Feed(len(self._req.buf))
        self._ev_feed = ctfeed.Feed(len(self._ev.buf)) if self._ev is not None else None

    # -- lifecycle -----------------------------------------------------

    def fileno(self) -> int:
        """The event socket's descriptor: readable when poll() has work."""
        return self._events().fileno()

    @property
    def rcvbuf(self) -> int:
        """The event socket's receive buffer as the kernel sized it (twice the asked size)."""
        return self._events().sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def close(self) -> None:
        for s in (self._ev, self._req):
            if s is not None:
                s.close()
        self._ev = self._req = None

    def __enter__(self) -> CtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self) -> NetlinkSocket:
        if self._ev is None:
            raise ConntrackError("ctnetlink adapter has no event socket (closed or subscribe=False)")
        return self._ev

    def _requests(self) -> NetlinkSocket:
        if self._req is None:
            raise ConntrackError("ctnetlink adapter is closed")
        return self._req

    @property
    def ignored_messages(self) -> int:
        return self._req_feed.ignored + (self._ev_feed.ignored if self._ev_feed else 0)

    @property
    def malformed_messages(self) -> int:
        return self._req_feed.malformed + (self._ev_feed.malformed if self._ev_feed else 0)

    # -- dump ----------------------------------------------------------

    def dump(self) -> list[Conn]:
        """Every IPv4/IPv6 TCP and UDP entry of this namespace, all zones."""
        s = self._requests()
        feed = self._req_feed
        conns: list[Conn] = []
        fd = s.fileno()
        try:
            seq = s.next_seq()
            # AF_UNSPEC: ctnetlink dumps every layer-3 family in one pass
            s.send(_message(_MSG_GET, NLM_F_DUMP | NLM_F_REQUEST, seq, _nfgen(socket.AF_UNSPEC)))
            deadline = time.monotonic() + REQUEST_TIMEOUT  # renewed by every datagram
            while True:
                got, res, ret = feed.recv(fd, s.buf, 1 << 20, ctfeed.DUMP, seq)
                conns += got
                if res.err:
                    raise OSError(res.err, os.strerror(res.err))
                if ret < 0:
                    raise OSError(-ret, os.strerror(-ret))
                if res.done:
                    return conns
                if res.datagrams:
                    deadline = time.monotonic() + REQUEST_TIMEOUT
                elif not res.more:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(errno.ETIMEDOUT, "dump: no answer from the kernel")
                    s.wait(remaining)
        except OSError as e:
            raise ConntrackError(f"conntrack dump: {error_text(e)}") from None

    # -- events --------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Events already read off the socket (while changes were sent) that poll() will
        return without waiting: the caller must poll while this is not 0, whether or not
        the socket is readable."""
        return len(self._backlog)

    def poll(self, timeout: float) -> list[CtEvent | None]:
        """Events received within ``timeout`` seconds (at most ``batch`` per call).

        Returns as soon as something arrived; the backlog first, without waiting.
        After an overrun the list ends with ``None`` (RESYNC): reconcile from dump()
        before trusting later events. Echoes of our own refresh/mark changes are left out.
        """
        if self._backlog:
            out, self._backlog = self._backlog[:self._batch], self._backlog[self._batch:]
            return out
        return self._receive(timeout)

    def _absorb(self) -> None:
        """Read what the event socket holds into the backlog, without waiting. Every change
        we send comes back on it as an event (which the reader drops as ours): the marks of
        a resync of 100k connections would overrun the buffer (costing another resync)
        though hardly one of those events is news. Bounded: a few batches per call."""
        if self._ev is None:
            return
        for _ in range(4):
            got = self._receive(0)
            self._backlog += got
            if len(got) < self._batch or got[-1] is None:
                return

    def _receive(self, timeout: float) -> list[CtEvent | None]:
        s = self._events()
        try:
            ready, _, _ = select.select([s.sock], [], [], max(timeout, 0))
        except InterruptedError:
            ready = []
        out: list[CtEvent | None] = []
        if not ready:
            return out
        feed = self._ev_feed
        assert feed is not None  # made with the event socket
        fd, left = s.fileno(), self._batch
        while left > 0:
            got, res, ret = feed.recv(fd, s.buf, left, ctfeed.EVENTS, 0, self._req_portid)
            out += got
            left -= res.datagrams
            if ret == -errno.ENOBUFS:
                self.lost_events += 1
                self._grow()
                self._discard_queue(s)
                out.append(None)
                break
            if ret < 0:
                raise ConntrackError(f"conntrack events: {error_text(ret)}")
            if not res.more:
                break
        return out

    def _grow(self) -> None:
        """Double the event buffer after an overrun, up to rcvbuf_max, as conntrackd does:
        a burst that overran it once would likely do so again."""
        size = min(self._rcvbuf_asked * 2, self.rcvbuf_max)
        if size <= self._rcvbuf_asked:
            return
        sock = self._events().sock
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as e:
            log.warning("conntrack event buffer stays at %d bytes: %s", self._rcvbuf_asked, error_text(e))
            return
        self._rcvbuf_asked = size
        self.rcvbuf_grown += 1
        if size >= self.rcvbuf_max:
            log.warning("conntrack event buffer grown to its maximum, %d bytes; events lost to "
                        "overruns from now on cost a resync each", size)
        else:
            log.info("conntrack event buffer grown to %d bytes after an overrun", size)

    def _discard_queue(self, s: NetlinkSocket) -> None:
        # Empty the queue: the kernel queues nothing new for us until it is
        # empty, and what is queued predates the dump the caller is about to
        # make. Bounded, though a congested queue holds at most rcvbuf bytes.
        dropped, overruns, ret = ctfeed.drain(s.fileno(), s.buf)
        self.discarded_events += dropped
        self.lost_events += overruns
        if ret < 0 and ret != -errno.EAGAIN:
            raise ConntrackError(f"conntrack events: {error_text(ret)}")

    # -- changes -------------------------------------------------------

    def refresh(self, conn: Conn, timeout_s: int) -> bool:
        """Set the entry's remaining lifetime to ``timeout_s`` seconds; False if it is gone."""
        if not 0 <= timeout_s <= 0xFFFFFFFF:
            raise ValueError(f"timeout must fit 32 bits: {timeout_s}")
        return self._change(conn, nla(CTA_TIMEOUT, BE32.pack(timeout_s)), "refresh")

    def timeouts(self) -> dict[int, int]:
        """The namespace's TCP established and UDP stream timeouts (model.Conntrack.timeouts),
        re-read at most every TIMEOUTS_TTL_S seconds. Called from the thread that made the
        adapter, so /proc/sys/net is that namespace's."""
        if time.monotonic() - self._timeouts_at > TIMEOUTS_TTL_S:
            self._timeouts = read_timeouts()
            self._timeouts_at = time.monotonic()
        return self._timeouts

    def mark_offloaded(self, conn: Conn, offloaded: bool, *, timeout_s: int | None = None) -> bool:
        """Set or clear ``offload_mark`` (other mark bits untouched) and, for TCP
        when offloading, the be-liberal window-tracking flag on both directions;
        with ``timeout_s``, the entry's timeout too, in the same message (the long
        timeout held while offloaded, the protocol's own at hand-back).

        Liberal stays set when a connection returns to the slow path, as with
        the kernel's own flowtable: conntrack missed the window updates the
        fast path forwarded, and strict tracking would call the next packets
        INVALID. False if the entry is gone.
        """
        change, msg_type = self._mark_change(conn, offloaded, timeout_s)
        return self._change(conn, change, "mark_offloaded", msg_type=msg_type)

    def _mark_change(self, conn: Conn, offloaded: bool, timeout_s: int | None) -> tuple[bytes, int]:
        """The attributes and message type of mark_offloaded's request: the same for every
        connection of a protocol with the same timeout, so made once (a bounded cache)."""
        key = (offloaded, conn.proto == socket.IPPROTO_TCP, timeout_s, self.offload_mark)
        made = _MARK_CHANGES.get(key)
        if made is None:
            if len(_MARK_CHANGES) >= 4096:
                _MARK_CHANGES.clear()  # hand-back timeouts vary: never unbounded
            made = _MARK_CHANGES[key] = self._make_mark_change(conn, offloaded, timeout_s)
        return made

    def _make_mark_change(self, conn: Conn, offloaded: bool, timeout_s: int | None) -> tuple[bytes, int]:
        change = b""
        if timeout_s is not None:
            if not 0 <= timeout_s <= 0xFFFFFFFF:
                raise ValueError(f"timeout must fit 32 bits: {timeout_s}")
            change += nla(CTA_TIMEOUT, BE32.pack(timeout_s))
        if self.offload_mark:
            # the kernel keeps the bits outside CTA_MARK_MASK: (mark & ~mask) | value
            change += nla(CTA_MARK, BE32.pack(self.offload_mark if offloaded else 0))
            change += nla(CTA_MARK_MASK, BE32.pack(self.offload_mark))
        if offloaded and conn.proto == socket.IPPROTO_TCP:
            liberal = _TCP_FLAGS.pack(IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
            change += nest(CTA_PROTOINFO, nest(CTA_PROTOINFO_TCP,
                                               nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, liberal),
                                               nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, liberal)))
        if not change:
            # Nothing to change, but say whether the entry exists: a GET does,
            # without the UPDATE event an empty change would broadcast.
            return b"", _MSG_GET
        return change, _MSG_NEW

    def _change(self, conn: Conn, change: bytes, what: str, msg_type: int = _MSG_NEW) -> bool:
        """Send a request about ``conn`` and wait for its ACK. A CT_NEW without
        NLM_F_CREATE only ever changes an existing entry."""
        s = self._requests()
        try:
            err = s.ack(msg_type, 0, _change_body(conn, change), REQUEST_TIMEOUT)
        except OSError as e:
            raise ConntrackError(f"conntrack {what} {_describe(conn)}: {error_text(e)}") from None
        return _answer(err, conn, what)

    # -- batched changes -----------------------------------------------

    def changes(self) -> ChangeQueue:
        """A queue of changes to send together (see ChangeQueue)."""
        return ChangeQueue(self)

    def mark_offloaded_many(self, conns: Sequence[Conn], offloaded: bool, *,
                            timeout_s: int | None = None) -> list[bool]:
        """mark_offloaded for each of conns, sent together: per connection, False if its
        entry is gone."""
        items: list[tuple[Conn, bytes, str, int]] = []
        append = items.append
        made: dict[bool, tuple[bytes, int]] = {}  # TCP or not -> what _mark_change gives
        for conn in conns:
            tcp = conn.proto == socket.IPPROTO_TCP
            change = made.get(tcp)
            if change is None:
                change = made[tcp] = self._mark_change(conn, offloaded, timeout_s)
            append((conn, change[0], "mark_offloaded", change[1]))
        return self._send_changes(items) if items else []

    def refresh_many(self, conns: Sequence[Conn], timeout_s: int) -> list[bool]:
        """refresh for each of conns, sent together: per connection, False if its entry is gone."""
        q = self.changes()
        for conn in conns:
            q.refresh(conn, timeout_s)
        return q.send()

    def _send_changes(self, items: list[tuple[Conn, bytes, str, int]]) -> list[bool]:
        """Requests (conn, attributes, what, message type), CHANGES_PER_SEND or
        CHANGE_BYTES_PER_SEND to a sendmsg(); per request True (done) or False (entry gone).
        A request whose answer the kernel dropped (the request socket overran) is sent
        again alone: every change here is idempotent. Any other refusal raises
        ConntrackError once every request was sent and answered."""
        s = self._requests()
        fd = s.fileno()
        out: list[bool] = []
        failure: str | None = None
        start = 0
        while start < len(items):
            msgs: list[bytes] = []
            size = 0
            seq = first = s.next_seq()
            for conn, change, _what, msg_type in items[start:start + CHANGES_PER_SEND]:
                form = _change_form(conn, change, msg_type)
                length = form[0] if form is not None else NLMSG_HDRLEN + len(_change_body(conn, change))
                if msgs and size + length > CHANGE_BYTES_PER_SEND:
                    break
                if msgs:
                    seq = s.next_seq()
                    if seq != (first + len(msgs)) & 0xFFFFFFFF:
                        break  # the numbers wrapped past 0: the next send starts afresh
                msg = _change_request(form, conn, change, msg_type, seq)
                msgs.append(msg)
                size += len(msg)
            chunk = items[start:start + len(msgs)]
            errs, _overrun, ret = ctfeed.send_batch(fd, b"".join(msgs), first, len(msgs), s.buf,
                                                    REQUEST_TIMEOUT)
            if ret < 0:
                conn, _c, what, _t = chunk[0]
                raise ConntrackError(f"conntrack {what} {_describe(conn)} and {len(chunk) - 1} more: "
                                     f"{error_text(ret)}")
            self._absorb()  # the echoes of these changes, before they pile up
            if not any(errs) and len(errs) == len(chunk):
                out += [True] * len(chunk)  # every one done: what _answer says of each
                start += len(msgs)
                continue
            for (conn, change, what, msg_type), err in zip(chunk, errs, strict=True):
                if err == ctfeed.NO_ANSWER:
                    out.append(self._change(conn, change, what, msg_type))
                    continue
                try:
                    out.append(_answer(err, conn, what))
                except ConntrackError as e:
                    failure = failure or str(e)
                    out.append(False)
            start += len(msgs)
        if failure is not None:
            raise ConntrackError(failure)
        return out


# (offloaded, TCP, timeout, offload mark) -> mark_offloaded's attributes and message type
_MARK_CHANGES: dict[tuple, tuple[bytes, int]] = {}


class ChangeQueue:
    """Changes to conntrack entries sent together: many requests in one sendmsg(), each
    answered on its own. Queue with refresh() and mark_offloaded() (which mean what
    CtNetlink's methods of the same names mean; each returns the change's index), then
    send(): per change, in queue order, True if done, False if the entry was gone. A
    refusal other than "gone" raises ConntrackError after every change was answered."""

    def __init__(self, ct: CtNetlink) -> None:
        self._ct = ct
        self._items: list[tuple[Conn, bytes, str, int]] = []

    def __len__(self) -> int:
        return len(self._items)

    def refresh(self, conn: Conn, timeout_s: int) -> int:
        if not 0 <= timeout_s <= 0xFFFFFFFF:
            raise ValueError(f"timeout must fit 32 bits: {timeout_s}")
        self._items.append((conn, nla(CTA_TIMEOUT, BE32.pack(timeout_s)), "refresh", _MSG_NEW))
        return len(self._items) - 1

    def mark_offloaded(self, conn: Conn, offloaded: bool, *, timeout_s: int | None = None) -> int:
        change, msg_type = self._ct._mark_change(conn, offloaded, timeout_s)
        self._items.append((conn, change, "mark_offloaded", msg_type))
        return len(self._items) - 1

    def send(self) -> list[bool]:
        items, self._items = self._items, []
        return self._ct._send_changes(items) if items else []


def _change_body(conn: Conn, change: bytes) -> bytes:
    """A change request's payload: the entry's original tuple and zone (the lookup), then
    the change."""
    head = _tuple_attr(CTA_TUPLE_ORIG, conn)
    if conn.zone:
        head += nla(CTA_ZONE, BE16.pack(conn.zone))  # the lookup is per zone
    return _nfgen(conn.family) + head + change


def _change_form(conn: Conn, change: bytes, msg_type: int) -> tuple[int, struct.Struct, tuple] | None:
    """How _change_request packs a request about conn: (message length, layout, constant
    parts), made once per family, message type, change and whether a zone is sent; None
    when conn cannot be encoded (_change_body then raises what it always did)."""
    key = (conn.family, msg_type, change, conn.zone != 0)
    form = _CHANGE_FORMS.get(key)
    if form is None:
        try:
            form = _make_change_form(*key)
        except KeyError:
            return None
        if len(_CHANGE_FORMS) >= 4096:
            _CHANGE_FORMS.clear()  # changes carry hand-back timeouts that vary: never unbounded
        _CHANGE_FORMS[key] = form
    return form


def _make_change_form(family: int, msg_type: int, change: bytes,
                      zoned: bool) -> tuple[int, struct.Struct, tuple]:
    cache, (head, ip, v_src, v_dst, proto, num, sport, dport) = _PACKED[family]
    alen = _ADDR[family][2]
    length = NLMSG_HDRLEN + _NFGENMSG.size + head + (8 if zoned else 0) + len(change)
    hdr = NLMSGHDR.pack(length, msg_type, NLM_F_REQUEST | NLM_F_ACK, 0, 0)
    # header up to its sequence number; then its pid, the nfgenmsg and the tuple's heads up
    # to the source address; the tuple as _tuple_attr lays it out; the zone; the change
    fmt = f">8s4s20s{alen}s4s{alen}s8sB3x4sH2x4sH2x{'4sH2x' if zoned else ''}{len(change)}s"
    pre = hdr[12:16] + _nfgen(family) + _nla_head(CTA_TUPLE_ORIG, head) + ip + v_src
    consts = (hdr[:8], pre, v_dst, proto + num, sport, dport, NLATTR.pack(6, CTA_ZONE), cache)
    return length, struct.Struct(fmt), consts


def _change_request(form: tuple[int, struct.Struct, tuple] | None, conn: Conn, change: bytes, msg_type: int,
                    seq: int) -> bytes:
    """_message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, _change_body(conn, change)), the
    same bytes, in one pack from ``form`` (_change_form): the request of every change sent
    in batches (a resync's marks, the keep-alive's refreshes)."""
    if form is not None:
        length, layout, (hdr, pre, v_dst, proto_num, v_sport, v_dport, v_zone, cache) = form
        t = conn.orig
        src = cache.get(t.src)
        dst = cache.get(t.dst)
        if src is not None and dst is not None:
            seq_raw = seq.to_bytes(4, sys.byteorder)
            try:
                if conn.zone:
                    return layout.pack(hdr, seq_raw, pre, src, v_dst, dst, proto_num, conn.proto, v_sport,
                                       t.sport, v_dport, t.dport, v_zone, conn.zone, change)
                return layout.pack(hdr, seq_raw, pre, src, v_dst, dst, proto_num, conn.proto, v_sport,
                                   t.sport, v_dport, t.dport, change)
            except (OverflowError, struct.error):
                pass  # the general path below says what is wrong
    return _message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, _change_body(conn, change))


# (family, message type, change, zone or not) -> _change_request's layout
_CHANGE_FORMS: dict[tuple, tuple[int, struct.Struct, tuple]] = {}


def _answer(err: int, conn: Conn, what: str) -> bool:
    """A change's answer: True (done), False (the entry is gone), or ConntrackError."""
    if err == 0:
        return True
    # ETIME: the entry is dying, its timeout can no longer change
    if err in (errno.ENOENT, errno.ETIME):
        return False
    raise ConntrackError(f"conntrack {what} {_describe(conn)}: {error_text(err)}")


# -- encoding --------------------------------------------------------------


def _nfgen(family: int) -> bytes:
    """struct nfgenmsg, which every ctnetlink message starts with."""
    return _NFGENMSG.pack(family, NFNETLINK_V0, 0)


def _request(msg_type: int, flags: int, seq: int, family: int, payload: bytes = b"") -> bytes:
    """A whole ctnetlink message (the sockets build their own; this is for recorded input)."""
    return _message(msg_type, flags, seq, _nfgen(family) + payload)


def _tuple_attr(atype: int, conn: Conn) -> bytes:
    """conn's original tuple as CTA_TUPLE_ORIG (or whichever ``atype``) for a lookup.

    Every change request starts with this, so it is packed in one call from a layout fixed
    per family (what nest()/nla() would build: the headers do not depend on the values)
    with the addresses' packed forms cached: about a sixth of building it attribute by
    attribute."""
    try:
        cache, layout = _PACKED[conn.family]
        t = conn.orig
        src = cache.get(t.src)
        if src is None:
            src = _pack_address(conn.family, cache, t.src)
        dst = cache.get(t.dst)
        if dst is None:
            dst = _pack_address(conn.family, cache, t.dst)
        head, ip, v_src, v_dst, proto, num, sport, dport = layout
        return _TUPLE_LAYOUT[conn.family].pack(_nla_head(atype, head), ip, v_src, src, v_dst, dst, proto, num,
                                              conn.proto, sport, t.sport, dport, t.dport)
    except (KeyError, OSError, ValueError, struct.error) as e:
        raise ConntrackError(f"conntrack entry {_describe(conn)}: cannot encode its tuple ({e})") from None


def _nla_head(atype: int, size: int) -> bytes:
    return NLATTR.pack(size, atype | NLA_F_NESTED)


def _pack_address(family: int, cache: dict[str, bytes], text: str) -> bytes:
    if len(cache) >= ADDRESS_CACHE:
        cache.clear()
    raw = cache[text] = socket.inet_pton(family, text)
    return raw


def _tuple_layout(family: int) -> tuple[struct.Struct, tuple]:
    """The struct and constant attribute headers of a tuple nest of the family."""
    src_attr, dst_attr, alen = _ADDR[family]
    ip_len = 4 + 2 * (4 + alen)
    proto_len = 4 + 3 * 8  # number (1 byte) and two ports, each padded to 8
    fmt = f">4s4s4s{alen}s4s{alen}s4s4sB3x4sH2x4sH2x"
    heads = (4 + ip_len + proto_len,
             NLATTR.pack(ip_len, CTA_TUPLE_IP | NLA_F_NESTED),
             NLATTR.pack(4 + alen, src_attr), NLATTR.pack(4 + alen, dst_attr),
             NLATTR.pack(proto_len, CTA_TUPLE_PROTO | NLA_F_NESTED),
             NLATTR.pack(5, CTA_PROTO_NUM), NLATTR.pack(6, CTA_PROTO_SRC_PORT),
             NLATTR.pack(6, CTA_PROTO_DST_PORT))
    return struct.Struct(fmt), heads


_TUPLE_LAYOUT: dict[int, struct.Struct] = {}
# family -> (address text -> packed address, constant headers)
_PACKED: dict[int, tuple[dict[str, bytes], tuple]] = {}
for _family in _ADDR:
    _TUPLE_LAYOUT[_family], _heads = _tuple_layout(_family)
    _PACKED[_family] = ({}, _heads)


# -- decoding --------------------------------------------------------------
# The pure Python decoder: the reference csrc/ctfeed.c is tested against (recorded and
# synthesized messages, malformed ones included); CtNetlink itself decodes in C.


def _events_of(buf: Buffer, n: int, skip_portid: int = 0) -> list[CtEvent]:
    """The events in buf[:n], as the C decoder's EVENTS mode reads them."""
    out = []
    for mtype, flags, _seq, pid, off, length in messages(buf, n):
        if pid == skip_portid and pid != 0:
            continue  # the echo of a change we made
        if mtype == _MSG_DELETE:
            kind = EventType.DESTROY
        elif mtype == _MSG_NEW:
            # the kernel flags the first event of an entry CREATE|EXCL, later ones neither
            new = flags & (NLM_F_CREATE | NLM_F_EXCL) == NLM_F_CREATE | NLM_F_EXCL
            kind = EventType.NEW if new else EventType.UPDATE
        else:
            continue
        conn = _parse(buf, off, length)
        if conn is not None:
            out.append(CtEvent(kind, conn))
    return out

_HEAD = NLMSG_HDRLEN + _NFGENMSG.size


def _parse(buf: Buffer, off: int, length: int) -> Conn | None:
    """The Conn in one ctnetlink message, or None for entries we do not
    offload (not IPv4/IPv6, not TCP/UDP) and for messages missing a tuple.
    Any other attribute may be missing (a DESTROY event carries no timeout
    and no TCP state): its field is then None (0 for status, mark, zone)."""
    if length < _HEAD:
        return None
    family = buf[off + NLMSG_HDRLEN]
    if family not in _ADDR:
        return None
    top = attrs(buf, off + _HEAD, off + length)
    orig_span = top.get(CTA_TUPLE_ORIG)
    orig = _tuple_of(buf, family, orig_span)
    reply = _tuple_of(buf, family, top.get(CTA_TUPLE_REPLY))
    if orig is None or reply is None or orig[0] != reply[0]:
        return None
    # CTA_ZONE is there when the zone covers both directions; a zone of the
    # original direction only (nft "ct original zone set") sits inside that
    # tuple. Either way it is the zone a lookup by the original tuple needs.
    zone = value(buf, top.get(CTA_ZONE), BE16)
    if zone is None:
        zone = value(buf, nested(buf, orig_span).get(CTA_TUPLE_ZONE), BE16)
    tcp_state = None
    protoinfo = top.get(CTA_PROTOINFO)
    if protoinfo is not None:
        tcp = nested(buf, protoinfo).get(CTA_PROTOINFO_TCP)
        if tcp is not None:
            tcp_state = u8(buf, nested(buf, tcp).get(CTA_PROTOINFO_TCP_STATE))
    help_span = top.get(CTA_HELP)
    return Conn(
        family=family,
        proto=orig[0],
        orig=orig[1],
        reply=reply[1],
        status=value(buf, top.get(CTA_STATUS), BE32) or 0,
        tcp_state=tcp_state,
        mark=value(buf, top.get(CTA_MARK), BE32) or 0,
        zone=zone or 0,
        helper=None if help_span is None else string(buf, nested(buf, help_span).get(CTA_HELP_NAME)),
        timeout=value(buf, top.get(CTA_TIMEOUT), BE32),
        ct_id=value(buf, top.get(CTA_ID), BE32),
    )


def _tuple_of(buf: Buffer, family: int, span: Span | None) -> tuple[int, Tuple] | None:
    if span is None:
        return None
    t = attrs(buf, span[0], span[1])
    ip_span, proto_span = t.get(CTA_TUPLE_IP), t.get(CTA_TUPLE_PROTO)
    if ip_span is None or proto_span is None:
        return None
    proto = attrs(buf, proto_span[0], proto_span[1])
    num = u8(buf, proto.get(CTA_PROTO_NUM))
    if num not in _TRACKED:
        return None
    sport = value(buf, proto.get(CTA_PROTO_SRC_PORT), BE16)
    dport = value(buf, proto.get(CTA_PROTO_DST_PORT), BE16)
    src_attr, dst_attr, alen = _ADDR[family]
    ip = attrs(buf, ip_span[0], ip_span[1])
    src, dst = ip.get(src_attr), ip.get(dst_attr)
    if (src is None or dst is None or sport is None or dport is None
            or src[1] - src[0] != alen or dst[1] - dst[0] != alen):
        return None
    return num, Tuple(_address(family, bytes(buf[src[0]:src[1]])),
                      _address(family, bytes(buf[dst[0]:dst[1]])),
                      _PORTS.setdefault(sport, sport), _PORTS.setdefault(dport, dport))


# One object per distinct address and port, shared by every connection that has it: a
# router's connections have few distinct addresses, and a million offloaded connections
# would otherwise hold four strings and four integers each (about 300 bytes). Bounded: an
# address cache past ADDRESS_CACHE entries starts again (a flood of distinct addresses
# costs the sharing, never unbounded memory); ports are at most 65536.
ADDRESS_CACHE = 65536
_ADDRESSES: dict[bytes, str] = {}
_PORTS: dict[int, int] = {}


def _address(family: int, raw: bytes) -> str:
    text = _ADDRESSES.get(raw)  # the length tells the family: 4 or 16 bytes
    if text is None:
        if len(_ADDRESSES) >= ADDRESS_CACHE:
            _ADDRESSES.clear()
        text = _ADDRESSES[raw] = socket.inet_ntop(family, raw)
    return text
