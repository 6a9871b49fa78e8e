"""Values the control plane passes between its parts, and the adapters it is given.

The engine (pyflow/control/engine.py) takes its conntrack source, its path
resolver, its flow map, its device registry and its hardware placer as parameters,
so that policy can be tested with fakes and without root; the real adapters live in
conntrack.py (ctnetlink), paths.py (rtnetlink), pyflow.datapath.flowtable
(the BPF flow map), runner.py (devices) and pyflow.hw.offload (flower).

A connection's two flow entries are a function of the connection and its path
(``entry_fields``); an ``Offloaded`` record holds what they were written from.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyflow.datapath.abi import ETH_P_8021Q, FlowAction, FlowKey
from pyflow.datapath.flowtable import Counters

# conntrack status bits (<linux/netfilter/nf_conntrack_common.h>, enum ip_conntrack_status)
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6  # TCP sequence numbers rewritten (a helper's NAT changed a payload's length)
IPS_DYING = 1 << 9
# the kernel's name for bit 12 since it stopped marking untracked entries with it: an entry
# that clashed with another on insertion (UDP NAT races) and was merged into it
IPS_NAT_CLASH = 1 << 12
IPS_OFFLOAD = 1 << 14  # the kernel's nf flowtable carries the connection (pyflow never sets it)
IPS_HW_OFFLOAD = 1 << 15

# TCP conntrack states (enum tcp_conntrack)
TCP_CONNTRACK_ESTABLISHED = 3


@dataclass(frozen=True, slots=True)  # slots: two per connection, a million connections
class Tuple:
    """One direction of a conntrack entry: addresses as text, ports as integers."""

    src: str
    dst: str
    sport: int
    dport: int


@dataclass(frozen=True, slots=True)  # slots: no instance dict (one per connection)
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

    offload_mark: int  # the mark bit(s) mark_offloaded sets (0: none)

    def refresh(self, conn: Conn, timeout_s: int) -> bool:
        """Set the entry's timeout; False if the entry is gone."""
        ...

    def mark_offloaded(self, conn: Conn, offloaded: bool, *, timeout_s: int | None = None) -> bool:
        """Set/clear the configured offload mark bit and, for TCP, the be-liberal
        window-tracking flags on both directions, and set the timeout if one is given (in
        the same message); False if the entry is gone."""
        ...

    def timeouts(self) -> Mapping[int, int]:
        """The kernel's own timeouts of a connection that qualifies for offload, by protocol:
        TCP established and UDP stream (replied), in seconds, of this namespace."""
        ...


@dataclass(frozen=True)
class Layer:
    """One device on the way from the route's device (the one conntrack and routing see:
    eth0.7, pppoe-wan, br-lan) down to the port frames leave on, with the encapsulation the
    datapath must write when it hands a frame to this device: what the layers above it add
    (nothing for the route's device itself, the PPPoE header for the device a session runs
    over, that and the VLAN tag for the VLAN's lower device ...)."""

    ifindex: int
    ifname: str
    vlan_outer_tci: int | None = None
    vlan_outer_tpid: int = 0x8100
    vlan_inner_tci: int | None = None
    pppoe_sid: int | None = None
    # a bridge the path goes through: unless the bridge itself is managed, frames go on to the
    # port where its FDB has learned the next hop's MAC (PathResolver.below_bridge)
    bridge: bool = False
    # (code, text) when frames cannot be handed to this device as Ethernet frames with this
    # encapsulation (a ppp device, a VLAN stack the datapath cannot write): a path that would
    # leave here is refused with it
    refusal: tuple[str, str] | None = None


