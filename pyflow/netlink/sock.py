"""Netlink sockets of our own: set-up, send, receive with a deadline, request/ACK.

Plain ``AF_NETLINK`` sockets rather than a library's, so that the caller
controls what matters on the hot paths: the receive buffer size, ENOBUFS on
overruns, non-blocking reads into one reused buffer, and a descriptor for
select()/poll(). A socket belongs to the network namespace of the thread that
creates it and stays there even if that thread later moves (setns(2) is per
thread).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Iterator

from pyflow.netlink.uapi import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDRLEN,
    SO_RCVBUFFORCE,
)
from pyflow.netlink.wire import NLMSGHDR, errno_of, messages, reply, request

RECV_SIZE = 1 << 16  # a dump datagram is at most a few pages; events and answers are smaller
REQUEST_TIMEOUT = 2.0  # the kernel answers inside sendmsg(); this only bounds a wedged kernel


def group_mask(*groups: int) -> int:
    """The bind() mask of multicast groups: group n is bit n-1."""
    mask = 0
    for g in groups:
        mask |= 1 << (g - 1)
    return mask


def open_socket(protocol: int, groups: int = 0, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking, close-on-exec netlink socket bound to ``groups`` (a group_mask)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
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


class NetlinkSocket:
    """One netlink socket with its receive buffer and request sequence numbers.

    Received datagrams land in ``buf`` (reused: what a caller keeps it must
    copy out before the next receive). Errors are OSError: the kernel's errno
    for a refused request, TimeoutError when no answer comes, EMSGSIZE for a
    datagram larger than the buffer. Not thread-safe.
    """

    def __init__(self, protocol: int, groups: int = 0, *, rcvbuf: int | None = None,
                 bufsize: int = RECV_SIZE) -> None:
        self.sock = open_socket(protocol, groups, rcvbuf)
        self.portid: int = self.sock.getsockname()[0]
        self.buf = bytearray(bufsize)
        self._size = bufsize
        self.poller = select.poll()  # public: a hot caller may poll(0) it without a call of ours
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self._seq = int(time.monotonic()) & 0xFFFF

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        """A fresh sequence number (never 0, which the kernel's own messages carry)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def wait(self, timeout: float) -> bool:
        """Whether something is queued within ``timeout`` seconds."""
        try:
            return bool(self.poller.poll(max(0, int(timeout * 1000))))
        except InterruptedError:
            return False

    def send(self, data: bytes) -> None:
        self.sock.send(data)  # unconnected: the kernel (port 0) is the default peer

    def recv(self) -> int:
        """One queued datagram into ``buf``; its length. BlockingIOError when none is queued;
        OSError(ENOBUFS) after an overrun, as the kernel reports it."""
        n = self.sock.recv_into(self.buf, self._size, socket.MSG_TRUNC)
        if n > self._size:
            raise OSError(errno.EMSGSIZE, f"message of {n} bytes truncated")
        return n

    def recv_within(self, timeout: float, what: str = "netlink") -> int:
        """recv(), waiting up to ``timeout`` seconds; TimeoutError when nothing comes."""
        try:
            return self.recv()
        except BlockingIOError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"{what}: no answer from the kernel")
            self.wait(remaining)
            try:
                return self.recv()
            except BlockingIOError:
                continue

    # -- requests ------------------------------------------------------------------------

    def request(self, msg_type: int, flags: int, body: bytes,
                timeout: float = REQUEST_TIMEOUT) -> bytearray | None:
        """Send a request and return its answer: the first message with our sequence number
        (a copy), or None for a positive ACK. OSError(errno) when the kernel refuses."""
        # Hot: a route miss is one of these. The kernel answers inside send(), so the
        # first recv almost always finds the answer alone at the start of the datagram:
        # that case is read off its header here, and only anything else walks with reply().
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF or 1
        sock = self.sock
        sock.send(request(msg_type, flags | NLM_F_REQUEST, seq, body))
        buf = self.buf
        while True:
            try:
                n = sock.recv_into(buf, self._size, socket.MSG_TRUNC)
                if n > self._size:
                    raise OSError(errno.EMSGSIZE, f"message of {n} bytes truncated")
            except BlockingIOError:
                n = self.recv_within(timeout, f"request type {msg_type}")
            if n >= NLMSG_HDRLEN:
                length, mtype, _flags, mseq, _pid = NLMSGHDR.unpack_from(buf)
                off = 0
                if mseq != seq or not NLMSG_HDRLEN <= length <= n:
                    found = reply(buf, n, seq)
                    if found is None:
                        continue  # the answer to an earlier request whose caller gave up
                    mtype, off, length = found
                if mtype == NLMSG_ERROR:
                    err = errno_of(buf, off, length)
                    if err:
                        raise OSError(err, os.strerror(err))
                    return None
                return buf[off:off + length]

    def ack(self, msg_type: int, flags: int, body: bytes, timeout: float = REQUEST_TIMEOUT) -> int:
        """Send a request asking for an ACK and wait for it: its errno (0: done). Messages the
        request returns before the ACK (a GET's entry) are skipped."""
        seq = self.next_seq()
        self.send(request(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, seq, body))
        buf = self.buf
        while True:
            n = self.recv_within(timeout, f"request type {msg_type}")
            for mtype, _flags, mseq, _pid, off, length in messages(buf, n):
                if mtype == NLMSG_ERROR and mseq == seq:
                    return errno_of(buf, off, length)

    def dump(self, msg_type: int, flags: int, body: bytes,
             timeout: float = REQUEST_TIMEOUT) -> Iterator[tuple[int, int, int, int]]:
        """Send a dump request; yield (type, flags, offset, length) of each answer message in
        ``buf`` (valid until the next one is asked for) up to NLMSG_DONE. OSError(errno) when
        the kernel refuses."""
        seq = self.next_seq()
        self.send(request(msg_type, flags | NLM_F_REQUEST, seq, body))
        buf = self.buf
        while True:
            n = self.recv_within(timeout, f"dump type {msg_type}")
            for mtype, mflags, mseq, _pid, off, length in messages(buf, n):
                if mseq != seq:
                    continue  # a late answer to an earlier request that timed out
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    _raise_for(errno_of(buf, off, length))
                    continue
                yield mtype, mflags, off, length


def _raise_for(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))
