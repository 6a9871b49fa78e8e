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
# through object.__setattr__ (about 2.7 us for a Conn). Setting the slots through their
# descriptors directly gives the same object in about a fifth of that; the field lists are
# checked here so that a field added to either class fails the import, not the decoding.
_CONN_FIELDS = ("family", "proto", "orig", "reply", "status", "tcp_state", "mark", "zone", "helper",
                "timeout", "ct_id")
_TUPLE_FIELDS = ("src", "dst", "sport", "dport")
for _cls, _names in ((Conn, _CONN_FIELDS), (Tuple, _TUPLE_FIELDS)):
    if tuple(f.name for f in dataclasses.fields(_cls)) != _names:
        raise ImportError(f"ctfeed builds {_cls.__name__} with fields {_names}: the class changed")
(_c_family, _c_proto, _c_orig, _c_reply, _c_status, _c_tcp_state, _c_mark, _c_zone, _c_helper,
 _c_timeout, _c_ct_id) = (Conn.__dict__[n].__set__ for n in _CONN_FIELDS)
_t_src, _t_dst, _t_sport, _t_dport = (Tuple.__dict__[n].__set__ for n in _TUPLE_FIELDS)
_new = object.__new__


def _tuple(src: str, dst: str, sport: int, dport: int) -> Tuple:
    t = _new(Tuple)
    _t_src(t, src)
    _t_dst(t, dst)
    _t_sport(t, sport)
    _t_dport(t, dport)
    return t


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
        a4, a6, ports, kinds, new, tup = _ADDR4, _ADDR6, _PORTS, _KINDS, _new, _tuple
        events = mode == EVENTS
        for (status, mark, timeout, ct_id, zone, osp, odp, rsp, rdp, ev, fam, proto, tcp_state, has,
             hlen, osrc, odst, rsrc, rdst, helper) in ENTRY.iter_unpack(self._raw[:n * ENTRY.size]):
            cache = a4 if fam == socket.AF_INET else a6
            os_ = cache.get(osrc) or _address(fam, osrc)
            od = cache.get(odst) or _address(fam, odst)
            rs = cache.get(rsrc) or _address(fam, rsrc)
            rd = cache.get(rdst) or _address(fam, rdst)
            conn = new(Conn)
            _c_family(conn, fam)
            _c_proto(conn, proto)
            _c_orig(conn, tup(os_, od, ports.setdefault(osp, osp), ports.setdefault(odp, odp)))
            _c_reply(conn, tup(rs, rd, ports.setdefault(rsp, rsp), ports.setdefault(rdp, rdp)))
            _c_status(conn, status)
            _c_tcp_state(conn, tcp_state if has & _HAS_TCP_STATE else None)
            _c_mark(conn, mark)
            _c_zone(conn, zone)
            _c_helper(conn, helper[:hlen].decode("ascii", "replace") if hlen else None)
            _c_timeout(conn, timeout if has & _HAS_TIMEOUT else None)
            _c_ct_id(conn, ct_id if has & _HAS_ID else None)
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