@dataclass(frozen=True)
class Egress:
    """Where one direction of a connection leaves and how its frames look.

    The resolver's answer (PathResolver.egress) describes the whole way down: ``layers``
    from the route's device to the lowest device it knows (a bridge's port is looked up
    separately), the other fields as seen at the route's device (no encapsulation). The
    planner picks the managed layer and makes the Egress at it (``egress_at``): no
    ``layers`` then. An Egress without layers is a path of one device (what the fakes
    give)."""

    ifindex: int
    ifname: str
    smac: bytes  # source address of the frames (the route device's, or the PPPoE session device's)
    dmac: bytes  # next hop's address (resolved neighbour, or the PPPoE concentrator)
    mtu: int  # L3 MTU of the egress (the VLAN / PPPoE device's own MTU)
    vlan_outer_tci: int | None = None
    vlan_outer_tpid: int = 0x8100
    vlan_inner_tci: int | None = None
    pppoe_sid: int | None = None
    lower_ifindex: int | None = None  # the Ethernet device frames really leave on, when encapsulated
    layers: tuple[Layer, ...] = ()
    ppp_ifindex: int = 0  # the PPP device of a PPPoE path (0: none)


def egress_at(eg: Egress, layer: Layer) -> Egress:
    """The Egress of frames handed to ``layer``'s device (one of eg's layers, or a port below
    a bridge of them): that device, that layer's encapsulation, eg's addresses and MTU.
    Raises NoPath when the layer cannot take frames."""
    if layer.refusal is not None:
        raise NoPath(layer.refusal[1], layer.refusal[0])
    encap = layer.vlan_outer_tci is not None or layer.pppoe_sid is not None
    return Egress(ifindex=layer.ifindex, ifname=layer.ifname, smac=eg.smac, dmac=eg.dmac, mtu=eg.mtu,
                  vlan_outer_tci=layer.vlan_outer_tci, vlan_outer_tpid=layer.vlan_outer_tpid,
                  vlan_inner_tci=layer.vlan_inner_tci, pppoe_sid=layer.pppoe_sid,
                  lower_ifindex=layer.ifindex if encap else None,
                  ppp_ifindex=eg.ppp_ifindex if layer.pppoe_sid is not None else 0)


class NotYet(Exception):
    """The path exists but cannot be used yet (neighbour unresolved): retry when it appears."""


# Why a connection has no usable path: a fixed word each, counted as the refusal reason
# (a metric label, so never an address or a device name: those go to the log).
NO_PATH = "no_path"  # a path refused for a reason without a word of its own
NO_ROUTE = "no_route"  # ENETUNREACH
UNREACHABLE = "unreachable_route"  # EHOSTUNREACH: an unreachable route, or forwarding off on the input
PROHIBITED = "prohibit_route"  # EACCES
BLACKHOLE = "blackhole_route"  # a blackhole route, or EINVAL that could not be told apart
RP_FILTER = "rp_filter"  # the kernel refuses the source on its input device (rp_filter, martian)
THROW_ROUTE = "throw_route"  # a throw route and no later table has one
LOCAL_DESTINATION = "local_destination"  # delivered to this host
MULTICAST_DESTINATION = "multicast_destination"  # multicast or broadcast
ROUTE_TYPE = "route_type"  # any other non-unicast route type
ENCAP_ROUTE = "encap_route"  # lightweight-tunnel encapsulation
NO_OUTPUT_DEVICE = "no_output_device"  # the route names no device
DEVICE_GONE = "device_gone"  # a device of the path vanished, or no device with the input ifindex
DEVICE_DOWN = "device_down"  # an egress device (or a VLAN's lower device) is down or has no carrier
NOT_ETHERNET = "not_ethernet"  # the frames would leave on a device that is not Ethernet (ppp ...)
NO_MAC = "no_mac"  # the egress device has no Ethernet address
VLAN_UNSUPPORTED = "vlan_unsupported"  # a VLAN stack the fast path cannot write
BAD_NEXT_HOP = "bad_next_hop"  # a next hop of an unknown family
IPV6_FORWARDING_OFF = "ipv6_forwarding_off"
BAD_ADDRESS = "bad_address"  # not an IPv4/IPv6 address of the family
LOOKUP_FAILED = "lookup_failed"  # the route lookup itself failed (timeout, ENOMEM ...): not a verdict
INGRESS_NOT_MANAGED = "ingress_not_managed"  # a direction arrives on a device pyflow does not run on
EGRESS_NOT_MANAGED = "egress_not_managed"  # a direction leaves through a device pyflow does not run on
PPPOE_NO_SESSION = "pppoe_no_session"  # a ppp device with no PPPoE session (L2TP, serial, not connected)
PPPOE_AMBIGUOUS = "pppoe_ambiguous"  # which PPPoE session a ppp device runs over cannot be told
# bridges (pyflow.control.bridge): why the port behind which a MAC is learned cannot be used
NOT_A_BRIDGE = "not_a_bridge"  # asked for the port of a device that is not a bridge
BRIDGE_LOCAL_MAC = "bridge_local_mac"  # the MAC is the bridge's own or a port's: delivered to the host
BRIDGE_PORT_BLOCKED = "bridge_port_blocked"  # the port is not forwarding (spanning tree)
BRIDGE_VLAN_FILTERED = "bridge_vlan_filtered"  # the bridge or the port is not a member of the VLAN
BRIDGE_NO_PVID = "bridge_no_pvid"  # VLAN filtering and no PVID on the bridge: untagged frames dropped
# a device above the one the datapath redirects to (pppoe-wan, wan.7, br-lan over a managed
# port) shapes: a redirect to the port below would skip that shaper, the kernel path keeps it
SHAPED_UPPER = "shaped_upper"

