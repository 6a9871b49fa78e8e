"""Where a connection's packets leave, read from the kernel over rtnetlink.

:class:`RtPaths` implements :class:`pyflow.control.model.PathResolver`: it asks
the kernel for the forwarding decision of one packet (RTM_GETROUTE with the
packet's iif, src, dst and fwmark, so ``ip rule`` policy routing by fwmark, by
iif and by source is the kernel's own answer), then the next hop's MAC from the
neighbour table, and the path's layers: from the route's device (the one routing
and conntrack see: ``eth0.7``, ``pppoe-wan``, ``br-lan.10``) down through VLAN
lower devices and PPPoE sessions to the real port, each layer with the
encapsulation frames handed to it must carry (model.Layer). Which layer the
frames are handed to is the planner's choice (the first managed one going down,
pyflow.control.engine.Planner); a bridge whose own device is not managed goes on
to the port its FDB names (:meth:`RtPaths.below_bridge`, through
pyflow.control.bridge.BridgePorts), asked for only then.
:class:`PathWatcher` reports route, neighbour, link, rule and forwarding-config
changes so that the engine can re-resolve or tear down flows.

Why two netlink paths. pyroute2 0.9.7's ``IPRoute.route("get")`` measured about
400 us per call here (an asyncio round per request, full message objects), and
the control plane resolves two paths per connection at up to 20,000
connections/s. So the two per-call queries (route and neighbour) go through a
plain NETLINK_ROUTE socket (:mod:`pyflow.netlink.sock`) with a request of four
attributes and a reply parser that reads only the attributes a decision needs,
both on :mod:`pyflow.netlink.wire` (about 7 us per query). Link details -- MAC,
MTU, link kind, VLAN id/protocol/QoS map, lower device -- change rarely and are
read with pyroute2's ``IPRoute`` (its ifinfmsg decoder knows the VLAN attributes)
and cached per ifindex.

Caching. Answers are cached and invalidated by a private :class:`PathWatcher`
socket that every call drains first (one poll() syscall when nothing changed).
The kernel queues a change notification before the command that made the
change returns, so a call made after ``ip route replace`` returned never answers
from the old route. Route answers are keyed by (family, src, dst, iif,
mark[, proto, sport, dport]) and dropped on any route, rule, link or
forwarding-config change; the plan built from an answer (devices, VLAN tags,
MTU, next hop) is shared by every destination behind the same next hop and
dropped on link changes; link details are dropped on link changes; neighbour
MACs are dropped one by one when their entry changes MAC or usability. A lost
notification (ENOBUFS) drops everything. Measured here (tests/integration/
test_paths.py, test_egress_latency): a cached call about 1.5 us, a route miss
(new src/dst pair, next hop known) about 15-20 us, pyroute2's route("get") alone
about 400 us.

Decoding is pure: :func:`parse_route`, :func:`parse_neigh`, :func:`link_from_msg`,
:func:`plan_egress`, :func:`walk_down`, :func:`port_layers` and :func:`build_egress`
take netlink messages (bytes or pyroute2 ifinfmsg objects) or LinkInfo values and
return values, so encapsulations the host kernel cannot create (802.1Q, PPPoE) are
tested with fake messages; :mod:`pyflow.control.pppoe` parses ``/proc/net/pppoe``.

Choices a reader should know:

* The Egress answered names the route's device (ifindex, ifname) and lists its
  layers; model.egress_at makes the Egress at one layer (that device, the tags and
  PPPoE session to write, lower_ifindex = it when there is encapsulation). smac is
  the route device's address (a VLAN device may have its own; for PPPoE, the
  address of the device the session runs over) and mtu the route device's MTU
  (1492 for PPPoE over 1500), lowered to the route's MTU metric when that is
  smaller. A layer the datapath cannot write frames for (the ppp device itself,
  more than two tags, an 802.1ad inner tag, a VLAN with an egress-qos-map above
  it) carries a refusal, raised only if the planner picks it: a managed device
  higher up may still take the frames.
* PPPoE: the session of a ppp device comes from ``/proc/net/pppoe`` of the
  resolver's namespace (id, concentrator MAC, session device), tied to the ppp
  device only when the namespace has one session and one ppp device
  (pyflow.control.pppoe says why nothing finer is possible); otherwise NoPath
  ``pppoe_ambiguous`` / ``pppoe_no_session``. Frames go to the concentrator's
  MAC: no neighbour lookup. The file and a device dump are read when a ppp
  path is planned, never per lookup, and forgotten (with every plan that used
  them) at any link or route change: a re-dial (new session id) takes the ppp
  device down and up, and pppd re-adds its routes, so no answer keeps the old
  session. A re-dial that changes neither links nor routes (pppd's demand mode
  keeps the device and its routes) is not seen until something else changes.
* A missing, INCOMPLETE, FAILED or NONE neighbour raises NotYet and never a
  guess. For missing/FAILED/NONE entries we also ask the kernel to resolve
  (RTM_NEWNEIGH with NTF_USE, as ``ip neigh add ADDR dev DEV use``: the kernel
  creates the entry and sends ARP/NS as if a packet needed it), at most once a
  second per neighbour; the PathWatcher then reports the entry when it turns
  usable, which is the engine's cue to retry.
* If the kernel refuses an iif lookup as martian (EINVAL), src may be one of
  this host's own addresses: only then (the output lookup with that src
  succeeds only for a local src) is the output lookup used, because that is
  the route the kernel takes for packets this host sends. Every other refusal
  is the kernel's forwarding verdict and becomes NoPath.
* A route device or VLAN lower device that is down or without carrier gives
  NoPath (IPv4 keeps routes over a device that lost carrier). IPv6 input
  lookups do not look at forwarding, so net.ipv6.conf.all.forwarding is asked
  (RTM_GETNETCONF) and NoPath given when it is off; IPv4 input lookups refuse
  by themselves.
* Rules that select on TOS/DSCP, uid, or -- unless the caller passes
  proto/sport/dport -- on L4 protocol and ports, and L4-hash multipath, are not
  seen: the lookup carries only what the caller gives.
* Not thread-safe: one RtPaths per thread. All sockets are made in the network
  namespace of the thread that constructs the object.
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pyflow.control import model as refusal
from pyflow.control.model import Egress, Layer, NoPath, NotYet, PathListener
from pyflow.control.pppoe import Session, SessionTable, session_of
from pyflow.control.pppoe import netns_id as pppoe_netns
from pyflow.errors import DeviceError
from pyflow.netlink.errors import error_text
from pyflow.netlink.sock import NetlinkSocket, group_mask
from pyflow.netlink.uapi import (
    ARPHRD_ETHER,
    ARPHRD_PPP,
    ETH_P_8021AD,
    ETH_P_8021Q,
    IFF_RUNNING,
    IFF_UP,
    IFLA_ADDRESS,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINK,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_MTU,
    NDA_DST,
    NDA_LLADDR,
    NETCONFA_FORWARDING,
    NETCONFA_IFINDEX,
    NETCONFA_IFINDEX_ALL,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLMSG_HDRLEN,
    NTF_USE,
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
    RTA_DPORT,
    RTA_DST,
    RTA_ENCAP_TYPE,
    RTA_GATEWAY,
    RTA_IIF,
    RTA_IP_PROTO,
    RTA_MARK,
    RTA_METRICS,
    RTA_MULTIPATH,
    RTA_OIF,
    RTA_SPORT,
    RTA_SRC,
    RTA_TABLE,
    RTA_VIA,
    RTAX_MTU,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELNETCONF,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETNEIGH,
    RTM_GETNETCONF,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWNETCONF,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTN_ANYCAST,
    RTN_BLACKHOLE,
    RTN_BROADCAST,
    RTN_LOCAL,
    RTN_MULTICAST,
    RTN_NAT,
    RTN_PROHIBIT,
    RTN_THROW,
    RTN_UNICAST,
    RTN_UNREACHABLE,
    RTN_XRESOLVE,
    RTNLGRP_IPV4_NETCONF,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_NETCONF,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV6_RULE,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
)
from pyflow.netlink.wire import (
    BE16,
    I32,
    U16,
    U32,
    Buffer,
    attrs,
    messages,
    nested,
    nla,
    nla_header,
    payload,
    value,
)

if TYPE_CHECKING:
    from pyflow.control.bridge import BridgePort, BridgePorts

# ---------------------------------------------------------------------------
# rtnetlink: the numbers are pyflow.netlink.uapi's; what follows is derived from them

_RTN_NAMES = {
    0: "unspecified", RTN_UNICAST: "unicast", RTN_LOCAL: "local", RTN_BROADCAST: "broadcast",
    RTN_ANYCAST: "anycast", RTN_MULTICAST: "multicast", RTN_BLACKHOLE: "blackhole",
    RTN_UNREACHABLE: "unreachable", RTN_PROHIBIT: "prohibit", RTN_THROW: "throw", RTN_NAT: "nat",
    RTN_XRESOLVE: "xresolve",
}

NUD_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
_NUD_NAMES = {0: "NONE", NUD_INCOMPLETE: "INCOMPLETE", NUD_REACHABLE: "REACHABLE", NUD_STALE: "STALE",
              NUD_DELAY: "DELAY", NUD_PROBE: "PROBE", NUD_FAILED: "FAILED", NUD_NOARP: "NOARP",
              NUD_PERMANENT: "PERMANENT"}

WATCH_GROUPS = (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE,
                RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE, RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF)

_RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg
_NDMSG = struct.Struct("=BxxxiHBB")   # struct ndmsg
_IFINFO = struct.Struct("=BxHiII")    # struct ifinfomsg
_NETCONFMSG = struct.Struct("=Bxxx")  # struct netconfmsg: one family byte, padded
_LEN_TYPE = struct.Struct("=IH")  # the start of struct nlmsghdr
_ALEN: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}

REPLY_TIMEOUT = 1.0  # rtnetlink answers inside our send(); this only guards a wedged kernel
RESOLVE_INTERVAL_S = 1.0
ROUTE_CACHE_SIZE = 65536
NEIGH_CACHE_SIZE = 16384


def _ntop(family: int, packed: bytes) -> str:
    return socket.inet_ntop(family, packed)


# ---------------------------------------------------------------------------
# Pure decoding: netlink messages -> values


class RouteReply(NamedTuple):
    """The parts of an RTM_NEWROUTE answer to RTM_GETROUTE that decide a path.

    (A NamedTuple, not a frozen dataclass: it is made once per route lookup and
    a frozen dataclass's __init__ costs microseconds.)"""

    family: int
    type: int
    table: int
    oif: int  # 0 = none given
    gateway: bytes | None  # packed, in family
    via_family: int  # RTA_VIA (e.g. an IPv6 next hop for an IPv4 route); 0 = none
    via: bytes | None
    mtu: int  # RTAX_MTU metric (configured route MTU or a learned PMTU), 0 = none
    encap_type: int  # lightweight tunnel encapsulation (RTA_ENCAP_TYPE), 0 = none
    multipath: bool


def parse_route(data: Buffer) -> RouteReply:
    """Decode one RTM_NEWROUTE message (a route lookup's answer or a route event)."""
    length, mtype = _LEN_TYPE.unpack_from(data, 0)
    if mtype not in (RTM_NEWROUTE, RTM_DELROUTE):
        raise ValueError(f"not a route message: nlmsg type {mtype}")
    family, _dlen, _slen, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(data, NLMSG_HDRLEN)
    a = attrs(data, NLMSG_HDRLEN + _RTMSG.size, min(length, len(data)))
    get = a.get
    # Hot (once per route miss): the common attributes are unpacked here, and absent
    # ones, the usual case for the rest, cost no call.
    via_family, via = 0, None
    v = get(RTA_VIA)
    if v is not None:  # struct rtvia: a family, then the address
        via_family = value(data, v, U16) or 0
        via = bytes(data[v[0] + 2:min(v[0] + 2 + _ALEN.get(via_family, 0), v[1])])
    t = get(RTA_TABLE)
    if t is not None and t[1] - t[0] >= 4:
        table = U32.unpack_from(data, t[0])[0]
    o = get(RTA_OIF)
    g = get(RTA_GATEWAY)
    m = get(RTA_METRICS)
    e = get(RTA_ENCAP_TYPE)
    return RouteReply(  # positional: a NamedTuple built by keyword costs this decode ~15% more
        family,
        rtype,
        table,
        U32.unpack_from(data, o[0])[0] if o is not None and o[1] - o[0] >= 4 else 0,  # oif
        None if g is None else bytes(data[g[0]:g[1]]),  # gateway
        via_family,
        via,
        (value(data, nested(data, m).get(RTAX_MTU), U32) or 0) if m is not None else 0,  # mtu
        (value(data, e, U16) or 0) if e is not None else 0,  # encap_type
        RTA_MULTIPATH in a,  # multipath
    )


@dataclass(frozen=True)
class NeighReply:
    family: int
    ifindex: int
    state: int
    dst: bytes | None
    lladdr: bytes | None


def parse_neigh(data: Buffer) -> NeighReply:
    """Decode one RTM_NEWNEIGH / RTM_DELNEIGH message."""
    length, mtype = _LEN_TYPE.unpack_from(data, 0)
    if mtype not in (RTM_NEWNEIGH, RTM_DELNEIGH):
        raise ValueError(f"not a neighbour message: nlmsg type {mtype}")
    family, ifindex, state, _flags, _ntype = _NDMSG.unpack_from(data, NLMSG_HDRLEN)
    a = attrs(data, NLMSG_HDRLEN + _NDMSG.size, min(length, len(data)))
    return NeighReply(family, ifindex, state, payload(data, a.get(NDA_DST)), payload(data, a.get(NDA_LLADDR)))


def nud_name(state: int) -> str:
    return _NUD_NAMES.get(state, f"state 0x{state:x}")


@dataclass(frozen=True)
class LinkInfo:
    """What a path needs to know about one device."""

    ifindex: int
    ifname: str
    arptype: int  # ifi_type: ARPHRD_ETHER for Ethernet-framed devices
    flags: int  # IFF_*
    mtu: int
    mac: bytes | None
    kind: str | None  # IFLA_INFO_KIND: "vlan", "ppp", "veth" ... None for plain NICs
    link: int | None  # IFLA_LINK: a VLAN's lower device
    link_netnsid: int | None  # set when IFLA_LINK names a device in another namespace
    vlan_id: int | None = None
    vlan_proto: int | None = None  # ETH_P_8021Q / ETH_P_8021AD
    vlan_egress_qos: bool = False  # an egress-qos-map sets PCP from each packet's priority


def _mac_bytes(text: str | None) -> bytes | None:
    if not text:
        return None
    return bytes.fromhex(text.replace(":", ""))


def link_from_msg(msg: Any) -> LinkInfo:
    """A LinkInfo from a pyroute2 ifinfmsg (RTM_NEWLINK), as IPRoute.link("get") returns it."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    vlan_id = vlan_proto = None
    qos = False
    if kind == "vlan" and info is not None:
        data = info.get_attr("IFLA_INFO_DATA")
        if data is not None:
            vlan_id = data.get_attr("IFLA_VLAN_ID")
            vlan_proto = data.get_attr("IFLA_VLAN_PROTOCOL") or ETH_P_8021Q
            egress = data.get_attr("IFLA_VLAN_EGRESS_QOS")
            # the kernel lists only mappings to a non-zero PCP (vlan_fill_info)
            qos = bool(egress is not None and egress.get_attrs("IFLA_VLAN_QOS_MAPPING"))
    return LinkInfo(
        ifindex=msg["index"],
        ifname=msg.get_attr("IFLA_IFNAME") or f"ifindex {msg['index']}",
        arptype=msg["ifi_type"],
        flags=msg["flags"],
        mtu=msg.get_attr("IFLA_MTU") or 0,
        mac=_mac_bytes(msg.get_attr("IFLA_ADDRESS")),
        kind=kind,
        link=msg.get_attr("IFLA_LINK"),
        link_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
        vlan_id=vlan_id,
        vlan_proto=vlan_proto,
        vlan_egress_qos=qos,
    )


class Plan:
    """A resolved route: everything of an Egress except the next hop's MAC (unless the path
    fixes it: a PPPoE session's concentrator)."""

    __slots__ = ("oif", "nh_family", "nh_addr", "nkey", "ifindex", "ifname", "smac", "mtu",
                 "layers", "dmac", "ppp_ifindex", "last")

    def __init__(self, *, oif: int, nh_family: int, nh_addr: bytes, ifindex: int, ifname: str,
                 smac: bytes, mtu: int, layers: tuple[Layer, ...] = (), dmac: bytes | None = None,
                 ppp_ifindex: int = 0) -> None:
        self.oif = oif  # the route's device: neighbours live there
        self.nh_family = nh_family
        self.nh_addr = nh_addr
        self.nkey = (oif, _ntop(nh_family, nh_addr))  # as PathWatcher reports neighbours
        self.ifindex = ifindex
        self.ifname = ifname
        self.smac = smac
        self.mtu = mtu
        self.layers = layers  # from the route's device down (model.Layer)
        self.dmac = dmac  # the next hop's MAC when the path fixes it (PPPoE); None: the neighbour's
        self.ppp_ifindex = ppp_ifindex
        self.last: Egress | None = None  # the last Egress built from this plan (reused while dmac holds)

    def __repr__(self) -> str:
        return (f"Plan(oif={self.oif}, nh={self.nkey[1]}, ifindex={self.ifindex}, ifname={self.ifname!r}, "
                f"mtu={self.mtu}, layers={[layer.ifname for layer in self.layers]})")


def _is_multicast_or_broadcast(family: int, packed: bytes) -> bool:
    if family == socket.AF_INET:
        return 224 <= packed[0] <= 239 or packed == b"\xff\xff\xff\xff"
    return packed[0] == 0xFF


def _device_usable(dev: LinkInfo) -> NoPath | None:
    if not dev.flags & IFF_UP:
        return NoPath(f"egress device {dev.ifname} is down", refusal.DEVICE_DOWN)
    if not dev.flags & IFF_RUNNING:
        return NoPath(f"egress device {dev.ifname} has no carrier", refusal.DEVICE_DOWN)
    return None


PppoeLookup = Callable[[LinkInfo], tuple[Session, LinkInfo]]
"""The PPPoE session a ppp device runs over and the device the session runs over; raises
NoPath (pppoe.session_of says when)."""


def _no_pppoe(dev: LinkInfo) -> tuple[Session, LinkInfo]:
    raise NoPath(f"no PPPoE session table to find the session of ppp device {dev.ifname}",
                 refusal.PPPOE_NO_SESSION)


def _is_ppp(dev: LinkInfo) -> bool:
    return dev.kind == "ppp" or dev.arptype == ARPHRD_PPP


def _layer(dev: LinkInfo, tags: list[tuple[int, int]], sid: int | None, qos_above: str | None) -> Layer:
    """dev as a layer of a path: frames handed to it carry ``tags`` (innermost first, as the
    devices above pushed them) and PPPoE session ``sid``. A stack the datapath cannot write
    makes a layer with a refusal (an upper layer may still be managed and take the frames)."""
    why = None
    if len(tags) > 2:
        why = f"{dev.ifname} is below more than two VLAN tags"
    elif tags and tags[-1][1] not in (ETH_P_8021Q, ETH_P_8021AD):
        why = f"VLAN protocol 0x{tags[-1][1]:04x} above {dev.ifname} is not 802.1Q/802.1ad"
    elif len(tags) == 2 and tags[0][1] != ETH_P_8021Q:
        why = (f"the inner VLAN tag above {dev.ifname} uses protocol 0x{tags[0][1]:04x}; only 802.1Q "
               f"inner tags are supported")
    elif qos_above is not None:
        why = (f"VLAN device {qos_above} above {dev.ifname} has an egress-qos-map: its PCP depends on "
               f"each packet's priority")
    if why is not None:
        return Layer(dev.ifindex, dev.ifname, pppoe_sid=sid, bridge=dev.kind == "bridge",
                     refusal=(refusal.VLAN_UNSUPPORTED, why))
    outer = tags[-1] if tags else None
    return Layer(dev.ifindex, dev.ifname,
                 vlan_outer_tci=outer[0] if outer else None,
                 vlan_outer_tpid=outer[1] if outer else ETH_P_8021Q,
                 vlan_inner_tci=tags[0][0] if len(tags) == 2 else None,
                 pppoe_sid=sid, bridge=dev.kind == "bridge")


def walk_down(dev: LinkInfo, link: Callable[[int], LinkInfo | None], *,
              tags: tuple[tuple[int, int], ...] = (), sid: int | None = None) -> list[Layer]:
    """The layers from dev down through its VLAN lower devices to an Ethernet device or a
    bridge (whose port depends on the destination's MAC: PathResolver.below_bridge). ``tags``
    (innermost first) and ``sid``: what frames handed to dev already carry. Raises NoPath
    when the way down is broken (a lower device gone, down, in another namespace, not
    Ethernet)."""
    stack = list(tags)
    layers = []
    qos_above = None
    cur = dev
    while True:
        layers.append(_layer(cur, stack, sid, qos_above))
        if cur.kind != "vlan":
            break
        if cur.vlan_id is None:
            raise NoPath(f"VLAN device {cur.ifname} reports no VLAN id", refusal.VLAN_UNSUPPORTED)
        why = _device_usable(cur)
        if why:
            raise why
        if cur.link_netnsid is not None:
            raise NoPath(f"lower device of VLAN {cur.ifname} is in another network namespace",
                         refusal.VLAN_UNSUPPORTED)
        if not cur.link:
            raise NoPath(f"VLAN device {cur.ifname} reports no lower device", refusal.VLAN_UNSUPPORTED)
        if cur.vlan_egress_qos:
            qos_above = cur.ifname
        # No egress-qos-map on the device: the kernel sends PCP 0, DEI 0, so TCI = id.
        stack.append((cur.vlan_id, cur.vlan_proto or ETH_P_8021Q))
        lower = link(cur.link)
        if lower is None:
            raise NoPath(f"lower device ifindex {cur.link} of VLAN {cur.ifname} is gone", refusal.DEVICE_GONE)
        cur = lower
    if _is_ppp(cur) or cur.arptype != ARPHRD_ETHER:
        raise NoPath(f"egress device {cur.ifname} is not Ethernet (ARPHRD type {cur.arptype})",
                     refusal.NOT_ETHERNET)
    why = _device_usable(cur)
    if why:
        raise why
    return layers


def plan_egress(family: int, dst: bytes, route: RouteReply, link: Callable[[int], LinkInfo | None],
                pppoe: PppoeLookup = _no_pppoe) -> Plan:
    """The path of a packet to dst (packed) from the kernel's route answer and the devices' facts.

    ``link(ifindex)`` returns a device's LinkInfo or None if it is gone; ``pppoe(dev)`` the
    session a ppp device runs over and that session's device. Raises NoPath with a one-line
    reason when the fast path must not take the packet.
    """
    where = _ntop(family, dst)
    if _is_multicast_or_broadcast(family, dst):
        raise NoPath(f"{where} is a multicast or broadcast destination", refusal.MULTICAST_DESTINATION)
    if route.type != RTN_UNICAST:
        name = _RTN_NAMES.get(route.type, str(route.type))
        if route.type == RTN_LOCAL:
            raise NoPath(f"{where} is local to this host (route type local)", refusal.LOCAL_DESTINATION)
        raise NoPath(f"route to {where} is of type {name}", refusal.ROUTE_TYPE)
    if route.encap_type:
        raise NoPath(f"route to {where} has lightweight-tunnel encapsulation (type {route.encap_type})",
                     refusal.ENCAP_ROUTE)
    if not route.oif:
        raise NoPath(f"route to {where} names no output device", refusal.NO_OUTPUT_DEVICE)
    dev = link(route.oif)
    if dev is None:
        raise NoPath(f"egress device ifindex {route.oif} of the route to {where} is gone",
                     refusal.DEVICE_GONE)

    if route.via is not None:
        nh_family, nh = route.via_family, route.via
        if nh_family not in _ALEN or len(nh) != _ALEN[nh_family]:
            raise NoPath(f"route to {where} has a next hop of unknown family {nh_family}",
                         refusal.BAD_NEXT_HOP)
    elif route.gateway is not None:
        nh_family, nh = family, route.gateway
    else:
        nh_family, nh = family, dst  # on-link: the destination is its own next hop

    dmac = None
    ppp_ifindex = 0
    if _is_ppp(dev):
        # PPPoE: frames leave on the session's device with a session header, to the
        # concentrator's MAC (a point-to-point link has no neighbours to look up)
        session, lower = pppoe(dev)
        head = Layer(dev.ifindex, dev.ifname, refusal=(
            refusal.NOT_ETHERNET, f"ppp device {dev.ifname} is not Ethernet: the fast path runs on "
                                  f"{lower.ifname}, the device its PPPoE session runs over"))
        layers = (head, *walk_down(lower, link, sid=session.sid))
        framing, dmac, ppp_ifindex = lower, session.remote, dev.ifindex
    else:
        layers = tuple(walk_down(dev, link))
        framing = dev
    if framing.mac is None or len(framing.mac) != 6:
        raise NoPath(f"egress device {framing.ifname} has no Ethernet address", refusal.NO_MAC)

    mtu = dev.mtu  # the route device's: a PPPoE device's is the session's (1492 over 1500)
    if route.mtu and route.mtu < mtu:
        # A route MTU above the device's would only let frames the device drops:
        # the smaller one sends every such packet to the kernel instead.
        mtu = route.mtu
    return Plan(oif=dev.ifindex, nh_family=nh_family, nh_addr=nh, ifindex=dev.ifindex, ifname=dev.ifname,
                smac=framing.mac, mtu=mtu, layers=tuple(layers), dmac=dmac, ppp_ifindex=ppp_ifindex)


def port_layers(bridge: Layer, port: BridgePort, link: Callable[[int], LinkInfo | None]) -> tuple[Layer, ...]:
    """The layers below bridge layer ``bridge`` when frames leave on ``port`` (BridgePorts.
    port_of): the port with the tag the bridge gives frames there (it replaces the tag they
    entered the bridge with) and the devices below the port. Raises NoPath."""
    dev = link(port.ifindex)
    if dev is None:
        raise NoPath(f"port {port.ifname} of bridge {bridge.ifname} is gone", refusal.DEVICE_GONE)
    # a tag the bridge keeps as the frame entered (no VLAN filtering) has the protocol it entered with
    tags = ((port.vlan_tci, port.vlan_tpid or bridge.vlan_outer_tpid),) if port.vlan_tci is not None else ()
    return tuple(walk_down(dev, link, tags=tags, sid=bridge.pppoe_sid))


def bridge_vid(bridge: Layer) -> int | None:
    """The VLAN frames enter bridge layer ``bridge`` in (from a VLAN device on the bridge,
    br-lan.10), None when untagged; NoPath when they would carry two tags into it."""
    if bridge.refusal is not None:
        raise NoPath(bridge.refusal[1], bridge.refusal[0])
    if bridge.vlan_inner_tci is not None:
        raise NoPath(f"frames enter bridge {bridge.ifname} with two VLAN tags", refusal.VLAN_UNSUPPORTED)
    return bridge.vlan_outer_tci & 0xFFF if bridge.vlan_outer_tci is not None else None


def neigh_mac(plan: Plan, neigh: NeighReply | None) -> bytes:
    """The next hop's MAC from its neighbour entry; NotYet unless the entry is usable."""
    if neigh is None:
        raise NotYet(f"neighbour {plan.nkey[1]} on ifindex {plan.oif} is not known yet")
    if not neigh.state & NUD_USABLE:
        raise NotYet(f"neighbour {plan.nkey[1]} on ifindex {plan.oif} is {nud_name(neigh.state)}")
    if neigh.lladdr is None or len(neigh.lladdr) != 6:
        raise NotYet(f"neighbour {plan.nkey[1]} on ifindex {plan.oif} has no Ethernet address")
    return neigh.lladdr


def build_egress(plan: Plan, dmac: bytes) -> Egress:
    """The resolver's answer: the route device's view (ifindex, ifname, MTU, addresses) and
    the layers below it; the planner picks the layer frames are handed to (model.egress_at)."""
    return Egress(ifindex=plan.ifindex, ifname=plan.ifname, smac=plan.smac, dmac=dmac, mtu=plan.mtu,
                  layers=plan.layers, ppp_ifindex=plan.ppp_ifindex)


def decode_egress(family: int, dst: str, route_msg: bytes, links: Mapping[int, Any] | Mapping[int, LinkInfo],
                  neigh_msg: bytes | None, pppoe: PppoeLookup = _no_pppoe) -> Egress:
    """Egress from recorded messages: the route answer, the devices (ifinfmsg or LinkInfo by
    ifindex) and the neighbour answer (None: the kernel had no entry; unused on a PPPoE path)."""
    infos = {i: (m if isinstance(m, LinkInfo) else link_from_msg(m)) for i, m in links.items()}
    plan = plan_egress(family, socket.inet_pton(family, dst), parse_route(route_msg), infos.get, pppoe)
    if plan.dmac is not None:
        return build_egress(plan, plan.dmac)
    return build_egress(plan, neigh_mac(plan, parse_neigh(neigh_msg) if neigh_msg is not None else None))


# ---------------------------------------------------------------------------
# Requests over a plain NETLINK_ROUTE socket

# attribute headers of the per-call request, packed once (this is the hot path)
_HDR_DST = {f: nla_header(RTA_DST, n) for f, n in _ALEN.items()}
_HDR_SRC = {f: nla_header(RTA_SRC, n) for f, n in _ALEN.items()}
_HDR_IIF = nla_header(RTA_IIF, 4)
_HDR_MARK = nla_header(RTA_MARK, 4)
# struct rtmsg of a lookup: full-length dst (and src when given), nothing else set
_HDR_RTMSG = {(f, has_src): _RTMSG.pack(f, n * 8, n * 8 if has_src else 0, 0, 0, 0, 0, 0, 0)
              for f, n in _ALEN.items() for has_src in (False, True)}


def _route_request(family: int, src: bytes | None, dst: bytes, iif: int | None, mark: int,
                   proto: int | None, sport: int | None, dport: int | None) -> bytes:
    parts = [_HDR_RTMSG[family, src is not None], _HDR_DST[family], dst]
    if src is not None:
        parts += (_HDR_SRC[family], src)
    if iif:
        parts += (_HDR_IIF, U32.pack(iif))
    if mark:
        parts += (_HDR_MARK, U32.pack(mark))
    if proto is not None:
        parts.append(nla(RTA_IP_PROTO, bytes((proto,))))
    if sport is not None:
        parts.append(nla(RTA_SPORT, BE16.pack(sport)))
    if dport is not None:
        parts.append(nla(RTA_DPORT, BE16.pack(dport)))
    return b"".join(parts)


# errnos that are the kernel's routing verdict (cached until something changes); any
# other failure (timeout, ENOMEM ...) is answered with NoPath but not remembered
_VERDICTS = frozenset((_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EACCES, _errno.EINVAL,
                       _errno.EXDEV, _errno.ENODEV, _errno.EAGAIN))


class _Transient(Exception):
    """A lookup that failed for a reason other than the routing verdict: not cached.
    args: the NoPath to answer with."""


def _refusal(err: int, where: str, iif: int | None) -> NoPath:
    """The kernel's errno from a route lookup (fib_props errors, ip_route_input) as a
    refusal: a fixed code and one line naming the addresses."""
    if err == _errno.ENETUNREACH:
        return NoPath(f"no route to {where}", refusal.NO_ROUTE)
    if err == _errno.EHOSTUNREACH:
        if iif:
            return NoPath(f"unreachable route to {where}, or forwarding disabled on ifindex {iif}",
                          refusal.UNREACHABLE)
        return NoPath(f"unreachable route to {where}", refusal.UNREACHABLE)
    if err == _errno.EACCES:
        return NoPath(f"prohibit route to {where}", refusal.PROHIBITED)
    if err == _errno.EINVAL:
        return NoPath(f"blackhole route to {where}, or a martian source/destination", refusal.BLACKHOLE)
    if err == _errno.EXDEV:
        return NoPath(f"reverse-path filter rejects the source of a packet to {where} on ifindex {iif}",
                      refusal.RP_FILTER)
    if err == _errno.ENODEV:
        return NoPath(f"no device with ifindex {iif}", refusal.DEVICE_GONE)
    if err == _errno.EAGAIN:
        return NoPath(f"throw route to {where} and no later table has one", refusal.THROW_ROUTE)
    return NoPath(f"route lookup for {where} failed: {error_text(err)}", refusal.LOOKUP_FAILED)


def _verdict_or_transient(exc: OSError, where: str, iif: int | None) -> NoPath:
    """A failed route lookup: the routing verdict as a refusal, or _Transient
    when the errno is not a verdict (so the caller does not cache it)."""
    if exc.errno in _VERDICTS:
        return _refusal(exc.errno or 0, where, iif)
    raise _Transient(_refusal(exc.errno or 0, where, iif)) from None


# ---------------------------------------------------------------------------
# Watching changes

Change = tuple[str, int, str | None]
"""(kind, ifindex, addr): kind is 'route', 'neigh', 'link', 'rule', 'netconf' or 'resync'.

* route: ifindex = the route's output device (0 for multipath or none), addr =
  the route's prefix "198.19.0.0/16" (a change can only move destinations
  inside it).
* neigh: ifindex and the neighbour's address; reported only when the entry's
  MAC or its usability (NotYet vs usable) changes, or it is first seen or deleted.
* link: a device changed up/carrier state, MTU, address, name, lower device,
  master or link info, appeared or went away (statistics-only updates, XDP
  attach and the like are not reported). A VLAN device's change is also
  reported under its lower device's ifindex, because Egress.ifindex names the
  device frames leave on.
* fdb: a bridge's forwarding database entry for a MAC was first seen, moved to
  another port (a client roamed), turned local, or went away (deleted, aged,
  port removed); ifindex = the bridge, addr = the MAC ("02:00:5e:10:00:01",
  "02:00:5e:10:00:01 vlan 10" under VLAN filtering). Refreshes of a learned
  entry are not reported. Bridge port state and VLAN changes are ``link``
  changes of the port.
* rule: an ``ip rule`` was added or removed (ifindex 0).
* netconf: a forwarding / rp_filter setting changed (ifindex 0 = all devices).
* resync: notifications were lost (socket overrun): re-resolve everything.
"""


# the link attributes whose change can change a path (the rest is statistics and the like)
_LINK_SIG = (IFLA_MTU, IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER)
_AF_BRIDGE = int(socket.AF_BRIDGE)  # bridge FDB entries and port views share the neighbour and link groups


class PathWatcher:
    """Route / neighbour / link / rule / netconf change notifications from rtnetlink.

    ``fileno()`` is for select(); ``poll(timeout)`` waits up to timeout seconds
    for the first notification, then drains what is queued and returns the
    changes (possibly empty when all were filtered as irrelevant). Made in the
    network namespace of the constructing thread.
    """

    def __init__(self, *, rcvbuf: int = 4 << 20, groups: tuple[int, ...] = WATCH_GROUPS) -> None:
        # A large buffer (SO_RCVBUFFORCE past rmem_max when we may): a short burst
        # of neighbour churn must not overrun the socket.
        self._nl = NetlinkSocket(NETLINK_ROUTE, group_mask(*groups), rcvbuf=rcvbuf)
        self.sock = self._nl.sock
        self.lost_events = 0  # overruns seen (each one reported as a 'resync')
        self._neigh: dict[tuple[int, int, bytes], tuple[bool, bytes | None]] = {}
        # bridge FDB: (bridge, vid, mac) -> (port ifindex, local) as last reported
        self._fdb: dict[tuple[int, int, bytes], tuple[int, bool]] = {}
        self._links: dict[int, tuple] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PathWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, timeout: float) -> list[Change]:
        nl = self._nl
        # every RtPaths call starts here: one poll syscall, no wrapper, when nothing changed
        if not nl.poller.poll(max(0, int(timeout * 1000))):
            return []
        out: list[Change] = []
        while True:
            try:
                n = nl.recv()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise
                # The kernel dropped notifications: what we remembered may be stale too.
                self.lost_events += 1
                self._neigh.clear()
                self._fdb.clear()
                self._links.clear()
                out.append(("resync", 0, None))
                continue
            self._decode(memoryview(nl.buf)[:n], out)
        return list(dict.fromkeys(out))  # one report per distinct change, first-seen order

    def notify(self, listener: PathListener, timeout: float) -> int:
        """poll(timeout) and hand each change to a model.PathListener as (kind, ifindex)."""
        changes = self.poll(timeout)
        for kind, ifindex, _addr in changes:
            listener(kind, ifindex)
        return len(changes)

    def _decode(self, data: Buffer, out: list[Change]) -> None:
        for mtype, _flags, _seq, _pid, off, length in messages(data):
            msg = bytes(data[off:off + length])
            try:
                self._one(mtype, msg, out)
            except (struct.error, ValueError, KeyError):
                out.append(("resync", 0, None))  # a message we cannot read: be safe

    def _one(self, mtype: int, msg: bytes, out: list[Change]) -> None:
        if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
            family, dlen = msg[NLMSG_HDRLEN], msg[NLMSG_HDRLEN + 1]
            if family not in _ALEN:
                return
            a = attrs(msg, NLMSG_HDRLEN + _RTMSG.size, len(msg))
            dst = payload(msg, a.get(RTA_DST)) or bytes(_ALEN[family])
            oif = value(msg, a.get(RTA_OIF), U32) or 0 if RTA_MULTIPATH not in a else 0
            out.append(("route", oif, f"{_ntop(family, dst)}/{dlen}"))
        elif mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
            if msg[NLMSG_HDRLEN] == _AF_BRIDGE:
                self._fdb_change(mtype, msg, out)
                return
            n = parse_neigh(msg)
            if n.family not in _ALEN or n.dst is None:
                return
            key = (n.family, n.ifindex, n.dst)
            if mtype == RTM_DELNEIGH:
                self._neigh.pop(key, None)
            else:
                usable = bool(n.state & NUD_USABLE)
                now = (usable, n.lladdr if usable else None)
                if self._neigh.get(key) == now:
                    return  # REACHABLE <-> STALE <-> DELAY churn with the same MAC
                self._neigh[key] = now
            out.append(("neigh", n.ifindex, _ntop(n.family, n.dst)))
        elif mtype in (RTM_NEWLINK, RTM_DELLINK):
            _fam, _type, index, flags, _change = _IFINFO.unpack_from(msg, NLMSG_HDRLEN)
            if _fam == _AF_BRIDGE:
                # the bridge's view of a port (or of itself): sent only when its spanning-tree
                # state, VLAN list or port flags change, never for statistics
                out.append(("link", index, None))
                return
            a = attrs(msg, NLMSG_HDRLEN + _IFINFO.size, len(msg))
            info = payload(msg, a.get(IFLA_LINKINFO)) or b""
            lower = None
            kind = payload(msg, nested(msg, a.get(IFLA_LINKINFO)).get(IFLA_INFO_KIND)) or b""
            if kind.rstrip(b"\0") == b"vlan":
                lower = value(msg, a.get(IFLA_LINK), U32)
            if mtype == RTM_DELLINK:
                self._links.pop(index, None)
            else:
                sig = (flags & (IFF_UP | IFF_RUNNING), *(payload(msg, a.get(t)) for t in _LINK_SIG), info)
                if self._links.get(index) == sig:
                    return  # statistics, promiscuity, XDP attach ...: nothing a path depends on
                self._links[index] = sig
            out.append(("link", index, None))
            if lower:
                out.append(("link", lower, None))
        elif mtype in (RTM_NEWRULE, RTM_DELRULE):
            out.append(("rule", 0, None))
        elif mtype in (RTM_NEWNETCONF, RTM_DELNETCONF):
            a = attrs(msg, NLMSG_HDRLEN + _NETCONFMSG.size, len(msg))
            ifindex = value(msg, a.get(NETCONFA_IFINDEX), I32) or 0
            out.append(("netconf", max(ifindex, 0), None))

    def _fdb_change(self, mtype: int, msg: bytes, out: list[Change]) -> None:
        """A bridge FDB entry: reported when its MAC is first seen, moves to another port,
        turns local or not, or goes away (deleted, aged out, its port removed). The bridge
        notifies only such changes, not each refresh of a learned entry; what is filtered
        here is a notification that changes nothing pyflow uses (flags, a replace to the
        same port)."""
        from pyflow.control.bridge import mac_text, parse_fdb

        e = parse_fdb(msg)
        if e is None or not e.master:
            return  # a port's own address list (NTF_SELF), vxlan and the like: no bridge decides
        key = (e.master, e.vid, e.mac)
        if mtype == RTM_DELNEIGH:
            self._fdb.pop(key, None)
        else:
            now = (e.ifindex, bool(e.state & NUD_PERMANENT))
            if self._fdb.get(key) == now:
                return
            self._fdb[key] = now
        out.append(("fdb", e.master, mac_text(e.mac) + (f" vlan {e.vid}" if e.vid else "")))


