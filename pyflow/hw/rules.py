"""Flower rules from the flow entries the engine plans for the XDP fast path.

One flow entry (FlowKey, FlowAction: pyflow.control.engine plans them from the
conntrack tuple pair and the path) becomes one flower filter on the ingress
device's clsact ingress, so both placements implement the same forwarding:

* match: the ingress device, EtherType, VLAN id(s) when the key has them, IP
  protocol, both addresses, both ports;
* actions: VLAN pop for tags the key carries; one pedit with the Ethernet
  addresses, the NAT rewrite (addresses, ports) and the TTL / hop-limit decrement
  (a pedit ``add`` of 0xff to that byte); csum (IPv4 header, TCP/UDP); VLAN push
  (or modify) for the egress tags; mirred egress redirect to the out device.

What the XDP path sends to the kernel and a flower rule cannot simply refuse,
and what pyflow does instead:

* TCP FIN, RST, SYN: the rule matches only TCP segments with none of these flags
  set (TCA_FLOWER_KEY_TCP_FLAGS under mask FIN|SYN|RST), so they miss the rule
  and take the kernel path; conntrack sees the close, its event takes the
  connection off, and the rules are deleted.
* TTL / hop limit <= 1: a filter cannot match "greater than 1". Each device gets
  guard filters ahead of the flow rules (:func:`guard_filters`) that match TTL 0
  or 1 (value 0 under mask 0xfe) and end classification with ``pass``: the
  kernel sends the ICMP time-exceeded, as for any router.
* Fragments: the rule matches only non-fragments (FLOW_DIS_IS_FRAGMENT clear);
  a first fragment would otherwise carry matching ports.
* Over-MTU: a filter cannot compare a packet's length with the egress MTU and
  mirred drops what does not fit, so no ICMP too-big would be sent. A connection
  goes to a flower rule only when each direction's egress MTU is at least the
  ingress device's MTU (then nothing that arrived can be too big to leave);
  otherwise :class:`Unplaceable` and it stays on the XDP path.
* IPv4 options: a flower rule forwards them (pedit finds the TCP/UDP header
  through the header length), where the XDP path hands them to the kernel.
  Forwarding options unchanged is what the kernel does too.
* PPPoE egress or ingress: no act_pppoe exists, so :class:`Unplaceable`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace

from pyflow.datapath.abi import FlowAction, FlowKey, mac_bytes
from pyflow.hw import flower as F

FULL = b"\0\0\0\0"  # pedit mask: keep no bit of the word
FLAGS_TO_KERNEL = F.TCP_FIN | F.TCP_SYN | F.TCP_RST


class Unplaceable(Exception):
    """This flow cannot be a flower rule (the reason is the message); it stays on the XDP path."""


@dataclass(frozen=True)
class Placement:
    """Where a flow's rule goes: the ingress device and the filter's priority and protocol."""

    ifindex: int
    prio: int
    protocol: int


# Priorities on clsact ingress: guards first, then flow rules by protocol (one flower
# instance per priority, and all filters of one priority share its protocol), all
# ahead of the datapath's own cls_bpf hook (pyflow.datapath.attach.tc.TC_PRIO = 0x2F10).
GUARD_PRIO = 0x2E00
RULE_PRIO = 0x2E10
PROTOCOLS = (F.ETH_P_IP, F.ETH_P_IPV6, F.ETH_P_8021Q, F.ETH_P_8021AD)


def prio_of(protocol: int, *, guard: bool = False) -> int:
    return (GUARD_PRIO if guard else RULE_PRIO) + PROTOCOLS.index(protocol)


def _family_type(addr: str) -> int:
    return F.ETH_P_IP if ipaddress.ip_address(addr).version == 4 else F.ETH_P_IPV6


def _word(data: bytes, start: int) -> list[tuple[int, bytes, bytes]]:
    """pedit (off, mask, val) keys writing data at byte offset start: whole aligned words,
    the bytes outside data kept through the mask."""
    out = []
    end = start + len(data)
    off = start - start % 4
    while off < end:
        mask = bytearray(b"\xff" * 4)
        val = bytearray(4)
        for i in range(4):
            pos = off + i
            if start <= pos < end:
                mask[i] = 0
                val[i] = data[pos - start]
        out.append((off, bytes(mask), bytes(val)))
        off += 4
    return out


def _merge(keys: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
    """One key per word: edits of the same word (source and destination port) combined."""
    words: dict[int, tuple[bytearray, bytearray]] = {}
    for off, mask, val in keys:
        m, v = words.setdefault(off, (bytearray(b"\xff" * 4), bytearray(4)))
        for i in range(4):
            if mask[i] == 0:
                m[i], v[i] = 0, val[i]
    return [(off, bytes(m), bytes(v)) for off, (m, v) in sorted(words.items())]


def pedit_keys(key: FlowKey, action: FlowAction) -> tuple[F.PeditKey, ...]:
    """The edits of one flow entry: MACs, NAT, TTL / hop-limit decrement."""
    v4 = _family_type(key.saddr) == F.ETH_P_IP
    ip_type = F.HTYPE_IP4 if v4 else F.HTYPE_IP6
    l4_type = F.HTYPE_TCP if key.proto == socket.IPPROTO_TCP else F.HTYPE_UDP
    out = [F.PeditKey(F.HTYPE_ETH, F.CMD_SET, off, m, v)
           for off, m, v in _word(mac_bytes(action.dmac) + mac_bytes(action.smac), 0)]
    ip_edits = []
    src_at, dst_at = (12, 16) if v4 else (8, 24)
    if action.nat_saddr is not None and action.nat_saddr != key.saddr:
        ip_edits += _word(ipaddress.ip_address(action.nat_saddr).packed, src_at)
    if action.nat_daddr is not None and action.nat_daddr != key.daddr:
        ip_edits += _word(ipaddress.ip_address(action.nat_daddr).packed, dst_at)
    out += [F.PeditKey(ip_type, F.CMD_SET, off, m, v) for off, m, v in _merge(ip_edits)]
    # TTL is byte 8 of the IPv4 header, the hop limit byte 7 of the IPv6 one; adding 0xff
    # to that byte alone (the others kept by the mask) is a decrement by one
    ttl_at = 8 if v4 else 7
    ((off, mask, val),) = _word(b"\xff", ttl_at)
    out.append(F.PeditKey(ip_type, F.CMD_ADD, off, mask, val))
    l4_edits = []
    if action.nat_sport is not None and action.nat_sport != key.sport:
        l4_edits += _word(action.nat_sport.to_bytes(2, "big"), 0)
    if action.nat_dport is not None and action.nat_dport != key.dport:
        l4_edits += _word(action.nat_dport.to_bytes(2, "big"), 2)
    out += [F.PeditKey(l4_type, F.CMD_SET, off, m, v) for off, m, v in _merge(l4_edits)]
    return tuple(out)


def _vlan_tags(tci: int | None, tpid: int) -> list[tuple[int, int, int]]:
    return [] if tci is None else [(tci & 0x0FFF, tci >> 13, tpid)]


def flow_filter(key: FlowKey, action: FlowAction, *, indev: str, flags: int,
                ingress_mtu: int) -> tuple[Placement, F.FlowerFilter]:
    """The flower filter carrying one flow entry, and where it goes; Unplaceable if none can."""
    if key.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        raise Unplaceable(f"ip protocol {key.proto}")
    if key.pppoe_sid or action.pppoe_sid is not None:
        raise Unplaceable("pppoe")
    if action.mtu < ingress_mtu:
        raise Unplaceable("mtu")  # module docstring: mirred would drop what the XDP path hands back
    l3 = _family_type(key.saddr)
    match = F.Match(eth_type=l3, indev=indev, ip_proto=key.proto, src=key.saddr, dst=key.daddr,
                    sport=key.sport, dport=key.dport, ip_flags=(0, F.FLOW_DIS_IS_FRAGMENT),
                    tcp_flags=(0, FLAGS_TO_KERNEL) if key.proto == socket.IPPROTO_TCP else None)
    actions: list[F.Action] = []
    ingress_tags = [t for t in (key.vlan_outer, key.vlan_inner) if t]
    if ingress_tags:
        # the key's tags as the datapath parsed them (outer first): the outer one with its
        # protocol (802.1Q or 802.1ad, part of the match), the inner one 802.1Q
        protocol = key.vlan_outer_tpid
        if protocol not in (F.ETH_P_8021Q, F.ETH_P_8021AD):
            raise Unplaceable(f"VLAN protocol 0x{protocol:04x}")
        if len(ingress_tags) == 2:
            match = replace(match, eth_type=protocol, vlan_id=ingress_tags[0] & 0x0FFF,
                            vlan_eth_type=F.ETH_P_8021Q, cvlan_id=ingress_tags[1] & 0x0FFF, cvlan_eth_type=l3)
        else:
            match = replace(match, eth_type=protocol, vlan_id=ingress_tags[0] & 0x0FFF,
                            vlan_eth_type=l3)
    else:
        protocol = l3
    egress_tags = (_vlan_tags(action.vlan_inner_tci, F.ETH_P_8021Q)
                   + _vlan_tags(action.vlan_outer_tci, action.vlan_outer_tpid))  # innermost first
    if len(ingress_tags) == 1 and len(egress_tags) == 1 and egress_tags[0][2] == F.ETH_P_8021Q:
        vid, prio, tpid = egress_tags[0]
        pops: list[F.Action] = []
        retag: list[F.Action] = [F.Vlan(F.VLAN_MODIFY, vid, prio, tpid)]
    else:
        pops = [F.Vlan(F.VLAN_POP) for _ in ingress_tags]
        retag = [F.Vlan(F.VLAN_PUSH, vid, prio, tpid) for vid, prio, tpid in egress_tags]
    actions += pops
    actions.append(F.Pedit(pedit_keys(key, action)))
    csum = F.CSUM_TCP if key.proto == socket.IPPROTO_TCP else F.CSUM_UDP
    actions.append(F.Csum(csum | (F.CSUM_IPV4HDR if l3 == F.ETH_P_IP else 0)))
    actions += retag
    actions.append(F.Mirred(action.out_ifindex))
    return Placement(key.ifindex, prio_of(protocol), protocol), F.FlowerFilter(match, tuple(actions), flags)


def guard_filters(ifindex: int, *, flags: int) -> list[tuple[Placement, F.FlowerFilter]]:
    """Per device: IPv4 TTL / IPv6 hop limit 0 or 1 ends classification with pass, ahead of
    the flow rules, so those packets reach the kernel (which answers time-exceeded)."""
    out = []
    for l3 in (F.ETH_P_IP, F.ETH_P_IPV6):
        match = F.Match(eth_type=l3, ip_ttl=(0, 0xFE))
        out.append((Placement(ifindex, prio_of(l3, guard=True), l3),
                    F.FlowerFilter(match, (F.Gact(F.TC_ACT_OK),), flags)))
    return out