NO_PATH_CODES = (NO_PATH, NO_ROUTE, UNREACHABLE, PROHIBITED, BLACKHOLE, RP_FILTER, THROW_ROUTE,
                 LOCAL_DESTINATION, MULTICAST_DESTINATION, ROUTE_TYPE, ENCAP_ROUTE, NO_OUTPUT_DEVICE,
                 DEVICE_GONE, DEVICE_DOWN, NOT_ETHERNET, NO_MAC, VLAN_UNSUPPORTED, BAD_NEXT_HOP,
                 IPV6_FORWARDING_OFF, BAD_ADDRESS, LOOKUP_FAILED, INGRESS_NOT_MANAGED, EGRESS_NOT_MANAGED,
                 PPPOE_NO_SESSION, PPPOE_AMBIGUOUS,
                 NOT_A_BRIDGE, BRIDGE_LOCAL_MAC, BRIDGE_PORT_BLOCKED, BRIDGE_VLAN_FILTERED, BRIDGE_NO_PVID,
                 SHAPED_UPPER)


class NoPath(Exception):
    """No usable path (no route, unreachable, blackhole, local delivery).

    ``code`` is one of NO_PATH_CODES (what is counted); the message says which address or
    device, for the log only."""

    def __init__(self, message: str = "", code: str = NO_PATH):
        super().__init__(message, code)  # both in args: a copy is type(exc)(*exc.args)

    @property
    def code(self) -> str:
        return str(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])


class PathResolver(Protocol):
    def egress(self, family: int, src: str, dst: str, *, iif: int | None, mark: int) -> Egress:
        """Resolve the forwarding path of a packet src -> dst arriving on iif.

        Raises NotYet or NoPath."""
        ...

    def device_of(self, family: int, addr: str, *, mark: int) -> int:
        """The device a route to addr leaves through (the device on which addr lives)."""
        ...

    def mac_of(self, ifindex: int) -> bytes: ...

    def below_bridge(self, bridge: Layer, dmac: bytes) -> tuple[Layer, ...]:
        """The layers below a bridge layer of an egress for frames to dmac: the port where
        the bridge's FDB has learned dmac (with the tag frames carry on the wire there, as the
        bridge's VLAN filtering says) and the devices below that port. Raises NotYet (dmac
        not learned yet) or NoPath."""
        ...


PathListener = Callable[[str, int], None]
"""Called by a path watcher with a change kind ('route', 'neigh', 'link', 'fdb', ...: paths.Change)
and an ifindex (0 = any)."""


