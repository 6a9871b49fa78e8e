"""The conntrack feed's native half, seen from Python: ctnetlink datagrams decoded by
csrc/ctfeed.c into arrays of ``struct pyflow_ct_entry``, turned here into the engine's
Conn and CtEvent objects; and batches of change requests sent in one sendmsg().

One C call receives and decodes every datagram queued on a socket (up to a bound), so
the per-entry work left to Python is building the objects: the array is read with one
``struct.iter_unpack`` over it, addresses and ports are shared objects from caches
(a router's connections have few distinct addresses), and nothing else is done per
entry. CtNetlink (conntrack.py) owns the sockets and uses this module; the pure Python
decoder there (conntrack._parse) is the reference the tests hold this one to.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct
from typing import Any

from pyflow._native import ffi, lib
from pyflow.control.model import Conn, CtEvent, EventType, Tuple

DUMP = lib.PYFLOW_CT_DUMP
EVENTS = lib.PYFLOW_CT_EVENTS
NO_ANSWER = lib.PYFLOW_NL_NO_ANSWER
MIN_ENTRY = lib.PYFLOW_CT_MIN_ENTRY

# struct pyflow_ct_entry, field by field (csrc/pyflow_native.h); checked against the
# compiler's layout below, so a header change that forgets this fails at import
ENTRY = struct.Struct("=IIIIHHHHHBBBBBB16s16s16s16s32s")
if ENTRY.size != ffi.sizeof("struct pyflow_ct_entry"):
    raise ImportError(f"struct pyflow_ct_entry is {ffi.sizeof('struct pyflow_ct_entry')} bytes, "
                      f"ctfeed.ENTRY {ENTRY.size}")

_HAS_TCP_STATE = lib.PYFLOW_CT_HAS_TCP_STATE
_HAS_TIMEOUT = lib.PYFLOW_CT_HAS_TIMEOUT
_HAS_ID = lib.PYFLOW_CT_HAS_ID
_KINDS = {lib.PYFLOW_CT_NEW: EventType.NEW, lib.PYFLOW_CT_UPDATE: EventType.UPDATE,
          lib.PYFLOW_CT_DESTROY: EventType.DESTROY}

# One object per distinct address and port, shared by every connection that has it (as
# conntrack.py's decoder does): keyed by the 16 bytes the entry carries, one cache per
# family (an IPv4 address is its 4 bytes and 12 zeros). Bounded: past ADDRESS_CACHE
# entries a cache starts again, so a flood of distinct addresses costs the sharing, never
# unbounded memory.
ADDRESS_CACHE = 65536
_ADDR4: dict[bytes, str] = {}
_ADDR6: dict[bytes, str] = {}
_PORTS: dict[int, int] = {}


# Conn and Tuple are frozen dataclasses with slots: their generated __init__ sets each field
# through object.__setattr__ (about 2.7 us for a Conn), and calling each slot's descriptor
# takes about a fifth of that. Faster still (a third of the descriptor calls): an object of a
# plain class with the same slots, its fields set by ordinary attribute stores (which the
# interpreter does without a call), then made a Conn or Tuple by assigning its class. Both
# the field lists and that assignment are checked here, so that a change to either class
# fails the import, not the decoding.
_CONN_FIELDS = ("family", "proto", "orig", "reply", "status", "tcp_state", "mark", "zone", "helper",
                "timeout", "ct_id")
_TUPLE_FIELDS = ("src", "dst", "sport", "dport")


class _ConnSlots:
    __slots__ = _CONN_FIELDS


class _TupleSlots:
    __slots__ = _TUPLE_FIELDS


for _cls, _names, _builder in ((Conn, _CONN_FIELDS, _ConnSlots), (Tuple, _TUPLE_FIELDS, _TupleSlots)):
    if tuple(f.name for f in dataclasses.fields(_cls)) != _names or getattr(_cls, "__slots__", ()) != _names:
        raise ImportError(f"ctfeed builds {_cls.__name__} with fields {_names}: the class changed")
    _probe: Any = _builder()
    _probe.__class__ = _cls  # TypeError if the layouts differ


def _address(family: int, raw: bytes) -> str:
    cache = _ADDR4 if family == socket.AF_INET else _ADDR6
    if len(cache) >= ADDRESS_CACHE:
        cache.clear()
    text = cache[raw] = socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)
    return text


class Feed:
    """Buffers for one socket's decoding: an entry array sized for ``datagram`` byte
    datagrams (``room`` of them between two conversions) and a result record. Counters
    of what was not an entry accumulate in ``ignored`` and ``malformed``."""

    def __init__(self, datagram: int = 1 << 16, room: int = 4) -> None:
        self.cap = (datagram // MIN_ENTRY + 1) * room
        self.out = ffi.new("struct pyflow_ct_entry[]", self.cap)
        self.res = ffi.new("struct pyflow_ct_result *")
        self._raw = ffi.buffer(self.out)
        self.ignored = 0
        self.malformed = 0
        self.echoes = 0

    def _reset(self) -> Any:
        res = self.res
        ffi.memmove(res, bytes(ffi.sizeof(res[0])), ffi.sizeof(res[0]))
        return res

    def _account(self, res: Any) -> None:
        self.ignored += res.ignored
        self.malformed += res.malformed
        self.echoes += res.echoes

    def decode(self, buf: bytes | bytearray | memoryview, n: int, mode: int = EVENTS, seq: int = 0,
               skip_portid: int = 0) -> tuple[list[Any], Any]:
        """Entries of one datagram already in memory (buf[:n]): Conns (DUMP) or CtEvents
        (EVENTS), and the result record (done, err, counters)."""
        if n > len(buf):
            raise ValueError(f"{n} bytes asked of a {len(buf)}-byte buffer")
        need = n // MIN_ENTRY + 1
        if need > self.cap:
            raise ValueError(f"a {n}-byte buffer may hold {need} entries, room for {self.cap}")
        res = self._reset()
        src = ffi.from_buffer(buf)
        ret = lib.pyflow_ct_decode(src, n, mode, seq & 0xFFFFFFFF, skip_portid, self.out, self.cap, res)
        if ret < 0:  # cannot happen with the room checked above
            raise OSError(-ret, f"ctnetlink decode: {errno.errorcode.get(-ret, -ret)}")
        self._account(res)
        return self.build(res.n, mode), res

    def recv(self, fd: int, buf: bytearray, max_datagrams: int, mode: int, seq: int = 0,
             skip_portid: int = 0) -> tuple[list[Any], Any, int]:
        """Receive and decode what is queued on fd (at most max_datagrams datagrams, as much
        as the entry array takes): (objects, result record, 0 or the negative errno)."""
        res = self._reset()
        ret = lib.pyflow_ct_recv(fd, ffi.from_buffer(buf), len(buf), max_datagrams, mode, seq & 0xFFFFFFFF,
                                 skip_portid, self.out, self.cap, res)
        self._account(res)
        return self.build(res.n, mode), res, ret

    def build(self, n: int, mode: int) -> list[Any]:
        """The first n entries of the array as Conns (DUMP) or CtEvents (EVENTS)."""
        if not n:
            return []
        out: list[Any] = []
        append = out.append
        a4, a6, ports, kinds = _ADDR4, _ADDR6, _PORTS, _KINDS
        events = mode == EVENTS
        conn_cls, tuple_cls = Conn, Tuple
        conn_slots: Any = _ConnSlots  # objects that become Conns and Tuples (above)
        tuple_slots: Any = _TupleSlots
        for (status, mark, timeout, ct_id, zone, osp, odp, rsp, rdp, ev, fam, proto, tcp_state, has,
             hlen, osrc, odst, rsrc, rdst, helper) in ENTRY.iter_unpack(self._raw[:n * ENTRY.size]):
            cache = a4 if fam == socket.AF_INET else a6
            orig = tuple_slots()
            orig.src = cache.get(osrc) or _address(fam, osrc)
            orig.dst = cache.get(odst) or _address(fam, odst)
            orig.sport = ports.setdefault(osp, osp)
            orig.dport = ports.setdefault(odp, odp)
            orig.__class__ = tuple_cls
            reply = tuple_slots()
            reply.src = cache.get(rsrc) or _address(fam, rsrc)
            reply.dst = cache.get(rdst) or _address(fam, rdst)
            reply.sport = ports.setdefault(rsp, rsp)
            reply.dport = ports.setdefault(rdp, rdp)
            reply.__class__ = tuple_cls
            conn = conn_slots()
            conn.family = fam
            conn.proto = proto
            conn.orig = orig
            conn.reply = reply
            conn.status = status
            conn.tcp_state = tcp_state if has & _HAS_TCP_STATE else None
            conn.mark = mark
            conn.zone = zone
            conn.helper = helper[:hlen].decode("ascii", "replace") if hlen else None
            conn.timeout = timeout if has & _HAS_TIMEOUT else None
            conn.ct_id = ct_id if has & _HAS_ID else None
            conn.__class__ = conn_cls
            append(CtEvent(kinds[ev], conn) if events else conn)
        return out


def drain(fd: int, buf: bytearray, max_datagrams: int = 1 << 20) -> tuple[int, int, int]:
    """Read and drop what is queued on fd: (messages dropped, overruns met, 0 or -errno)."""
    messages = ffi.new("uint64_t *")
    overruns = ffi.new("uint32_t *")
    ret = lib.pyflow_ct_drain(fd, ffi.from_buffer(buf), len(buf), max_datagrams, messages, overruns)
    return int(messages[0]), int(overruns[0]), ret


def send_batch(fd: int, msgs: bytes, first_seq: int, n: int, buf: bytearray,
               timeout_s: float) -> tuple[list[int], bool, int]:
    """n requests (sequence numbers first_seq ..) in one sendmsg(), and their answers:
    (per message 0, a positive errno or NO_ANSWER; whether answers were lost to a receive
    overrun; 0 or the negative errno of the send or the wait)."""
    errs = ffi.new("int32_t[]", max(n, 1))
    res = ffi.new("struct pyflow_nl_batch_result *")
    ret = lib.pyflow_nl_batch(fd, msgs, len(msgs), first_seq & 0xFFFFFFFF, n, ffi.from_buffer(buf), len(buf),
                              int(timeout_s * 1000), errs, res)
    return list(errs)[:n], bool(res.overrun), ret
