"""Is a redirect right? A check of every frame a hook redirected, independent of the model.

The model (reference.py) predicts every verdict; this check asks a narrower question
with other means: scapy dissects the frame as it came in, and a redirect is right only
when the frame is exactly a hit of an installed flow: Ethernet to the flow's ingress
MAC, at most an 802.1Q or 802.1ad tag and an inner 802.1Q tag (no VLAN id 0), at most
a PPPoE session header (version 1, type 1, code 0, session not 0, length covering the
IP packet and inside the frame) carrying IPv4 or IPv6, a whole IP header without
options, fragments or extension headers, a whole TCP or UDP header inside the IP
packet, TTL above 1, no FIN or RST, and the VLAN ids (the outer tag's protocol too),
session id, addresses, ports and protocol of an installed key. Anything else forwarded
by the fast path is a wrong redirect: the kernel would have dropped it, treated it
otherwise, or sent it to another flow.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE, PPPoED

from pyflow.datapath import abi

ETH_P_8021Q, ETH_P_8021AD = abi.ETH_P_8021Q, abi.ETH_P_8021AD


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(addr)


class RedirectCheck:
    """The installed flows as (key fields) -> ingress MAC, for judging redirects."""

    def __init__(self, flows: Iterable[tuple[abi.FlowKey, abi.FlowAction]]) -> None:
        self.hits: dict[tuple, bytes] = {}
        for k, a in flows:
            tpid = k.vlan_outer_tpid if k.vlan_outer else 0
            key = (k.ifindex, k.vlan_outer, tpid, k.vlan_inner, k.pppoe_sid, k.proto, _ip(k.saddr),
                   _ip(k.daddr), k.sport, k.dport)
            self.hits[key] = abi.mac_bytes(a.in_mac)

    def wrong(self, frame: bytes, ifindex: int) -> str | None:
        """Why redirecting frame (arrived on ifindex) is wrong, or None when it is a hit."""
        n = len(frame)
        if n < 14:
            return "shorter than an Ethernet header"
        layer = Ether(frame).payload
        off = 14
        vids: list[int] = []
        outer_tpid = 0
        while isinstance(layer, Dot1Q):
            if off + 4 > n:
                return "a cut VLAN tag"
            if len(vids) == 2:
                return "a third VLAN tag"
            if vids and isinstance(layer, Dot1AD):
                return "an 802.1ad tag inside a tag"
            if layer.vlan == 0:
                return "VLAN id 0"
            if not vids:  # the TPID as on the wire
                outer_tpid = struct.unpack_from("!H", frame, 12)[0]
                if outer_tpid not in (ETH_P_8021Q, ETH_P_8021AD):
                    return f"outer TPID {outer_tpid:#06x}"
            vids.append(layer.vlan)
            off += 4
            layer = layer.payload
        sid = 0
        pppoe_len = None
        if isinstance(layer, PPPoED):
            return "PPPoE discovery"
        if isinstance(layer, PPPoE):
            if off + 8 > n or not isinstance(layer.payload, PPP):
                return "a cut PPPoE header"
            if (layer.version, layer.type, layer.code) != (1, 1, 0):
                return f"PPPoE version/type/code {layer.version}/{layer.type}/{layer.code}"
            if layer.sessionid == 0:
                return "PPPoE session 0"
            sid, pppoe_len = layer.sessionid, layer.len
            if layer.payload.proto not in (0x0021, 0x0057):
                return f"PPP protocol {layer.payload.proto:#06x}"
            off += 8
            layer = layer.payload.payload
        l3off = off
        if isinstance(layer, IP):
            if off + 20 > n or layer.version != 4 or layer.ihl != 5:
                return "not a whole option-less IPv4 header"
            l3len = layer.len
            if l3len < 20 or off + l3len > n:
                return f"IPv4 length {l3len} against {n - off} bytes"
            hdr = bytearray(frame[off:off + 20])
            words = struct.unpack("!10H", hdr)
            s = sum(words)
            while s > 0xFFFF:
                s = (s & 0xFFFF) + (s >> 16)
            if s != 0xFFFF:
                return "IPv4 header checksum"
            if layer.flags.MF or layer.frag:
                return "IPv4 fragment"
            ttl, proto, l4off = layer.ttl, layer.proto, off + 20
        elif isinstance(layer, IPv6):
            if off + 40 > n or layer.version != 6:
                return "not a whole IPv6 header"
            l3len = 40 + layer.plen
            if off + l3len > n:
                return f"IPv6 length {l3len} against {n - off} bytes"
            ttl, proto, l4off = layer.hlim, layer.nh, off + 40
        else:
            return "not IPv4 or IPv6"
        if proto not in (6, 17):
            return f"IP protocol {proto}"
        l4 = layer.payload
        avail = l3len - (l4off - l3off)
        if proto == 6:
            if not isinstance(l4, TCP) or l4off + 20 > n:
                return "a cut TCP header"
            if l4.dataofs < 5 or l4.dataofs * 4 > avail:
                return f"TCP data offset {l4.dataofs}"
            if l4.flags.F or l4.flags.R:
                return "TCP FIN or RST"
        else:
            if not isinstance(l4, UDP) or l4off + 8 > n:
                return "a cut UDP header"
            if l4.len < 8 or l4.len > avail:
                return f"UDP length {l4.len}"
            if isinstance(layer, IPv6) and l4.chksum == 0:
                return "UDP checksum 0 over IPv6"
        if pppoe_len is not None and (l3len + 2 > pppoe_len or l3off - 2 + pppoe_len > n):
            return f"PPPoE length {pppoe_len} against IP length {l3len} and {n - l3off + 2} bytes"
        if ttl <= 1:
            return f"TTL {ttl}"
        key = (ifindex, vids[0] if vids else 0, outer_tpid, vids[1] if len(vids) > 1 else 0, sid, proto,
               _ip(layer.src), _ip(layer.dst), l4.sport, l4.dport)
        mac = self.hits.get(key)
        if mac is None:
            return "no installed key (VLAN ids and tag protocol, session, addresses, ports, protocol)"
        if frame[:6] != mac:
            return "destination MAC is not the flow's ingress MAC"
        return None