class HwRefused(Exception):
    """The hardware adapter would not place a flow (a full table, a match or action the NIC
    cannot do, no flower in the kernel); ``reason`` is a short label for counting. The engine
    carries that flow on the XDP path instead."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---- the devices and maps the engine writes to -------------------------------------------


@dataclass(frozen=True)
class ManagedDevice:
    ifindex: int
    tx_port: int  # slot in the XDP devmap
    mac: bytes


class Devices(Protocol):
    def get(self, ifindex: int) -> ManagedDevice | None: ...


class FlowMap(Protocol):
    """The flow map as the engine uses it: pyflow.datapath.flowtable.FlowTable."""

    def insert(self, items: Any, *, mode: str = "any") -> int:
        """Items as flowtable.pack takes them: (FlowKey, FlowAction) pairs, or a (key bytes,
        value bytes) pair of whole structs. Raises MapError (a BatchError) part way."""
        ...

    def delete(self, keys: Any, *, missing_ok: bool = True) -> list[int]: ...

    def read_counters(self) -> Counters: ...


class HwStats(Protocol):
    @property
    def packets(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def idle_ns(self) -> int:
        """Since the rule last matched."""
        ...


class HwPlacer(Protocol):
    """Flower rules on NICs that run them (pyflow.hw.offload.FlowerOffload)."""

    def capable(self, ifindex: int) -> bool:
        """The device is a hardware device: flows arriving there are offered to place()."""
        ...

    def place(self, keys: tuple[FlowKey, FlowKey], actions: tuple[FlowAction, FlowAction]) -> tuple:
        """Both directions as rules, or neither: the rules' ids, or HwRefused."""
        ...

    def remove(self, ids: tuple) -> None: ...

    def stats(self) -> Mapping[Any, HwStats]:
        """Counters of the placed rules by id (one dump); a rule that is gone is absent."""
        ...


# ---- a connection's two flow entries -----------------------------------------------------

Path = tuple[Any, ...]  # (ingress orig, ingress reply, Egress orig, Egress reply, egress orig, egress reply)
Keys = tuple[FlowKey, FlowKey]
Actions = tuple[FlowAction, FlowAction]
Fields = tuple[tuple, tuple, tuple, tuple]  # FlowKey, FlowKey, FlowAction, FlowAction arguments


def entry_fields(conn: Conn, path: Path) -> Fields:
    """The FlowKey and FlowAction constructor arguments of conn's two entries: (key orig,
    key reply, action orig, action reply). The one place the entries are decided;
    entries_of makes objects of them, abi.entry_bytes bytes.

    Original direction: arrives A:a -> B:b, leaves A':a' -> B':b' (reply tuple reversed).
    Reply direction: arrives B':b' -> A':a', leaves B:b -> A:a.
    A direction arrives where the other one leaves (as the kernel flowtable assumes): its
    key holds the device, VLAN ids and PPPoE session of the other direction's egress, and
    its frames are addressed to that egress's source MAC.
    """
    _in_o, _in_r, eg_o, eg_r, out_o, out_r = path
    o, r = conn.orig, conn.reply
    return ((eg_r.ifindex, conn.proto, o.src, o.dst, o.sport, o.dport, *_encap_key(eg_r)),
            (eg_o.ifindex, conn.proto, r.src, r.dst, r.sport, r.dport, *_encap_key(eg_o)),
            _action(eg_r.smac, out_o, eg_o, snat=_nat((o.src, o.sport), (r.dst, r.dport)),
                    dnat=_nat((o.dst, o.dport), (r.src, r.sport))),
            _action(eg_o.smac, out_r, eg_r, snat=_nat((r.src, r.sport), (o.dst, o.dport)),
                    dnat=_nat((r.dst, r.dport), (o.src, o.sport))))


def _encap_key(eg: Egress) -> tuple[int, int, int, int]:
    """The key's (outer VLAN id, inner VLAN id, PPPoE session, outer tag protocol) of frames
    arriving where eg's frames leave: the ids of its tags (the priority bits are not part of
    the key) and the protocol (802.1Q / 802.1ad) of its outer tag, which the key matches too."""
    if eg.vlan_outer_tci is None:
        return 0, 0, eg.pppoe_sid or 0, ETH_P_8021Q
    return (eg.vlan_outer_tci & 0xFFF, (eg.vlan_inner_tci or 0) & 0xFFF, eg.pppoe_sid or 0,
            eg.vlan_outer_tpid)


