"""Python view of the ABI in ebpf/include/pyflow_abi.h, through cffi.

Nothing here declares a layout: the structs come from the header via
``pyflow._native``. This module only fills them from Python values, in the byte
order the header's comments give (addresses and ports in network order, VLAN and
PPPoE ids in host order).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from ._native import ffi, lib

KEY_TYPE = "struct pyflow_flow_key"
FLOW_TYPE = "struct pyflow_flow"
KEY_SIZE = ffi.sizeof(KEY_TYPE)
FLOW_SIZE = ffi.sizeof(FLOW_TYPE)

MAP_FLOWS = ffi.string(lib.PYFLOW_MAP_FLOWS).decode()
MAP_STATS = ffi.string(lib.PYFLOW_MAP_STATS).decode()
MAP_TX_PORTS = ffi.string(lib.PYFLOW_MAP_TX_PORTS).decode()

FAMILY_IPV4 = lib.PYFLOW_FAMILY_IPV4
FAMILY_IPV6 = lib.PYFLOW_FAMILY_IPV6
PROTO_TCP = socket.IPPROTO_TCP
PROTO_UDP = socket.IPPROTO_UDP
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8


def _reasons() -> list[str]:
    names: dict[int, str] = {}
    for name in dir(lib):
        if name.startswith("PYFLOW_R_") and name != "PYFLOW_R__COUNT":
            names[getattr(lib, name)] = name[len("PYFLOW_R_"):].lower()
    return [names[i] for i in range(lib.PYFLOW_R__COUNT)]


REASONS: list[str] = _reasons()
"""Reason names indexed by enum pyflow_reason value: 'forwarded', 'miss', ..."""


def _addr_words(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, bytes]:
    """(family, 16 bytes) for an address. inet_pton first: it is several times faster than
    ipaddress, and the control plane packs two keys and two actions per connection (eight
    addresses, mostly the same few: remembered, up to a bound)."""
    hit = _ADDRS.get(addr) if addr.__class__ is str else None
    if hit is not None:
        return hit
    words = _addr_words_uncached(addr)
    if addr.__class__ is str:
        if len(_ADDRS) >= 65536:
            _ADDRS.clear()
        _ADDRS[addr] = words  # type: ignore[index]
    return words


_ADDRS: dict[str, tuple[int, bytes]] = {}


def _addr_words_uncached(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, bytes]:
    if isinstance(addr, str):
        if ":" not in addr:  # an IPv4 address never has one; skipping the failed try is cheaper
            try:
                return FAMILY_IPV4, socket.inet_pton(socket.AF_INET, addr) + _V4_PAD
            except OSError:
                pass
        try:
            return FAMILY_IPV6, socket.inet_pton(socket.AF_INET6, addr)
        except OSError:
            raise ValueError(f"not an IP address: {addr!r}") from None
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return FAMILY_IPV4, ip.packed + bytes(12)
    return FAMILY_IPV6, ip.packed


_V4_PAD = bytes(12)


def _put_addr(dst, addr) -> int:
    family, raw = _addr_words(addr)
    ffi.memmove(dst, raw, 16)
    return family


def _put_port(port: int) -> int:
    """A port as the __be16 field holds it (network order read as a native integer)."""
    return socket.htons(port)


@dataclass(frozen=True)
class FlowKey:
    """One direction of a connection, as the datapath sees it arriving."""

    ifindex: int
    proto: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    vlan_outer: int = 0
    vlan_inner: int = 0
    pppoe_sid: int = 0

    def to_c(self, out=None):
        k = out if out is not None else ffi.new(KEY_TYPE + " *")
        ffi.memmove(k, bytes(KEY_SIZE), KEY_SIZE)
        k.ifindex = self.ifindex
        k.vlan_outer = self.vlan_outer
        k.vlan_inner = self.vlan_inner
        k.pppoe_sid = self.pppoe_sid
        fam_s = _put_addr(k.saddr, self.saddr)
        fam_d = _put_addr(k.daddr, self.daddr)
        if fam_s != fam_d:
            raise ValueError(f"address families differ: {self.saddr} -> {self.daddr}")
        k.family = fam_s
        k.proto = self.proto
        k.sport = _put_port(self.sport)
        k.dport = _put_port(self.dport)
        return k


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


@dataclass(frozen=True)
class FlowAction:
    """What the fast path does to a hit. NAT fields set -> the matching flag is set."""

    out_ifindex: int
    tx_port: int
    mtu: int
    in_mac: str | bytes
    dmac: str | bytes
    smac: str | bytes
    nat_saddr: str | None = None
    nat_sport: int | None = None
    nat_daddr: str | None = None
    nat_dport: int | None = None
    vlan_outer_tci: int | None = None
    vlan_outer_tpid: int = ETH_P_8021Q
    vlan_inner_tci: int | None = None
    pppoe_sid: int | None = None

    def flags(self) -> int:
        f = 0
        if self.nat_saddr is not None or self.nat_sport is not None:
            f |= lib.PYFLOW_ACT_SNAT
        if self.nat_daddr is not None or self.nat_dport is not None:
            f |= lib.PYFLOW_ACT_DNAT
        if self.vlan_outer_tci is not None:
            f |= lib.PYFLOW_ACT_VLAN_OUTER
        if self.vlan_inner_tci is not None:
            if self.vlan_outer_tci is None:
                raise ValueError("an inner VLAN tag needs an outer one")
            f |= lib.PYFLOW_ACT_VLAN_INNER
        if self.pppoe_sid is not None:
            if not 0 < self.pppoe_sid < 0xFFFF:
                raise ValueError(f"PPPoE session id out of range: {self.pppoe_sid}")
            f |= lib.PYFLOW_ACT_PPPOE
        return f

    def fill(self, a, key: FlowKey) -> None:
        """Fill a ``struct pyflow_flow_action``; NAT defaults to the key's own values."""
        a.out_ifindex = self.out_ifindex
        a.tx_port = self.tx_port
        a.mtu = self.mtu
        a.flags = self.flags()
        _put_addr(a.nat_saddr, self.nat_saddr if self.nat_saddr is not None else key.saddr)
        _put_addr(a.nat_daddr, self.nat_daddr if self.nat_daddr is not None else key.daddr)
        a.nat_sport = _put_port(self.nat_sport if self.nat_sport is not None else key.sport)
        a.nat_dport = _put_port(self.nat_dport if self.nat_dport is not None else key.dport)
        ffi.memmove(a.in_mac, mac_bytes(self.in_mac), 6)
        ffi.memmove(a.dmac, mac_bytes(self.dmac), 6)
        ffi.memmove(a.smac, mac_bytes(self.smac), 6)
        a.encap.vlan_outer_tpid = socket.htons(self.vlan_outer_tpid) if self.vlan_outer_tci is not None else 0
        a.encap.vlan_outer_tci = self.vlan_outer_tci or 0
        a.encap.vlan_inner_tci = self.vlan_inner_tci or 0
        a.encap.pppoe_sid = self.pppoe_sid or 0


