"""Python view of the ABI in ebpf/include/pyflow_abi.h, through cffi.

Nothing here declares a layout: the structs come from the header via
``pyflow._native``. This module only fills them from Python values, in the byte
order the header's comments give (addresses and ports in network order, VLAN and
PPPoE ids in host order).
"""

from __future__ import annotations

import ipaddress
import socket
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
    ipaddress, and the control plane packs two keys and two actions per connection."""
    if isinstance(addr, str):
        try:
            return FAMILY_IPV4, socket.inet_pton(socket.AF_INET, addr) + bytes(12)
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


def key_bytes(key: FlowKey) -> bytes:
    return bytes(ffi.buffer(key.to_c()))


def value_bytes(action: FlowAction, key: FlowKey) -> bytes:
    return bytes(ffi.buffer(flow_value(action, key)))


CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; Python's time module does not name it


def datapath_clock_ns() -> int:
    """Now, on the clock of ``counters.last_seen_ns`` (bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