# ---------------------------------------------------------------------------
# The resolver


class _PppoeView(NamedTuple):
    """What the namespace says about PPPoE at one moment: its sessions, the names of its ppp
    devices, every device's ifindex by name (a session names its device)."""

    sessions: list[Session]
    ppp_devices: tuple[str, ...]
    by_name: dict[str, int]


class RtPaths:
    """model.PathResolver over rtnetlink, in the constructing thread's network namespace.

    ``cache=False`` turns the result caches off (every call asks the kernel);
    used to measure the uncached cost. ``resolve=False`` stops the NTF_USE
    resolution requests for unknown neighbours.
    """

    def __init__(self, *, cache: bool = True, resolve: bool = True,
                 route_cache_size: int = ROUTE_CACHE_SIZE, neigh_cache_size: int = NEIGH_CACHE_SIZE) -> None:
        from pyroute2.iproute import IPRoute

        self._watch = PathWatcher()  # first, so no change between it and our first query is missed
        self._rt = NetlinkSocket(NETLINK_ROUTE)
        self._ipr = IPRoute(groups=0)  # link details only; groups=0: it must not queue events
        self._cache = cache
        self._resolve = resolve
        self._route_max = route_cache_size
        self._neigh_max = neigh_cache_size
        self._routes: OrderedDict[tuple, Plan | NoPath | int] = OrderedDict()
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()  # by route answer; link facts inside
        self._neigh: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._links: dict[int, LinkInfo | None] = {}
        self._asked: dict[tuple[int, str], float] = {}
        self._v6_forwarding: bool | None = None
        # PPPoE: the namespace's sessions and ppp devices, read when a ppp path is planned and
        # kept until a link or route changes; the plans that used them, dropped with them
        self._sessions = SessionTable()
        self._pppoe: _PppoeView | None = None
        self._pppoe_plans: set[tuple] = set()
        self._bridges: BridgePorts | None = None  # made when a path first goes below a bridge
        self.lookups = 0  # route queries sent to the kernel (cache misses)

    def close(self) -> None:
        self._watch.close()
        self._rt.close()
        self._ipr.close()
        if self._bridges is not None:
            self._bridges.close()

    @property
    def bridge_ports(self) -> BridgePorts | None:
        """The bridge-port resolver below_bridge uses (None until a path first went below a
        bridge): fdbkeep.FdbKeeper refreshes the FDB entries its answers came from."""
        return self._bridges

    def __enter__(self) -> RtPaths:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- invalidation --------------------------------------------------------

    def _sync(self) -> None:
        changes = self._watch.poll(0)
        if not changes:
            return
        for kind, ifindex, addr in changes:
            if kind == "neigh":
                self._neigh.pop((ifindex, addr or ""), None)
                continue
            if kind == "fdb":
                continue  # the bridge's port for a MAC: BridgePorts watches it, no route depends on it
            self._routes.clear()
            if self._pppoe_plans:
                # a PPPoE re-dial gets a new session id; pppd re-adds its routes even when the
                # ppp device stays (demand dialling), so route changes drop those plans too
                for pkey in self._pppoe_plans:
                    self._plans.pop(pkey, None)
                self._pppoe_plans.clear()
            self._pppoe = None
            if kind in ("link", "resync"):
                self._links.clear()
                self._plans.clear()
            if kind in ("netconf", "resync"):
                self._v6_forwarding = None
            if kind == "resync":
                self._neigh.clear()

    def invalidate(self) -> None:
        """Forget every cached answer (the next calls ask the kernel)."""
        self._routes.clear()
        self._plans.clear()
        self._neigh.clear()
        self._links.clear()
        self._v6_forwarding = None
        self._pppoe = None
        self._pppoe_plans.clear()
        if self._bridges is not None:
            self._bridges.invalidate()

    # -- kernel queries ------------------------------------------------------

    def _link(self, ifindex: int) -> LinkInfo | None:
        if ifindex in self._links:
            return self._links[ifindex]
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = self._ipr.link("get", index=ifindex)
            info = link_from_msg(msgs[0]) if msgs else None
        except NetlinkError as exc:
            if exc.code != _errno.ENODEV:
                raise DeviceError(f"cannot read device ifindex {ifindex}: {exc}") from None
            info = None
        if self._cache:
            self._links[ifindex] = info
        return info

    def _ipv6_forwarding(self) -> bool:
        """net.ipv6.conf.all.forwarding, asked over our socket (RTM_GETNETCONF): /proc/sys/net
        would show the namespace of whichever thread calls, not the one our sockets live in."""
        if self._v6_forwarding is None:
            body = _NETCONFMSG.pack(socket.AF_INET6) + nla(NETCONFA_IFINDEX, I32.pack(NETCONFA_IFINDEX_ALL))
            try:
                data = self._rt.request(RTM_GETNETCONF, 0, body, REPLY_TIMEOUT)
                a = attrs(data, NLMSG_HDRLEN + _NETCONFMSG.size, len(data)) if data is not None else {}
                on = bool(value(data, a.get(NETCONFA_FORWARDING), I32)) if data is not None else False
            except OSError:
                on = False  # unknown: do not offload (the kernel path stays right)
            if not self._cache:
                return on
            self._v6_forwarding = on
        return self._v6_forwarding

    def _lookup(self, family: int, src: bytes | None, dst: bytes, iif: int | None, mark: int,
                proto: int | None, sport: int | None, dport: int | None) -> RouteReply:
        self.lookups += 1
        data = self._rt.request(RTM_GETROUTE, 0,
                                _route_request(family, src, dst, iif, mark, proto, sport, dport),
                                REPLY_TIMEOUT)
        if data is None:
            raise OSError(_errno.EPROTO, "route lookup answered with a bare ACK")
        return parse_route(data)

    def _plan(self, family: int, src: str, dst: str, iif: int | None, mark: int,
              proto: int | None, sport: int | None, dport: int | None) -> Plan | NoPath:
        """A Plan, or the NoPath to answer with (cached like a plan: both hold until
        something changes; never raised itself, each answer raises a copy)."""
        if family not in _ALEN:
            return NoPath(f"address family {family} is not IPv4/IPv6", refusal.BAD_ADDRESS)
        try:
            pdst = socket.inet_pton(family, dst)
            psrc = socket.inet_pton(family, src) if src else None
        except OSError:
            return NoPath(f"bad address in {src!r} -> {dst!r} for family {family}", refusal.BAD_ADDRESS)
        if _is_multicast_or_broadcast(family, pdst):
            return NoPath(f"{dst} is a multicast or broadcast destination", refusal.MULTICAST_DESTINATION)
        try:
            try:
                route = self._lookup(family, psrc, pdst, iif, mark, proto, sport, dport)
            except OSError as exc:
                if not (iif and exc.errno == _errno.EINVAL and psrc is not None):
                    raise
                # Martian source on input: if src is ours, the packet was sent by this
                # host and the output lookup (which accepts only a local src) is its route.
                try:
                    route = self._lookup(family, psrc, pdst, None, mark, proto, sport, dport)
                except TimeoutError:
                    raise
                except OSError:
                    return self._einval_reason(family, src, dst, pdst, iif, mark)
            if iif and family == socket.AF_INET6 and route.type == RTN_UNICAST \
                    and not self._ipv6_forwarding():
                return NoPath("IPv6 forwarding is disabled (net.ipv6.conf.all.forwarding = 0)",
                              refusal.IPV6_FORWARDING_OFF)
            # Every destination behind one gateway shares one plan (and its last Egress).
            pkey = (route.type, route.oif, route.gateway, route.via, route.mtu, route.encap_type,
                    None if route.gateway or route.via else pdst)
            plan = self._plans.get(pkey)
            if plan is None:
                plan = plan_egress(family, pdst, route, self._link, self._pppoe_session)
                if self._cache:
                    self._plans[pkey] = plan
                    if plan.ppp_ifindex:
                        self._pppoe_plans.add(pkey)
                    if len(self._plans) > self._route_max:
                        self._plans.popitem(last=False)
            return plan
        except NoPath as exc:
            return exc.with_traceback(None)  # cached: no frame kept alive with it
        except TimeoutError as exc:
            raise _Transient(NoPath(str(exc), refusal.LOOKUP_FAILED)) from None
        except DeviceError as exc:
            raise _Transient(NoPath(str(exc), refusal.LOOKUP_FAILED)) from None
        except OSError as exc:
            return _verdict_or_transient(exc, dst, iif)

    def _einval_reason(self, family: int, src: str, dst: str, pdst: bytes, iif: int, mark: int) -> NoPath:
        """EINVAL from an input lookup is a blackhole route or a refused source (martian,
        reverse-path filter): the output lookup of dst alone tells the two apart."""
        try:
            self._lookup(family, None, pdst, None, mark, None, None, None)
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno == _errno.EINVAL:
                return NoPath(f"blackhole route to {dst}", refusal.BLACKHOLE)
        return NoPath(f"the kernel refuses {src} -> {dst} arriving on ifindex {iif}: reverse-path filter, "
                      f"martian address or a policy-routed blackhole", refusal.RP_FILTER)

    def _remember(self, key: tuple, value: Plan | NoPath | int) -> None:
        if not self._cache:
            return
        routes = self._routes
        routes[key] = value
        if len(routes) > self._route_max:
            routes.popitem(last=False)

    def _neighbour(self, plan: Plan) -> bytes:
        body = _NDMSG.pack(plan.nh_family, plan.oif, 0, 0, 0) + nla(NDA_DST, plan.nh_addr)
        try:
            data = self._rt.request(RTM_GETNEIGH, 0, body, REPLY_TIMEOUT)
            n = parse_neigh(data) if data is not None else None
        except OSError as exc:
            if exc.errno != _errno.ENOENT:
                raise NotYet(f"neighbour {plan.nkey[1]} on ifindex {plan.oif}: lookup failed: "
                             f"{error_text(exc.errno or 0)}") from None
            n = None
        try:
            mac = neigh_mac(plan, n)
        except NotYet:
            if n is None or n.state in (0, NUD_FAILED):
                self._ask(plan)
            raise
        if self._cache:
            self._neigh[plan.nkey] = mac
            if len(self._neigh) > self._neigh_max:
                self._neigh.popitem(last=False)
        return mac

    def _ask(self, plan: Plan) -> None:
        """Ask the kernel to resolve a missing/FAILED neighbour, at most once a second each."""
        if not self._resolve:
            return
        now = time.monotonic()
        if now - self._asked.get(plan.nkey, -1e9) < RESOLVE_INTERVAL_S:
            return
        if len(self._asked) > 4096:
            self._asked.clear()
        self._asked[plan.nkey] = now
        body = _NDMSG.pack(plan.nh_family, plan.oif, 0, NTF_USE, 0) + nla(NDA_DST, plan.nh_addr)
        try:
            self._rt.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_ACK, body, REPLY_TIMEOUT)
        except OSError:
            pass  # best effort: the kernel resolves on the next slow-path packet anyway

    # -- PathResolver --------------------------------------------------------

    def egress(self, family: int, src: str, dst: str, *, iif: int | None, mark: int,
               proto: int | None = None, sport: int | None = None, dport: int | None = None) -> Egress:
        """The kernel's forwarding path for src -> dst arriving on iif with fwmark mark.

        proto/sport/dport (optional) join the lookup so rules by ipproto/port and
        L4 multipath hashing are seen; they also make every connection its own
        cache entry. Raises NoPath (one-line reason) or NotYet.
        """
        self._sync()
        key = (family, src, dst, iif, mark, proto, sport, dport)
        plan = self._routes.get(key)
        if plan is None:
            try:
                plan = self._plan(family, src, dst, iif, mark, proto, sport, dport)
            except _Transient as exc:
                raise NoPath(*exc.args[0].args) from None
            self._remember(key, plan)
        if plan.__class__ is NoPath:
            raise NoPath(*plan.args)
        assert isinstance(plan, Plan)
        mac = plan.dmac or self._neigh.get(plan.nkey)
        if mac is None:
            mac = self._neighbour(plan)
        eg = plan.last
        if eg is None or eg.dmac != mac:
            eg = build_egress(plan, mac)
            if self._cache:
                plan.last = eg
        return eg

    def device_of(self, family: int, addr: str, *, mark: int) -> int:
        """The output device of the route to addr; NoPath if there is none or addr is local."""
        self._sync()
        key = ("device_of", family, addr, mark)
        hit = self._routes.get(key)
        if hit is None:
            try:
                hit = self._device(family, addr, mark)
            except _Transient as exc:
                raise NoPath(*exc.args[0].args) from None
            self._remember(key, hit)
        if isinstance(hit, NoPath):
            raise NoPath(*hit.args)
        assert isinstance(hit, int)
        return hit

    def _device(self, family: int, addr: str, mark: int) -> int | NoPath:
        try:
            packed = socket.inet_pton(family, addr)
        except OSError:
            return NoPath(f"bad address {addr!r} for family {family}", refusal.BAD_ADDRESS)
        try:
            route = self._lookup(family, None, packed, None, mark, None, None, None)
        except TimeoutError as exc:
            raise _Transient(NoPath(str(exc), refusal.LOOKUP_FAILED)) from None
        except OSError as exc:
            return _verdict_or_transient(exc, addr, None)
        if route.type == RTN_LOCAL:
            return NoPath(f"{addr} is local to this host", refusal.LOCAL_DESTINATION)
        if route.type != RTN_UNICAST or not route.oif:
            return NoPath(f"route to {addr} is of type {_RTN_NAMES.get(route.type, route.type)}",
                          refusal.ROUTE_TYPE)
        return route.oif

    def below_bridge(self, bridge: Layer, dmac: bytes) -> tuple[Layer, ...]:
        """model.PathResolver.below_bridge: the port of bridge layer ``bridge`` where dmac is
        learned (pyflow.control.bridge.BridgePorts, which watches the FDB) and the devices
        below it. Raises NotYet (not learned yet) or NoPath."""
        self._sync()
        if self._bridges is None:
            from pyflow.control.bridge import BridgePorts

            # its sockets must be in this resolver's namespace, as ours are
            self._check_netns()
            self._bridges = BridgePorts(cache=self._cache)
        try:
            port = self._bridges.port_of(bridge.ifindex, dmac, bridge_vid(bridge))
            return port_layers(bridge, port, self._link)
        except DeviceError as exc:
            raise NoPath(str(exc), refusal.LOOKUP_FAILED) from None

    def _check_netns(self) -> None:
        if self._sessions.netns != pppoe_netns():
            raise NoPath("the path resolver is used from another network namespace than its own",
                         refusal.LOOKUP_FAILED)

    def _pppoe_session(self, dev: LinkInfo) -> tuple[Session, LinkInfo]:
        """The PPPoE session ppp device dev runs over (pppoe.session_of decides which) and the
        device the session runs over. Read from the kernel once per link or route change."""
        view = self._pppoe
        if view is None:
            try:
                sessions = self._sessions.read()
            except (OSError, ValueError) as exc:
                raise DeviceError(f"cannot read the PPPoE sessions: {exc}") from None
            devices = self._namespace_links()
            view = _PppoeView(sessions, tuple(d.ifname for d in devices if _is_ppp(d)),
                              {d.ifname: d.ifindex for d in devices})
            if self._cache:
                self._pppoe = view
        session = session_of(dev.ifname, view.ppp_devices, view.sessions)
        index = view.by_name.get(session.device)
        lower = self._link(index) if index is not None else None
        if lower is None:
            raise NoPath(f"device {session.device} of the PPPoE session of {dev.ifname} is gone",
                         refusal.DEVICE_GONE)
        return session, lower

    def _namespace_links(self) -> list[LinkInfo]:
        """Every device of the namespace (one dump: only when a ppp path is planned)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return [link_from_msg(msg) for msg in self._ipr.get_links()]
        except NetlinkError as exc:
            raise DeviceError(f"cannot list the devices: {exc}") from None

    def mac_of(self, ifindex: int) -> bytes:
        self._sync()
        info = self._link(ifindex)
        if info is None:
            raise DeviceError(f"no such device: ifindex {ifindex}")
        if info.mac is None:
            raise DeviceError(f"device {info.ifname} has no link-layer address")
        return info.mac