def flow_value(action: FlowAction, key: FlowKey, out=None):
    """A zeroed ``struct pyflow_flow`` (counters cleared) holding ``action``."""
    v = out if out is not None else ffi.new(FLOW_TYPE + " *")
    ffi.memmove(v, bytes(FLOW_SIZE), FLOW_SIZE)
    action.fill(v.action, key)
    return v


# ---- bytes straight from Python values ---------------------------------------------------
# The control plane packs two keys and two values per connection. Filling a cffi struct
# field by field costs about 4 us; one struct.pack about 1 us. The struct formats below are
# derived from cffi's view of the header (offsets and sizes), so no layout is written down
# here; only the order in which the packers pass their values is, and that order is checked
# against the header at import. Should the header change shape, or a value be out of range
# for its field, the cffi path above does the work (and raises its own errors), so both
# paths give the same bytes and the same exceptions.

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _leaves(ctype, prefix: str = "", base: int = 0) -> list[tuple[str, int, int, bool]]:
    """(dotted name, offset, size, is array) of every field, nested structs flattened."""
    out = []
    for name, f in ctype.fields:
        t, off = f.type, base + f.offset
        if t.kind == "struct":
            out += _leaves(t, f"{prefix}{name}.", off)
        else:
            out.append((prefix + name, off, ffi.sizeof(t), t.kind == "array"))
    return out


def _layout(ctype_name: str) -> tuple[struct.Struct | None, tuple[str, ...]]:
    """A struct.Struct for a header struct (fields named pad skipped, arrays as bytes) and the
    order of its values, arrays named with their size: ("ifindex", ..., "saddr[16]", ...)."""
    ctype = ffi.typeof(ctype_name)
    fmt, pos, names = "=", 0, []
    for name, off, size, is_array in _leaves(ctype):
        if off > pos:
            fmt += f"{off - pos}x"
        if name.rsplit(".", 1)[-1] == "pad":
            fmt += f"{size}x"
        elif is_array:
            fmt += f"{size}s"
            names.append(f"{name}[{size}]")
        elif size in _CODES:
            fmt += _CODES[size]
            names.append(name)
        else:
            return None, ()
        pos = off + size
    if ffi.sizeof(ctype) > pos:
        fmt += f"{ffi.sizeof(ctype) - pos}x"
    packer = struct.Struct(fmt)
    return (packer if packer.size == ffi.sizeof(ctype) else None), tuple(names)