def entries_of(conn: Conn, path: Path) -> tuple[Keys, Actions]:
    """conn's two entries as FlowKey/FlowAction objects."""
    return entry_objects(entry_fields(conn, path))


def entry_objects(fields: Fields) -> tuple[Keys, Actions]:
    kf_o, kf_r, af_o, af_r = fields
    return (FlowKey(*kf_o), FlowKey(*kf_r)), (FlowAction(*af_o), FlowAction(*af_r))


def _nat(seen: tuple[str, int], wanted: tuple[str, int]) -> tuple[str, int] | None:
    """The NAT target when the packet must leave with other address/port than it came."""
    return wanted if wanted != seen else None


def _action(in_mac: bytes, egress_dev: ManagedDevice, eg: Egress, *,
            snat: tuple[str, int] | None, dnat: tuple[str, int] | None) -> tuple:
    """FlowAction's constructor arguments, in its field order."""
    return (eg.ifindex, egress_dev.tx_port, eg.mtu, in_mac, eg.dmac, eg.smac,
            snat[0] if snat else None, snat[1] if snat else None,
            dnat[0] if dnat else None, dnat[1] if dnat else None,
            eg.vlan_outer_tci, eg.vlan_outer_tpid, eg.vlan_inner_tci, eg.pppoe_sid, eg.ppp_ifindex)


@dataclass(eq=False, slots=True)
class Offloaded:
    """A connection on the fast path. Its two entries (original direction, reply direction)
    are a function of the connection and its path (entry_fields). Bulk installs write them
    as bytes without building FlowKey/FlowAction objects; ``keys`` and ``actions`` are then
    built from the connection and path they were written from whenever asked for.

    One exists per offloaded connection (a million on a big router), hence slots: no
    instance dict. A connection on the XDP map keeps its packet count, last-seen time and
    conntrack deadline in its keep-alive slot (keepalive.Slots.activity), not here."""

    conn: Conn
    path: Path  # what the entries were built from: a path change that leaves it equal changes nothing
    since_ns: int
    packets: int = 0  # flower rules only: both directions, at the last tick
    last_seen_ns: int = 0  # flower rules only (and a flow's start until it has a slot)
    ct_deadline_ns: int = 0  # flower rules only: when conntrack's timeout as last written runs out
    # both keys as in the map, in one bytes object (original direction, then reply): one
    # object instead of three saves about 90 bytes a connection (see key_bytes)
    keys_raw: bytes = field(default=b"", repr=False)
    slot: int = field(default=-1, repr=False)  # in the keep-alive slots (keepalive.Slots)
    _source: Conn | None = field(default=None, repr=False)  # the conn the entries were built from
    _entries: tuple[Keys, Actions] | None = field(default=None, repr=False)  # when built already
    hw: bool = False  # both directions are flower rules (hardware, or software flower in a lab)
    hw_rules: tuple = field(default=(), repr=False)  # the adapter's ids of those rules
    hw_counters: tuple = field(default=(), repr=False)  # ((packets, bytes) orig, reply) at the last tick

    @property
    def keys(self) -> Keys:
        return self.entries()[0]

    @property
    def actions(self) -> Actions:
        return self.entries()[1]

    def entries(self) -> tuple[Keys, Actions]:
        """(keys, actions): the FlowKey/FlowAction objects of both entries."""
        if self._entries is not None:
            return self._entries
        return entries_of(self._source if self._source is not None else self.conn, self.path)

    @property
    def key_bytes(self) -> tuple[bytes, bytes]:
        """The two keys as in the map: (original direction, reply direction)."""
        raw = self.keys_raw
        half = len(raw) // 2
        return raw[:half], raw[half:]

    def written(self, source: Conn, path: Path, kb: tuple[bytes, bytes],
                entries: tuple[Keys, Actions] | None) -> None:
        """New entries (or rules) were written for this connection: from source along path."""
        self._source, self.path, self.keys_raw, self._entries = source, path, kb[0] + kb[1], entries

    def source_fields(self) -> Fields:
        """The constructor arguments of the entries as written."""
        return entry_fields(self._source or self.conn, self.path)
