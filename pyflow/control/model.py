"""Values the control plane passes between its parts, and the adapters it is given.

The engine (pyflow/control/engine.py) takes its conntrack source, its path
resolver and its flow map as parameters, so that policy can be tested with fakes
and without root; the real adapters live in conntrack.py (ctnetlink) and paths.py
(rtnetlink).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# conntrack status bits (<linux/netfilter/nf_conntrack_common.h>, enum ip_conntrack_status)
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_DYING = 1 << 9
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15

# TCP conntrack states (enum tcp_conntrack)
TCP_CONNTRACK_ESTABLISHED = 3


@dataclass(frozen=True)
class Tuple:
    """One direction of a conntrack entry: addresses as text, ports as integers."""

    src: str
    dst: str
    sport: int
    dport: int


@dataclass(frozen=True)
class Conn:
    """A conntrack entry as the control plane needs it.

    orig is the tuple of the first packet (A:a -> B:b); reply the tuple the
    answer carries after NAT (B':b' -> A':a'). NAT is read off the pair, never
    invented: the original direction leaves as A':a' -> B':b', the reply as
    B:b -> A:a.
    """

    family: int  # socket.AF_INET / AF_INET6
    proto: int  # 6 / 17
    orig: Tuple
    reply: Tuple
    status: int = 0
    tcp_state: int | None = None  # None for UDP, or when the kernel did not say
    mark: int = 0
    zone: int = 0
    helper: str | None = None
    timeout: int | None = None
    ct_id: int | None = None

    @property
    def ident(self) -> tuple:
        """Stable identity across events (the kernel's id is not always reported)."""
        return (self.family, self.proto, self.zone, self.orig)


class EventType(enum.Enum):
    NEW = "new"
    UPDATE = "update"
    DESTROY = "destroy"


@dataclass(frozen=True)
class CtEvent:
    type: EventType
    conn: Conn


class Conntrack(Protocol):
    """The conntrack side the engine drives (ctnetlink in production)."""

    lost_events: int

    def dump(self) -> list[Conn]: ...

    def poll(self, timeout: float) -> list[CtEvent | None]:
        """Events received within timeout seconds. On an overrun (ENOBUFS) this
        increments lost_events and returns an event list ending with a RESYNC
        marker (`None`) so that the caller reconciles from dump()."""
        ...

    def refresh(self, conn: Conn, timeout_s: int) -> bool:
        """Extend the entry's timeout; False if the entry is gone."""
        ...

    def mark_offloaded(self, conn: Conn, offloaded: bool) -> bool:
        """Set/clear the configured offload mark bit and, for TCP, the be-liberal
        window-tracking flags on both directions; False if the entry is gone."""
        ...


@dataclass(frozen=True)
class Egress:
    """Where one direction of a connection leaves and how its frames look."""

    ifindex: int
    ifname: str
    smac: bytes  # egress device address
    dmac: bytes  # next hop's address (resolved neighbour)
    mtu: int  # L3 MTU of the egress (the VLAN / PPPoE device's own MTU)
    vlan_outer_tci: int | None = None
    vlan_outer_tpid: int = 0x8100
    vlan_inner_tci: int | None = None
    pppoe_sid: int | None = None
    lower_ifindex: int | None = None  # the Ethernet device frames really leave on, when encapsulated


class NotYet(Exception):
    """The path exists but cannot be used yet (neighbour unresolved): retry when it appears."""


class NoPath(Exception):
    """No usable path (no route, unreachable, blackhole, local delivery)."""


class PathResolver(Protocol):
    def egress(self, family: int, src: str, dst: str, *, iif: int | None, mark: int) -> Egress:
        """Resolve the forwarding path of a packet src -> dst arriving on iif.

        Raises NotYet or NoPath."""
        ...

    def device_of(self, family: int, addr: str, *, mark: int) -> int:
        """The device a route to addr leaves through (the device on which addr lives)."""
        ...

    def mac_of(self, ifindex: int) -> bytes: ...


PathListener = Callable[[str, int], None]
"""Called by a path watcher with a change kind ('route', 'neigh', 'link') and an ifindex (0 = any)."""


class HwRefused(Exception):
    """The hardware adapter would not place a flow (a full table, a match or action the NIC
    cannot do, no flower in the kernel); ``reason`` is a short label for counting. The engine
    carries that flow on the XDP path instead."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