# The order the packers below pass values in.
_KEY_ORDER = ("ifindex", "vlan_outer", "vlan_inner", "pppoe_sid", "family", "proto", "sport", "dport",
              "saddr[16]", "daddr[16]")
_FLOW_ORDER = ("action.out_ifindex", "action.tx_port", "action.mtu", "action.flags", "action.nat_sport",
               "action.nat_dport", "action.nat_saddr[16]", "action.nat_daddr[16]", "action.in_mac[6]",
               "action.dmac[6]", "action.smac[6]", "action.encap.vlan_outer_tpid",
               "action.encap.vlan_outer_tci", "action.encap.vlan_inner_tci", "action.encap.pppoe_sid",
               "counters.packets", "counters.bytes", "counters.last_seen_ns", "counters.closing")
_KEY, _key_order = _layout(KEY_TYPE)
_FLOW, _flow_order = _layout(FLOW_TYPE)
if _key_order != _KEY_ORDER:
    _KEY = None
if _flow_order != _FLOW_ORDER:
    _FLOW = None
_FAST_ERRORS = (struct.error, ValueError, TypeError, OverflowError, AttributeError)
_htons = socket.htons


def _pack_key(key: FlowKey) -> bytes:
    fam_s, saddr = _addr_words(key.saddr)
    fam_d, daddr = _addr_words(key.daddr)
    if fam_s != fam_d:
        raise ValueError(f"address families differ: {key.saddr} -> {key.daddr}")
    return _KEY.pack(key.ifindex, key.vlan_outer, key.vlan_inner, key.pppoe_sid, fam_s, key.proto,  # type: ignore[union-attr]
                     _htons(key.sport), _htons(key.dport), saddr, daddr)


def _pack_value(a: FlowAction, key: FlowKey) -> bytes:
    flags = a.flags()
    _, nat_saddr = _addr_words(a.nat_saddr if a.nat_saddr is not None else key.saddr)
    _, nat_daddr = _addr_words(a.nat_daddr if a.nat_daddr is not None else key.daddr)
    outer = a.vlan_outer_tci is not None
    return _FLOW.pack(  # type: ignore[union-attr]
        a.out_ifindex, a.tx_port, a.mtu, flags,
        _htons(a.nat_sport if a.nat_sport is not None else key.sport),
        _htons(a.nat_dport if a.nat_dport is not None else key.dport),
        nat_saddr, nat_daddr, mac_bytes(a.in_mac), mac_bytes(a.dmac), mac_bytes(a.smac),
        _htons(a.vlan_outer_tpid) if outer else 0, a.vlan_outer_tci or 0, a.vlan_inner_tci or 0,
        a.pppoe_sid or 0, 0, 0, 0, 0)


def key_bytes(key: FlowKey) -> bytes:
    """The key as the map holds it. Remembered on the (frozen) key: the control plane asks
    for the same key's bytes on every keep-alive tick."""
    cached = getattr(key, "_bytes", None)
    if cached is not None:
        return cached
    raw = None
    if _KEY is not None:
        try:
            raw = _pack_key(key)
        except _FAST_ERRORS:
            raw = None  # the cffi path below raises the error it always raised
    if raw is None:
        raw = bytes(ffi.buffer(key.to_c()))
    # Not a field: equality, hash and repr do not see it. Set as an attribute, not through
    # key.__dict__, which would give every key a dict of its own (CPython keeps attributes
    # inline otherwise), one more object for the garbage collector to walk per key.
    object.__setattr__(key, "_bytes", raw)
    return raw


def value_bytes(action: FlowAction, key: FlowKey) -> bytes:
    """``flow_value(action, key)`` as bytes (counters zero)."""
    if _FLOW is not None:
        try:
            return _pack_value(action, key)
        except _FAST_ERRORS:
            pass
    return bytes(ffi.buffer(flow_value(action, key)))


CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; Python's time module does not name it


def datapath_clock_ns() -> int:
    """Now, on the clock of ``counters.last_seen_ns`` (bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
