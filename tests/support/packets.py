"""The datapath's packet table: input frames, flow entries, expected verdicts and output.

Every row says, for each hook, which reason the stats map must count and, for a
forwarded packet, the exact frame that must leave. Expected frames are built
here with scapy from the input packet and the flow action's values (new MACs,
tags, PPPoE session, NAT addresses and ports, TTL - 1) with the checksums
deleted so that scapy computes them afresh: nothing of pyflow's own code takes
part in computing what the datapath must produce. A packet that is not
forwarded must leave exactly as it came.

The rows can feed a micro-benchmark, through a harness that restores the frame
before every repetition (BPF_PROG_TEST_RUN replays one buffer, which a forward
rewrites), as tests/bench/bench_datapath.py does.

Hook differences: TC can only grow the L2 header at the head and pop VLAN tags
(a PPPoE header is turned into tags first), and a GSO skb must keep its L2
length and not leave with PPPoE; the rows that meet those limits say so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE, PPPoED
from scapy.packet import Packet, Raw

from pyflow.datapath.abi import ETH_P_8021AD, ETH_P_8021Q, PROTO_TCP, PROTO_UDP, FlowAction, FlowKey
from pyflow.datapath.testrun import TEST_IFINDEX

# The router under test: frames arrive on IN_MAC from PEER_MAC and leave from OUT_MAC to NEXTHOP_MAC.
PEER_MAC = "02:00:00:00:00:01"
IN_MAC = "02:00:00:00:00:aa"
OUT_MAC = "02:00:00:00:00:bb"
NEXTHOP_MAC = "02:00:00:00:00:02"
OTHER_MAC = "02:00:00:00:00:cc"

IFINDEX = TEST_IFINDEX  # XDP: ingress_ifindex of the test context; TC: test skbs run on lo
OUT_IFINDEX = TEST_IFINDEX  # TC redirect target (the test run does not transmit)
TX_SLOT = 0  # devmap slot holding a device (lo) for the XDP redirect
PPP_IFINDEX = 77  # a PPP device's ifindex in an action: a TC test run records the redirect, sends nothing
EMPTY_SLOT = 5  # devmap slot left empty: the XDP redirect falls back to XDP_PASS
MTU = 1500

# RFC 2544 / RFC 5180 benchmarking ranges only.
CLIENT4, SERVER4, ROUTER4, PUBLIC4 = "198.18.0.2", "198.19.0.2", "198.19.0.1", "198.18.0.1"
CLIENT6, SERVER6, ROUTER6, PUBLIC6 = "2001:2::2", "2001:2:0:1::2", "2001:2:0:1::1", "2001:2::1"
CPORT, SPORT, NAT_PORT, PUB_PORT = 40000, 80, 50000, 8080

# struct __sk_buff (UAPI, append-only layout): offsets of the fields a TC test context sets.
SKB_CTX_SIZE = 192
SKB_OFF_GSO_SEGS = 164
SKB_OFF_GSO_SIZE = 176


@dataclass(frozen=True)
class Expect:
    """What one hook must do: the reason counted, and the frame sent for a forward."""

    reason: str
    output: bytes | None = None
    why: str = ""  # for hook-specific expectations: why this hook differs


@dataclass(frozen=True)
class Case:
    name: str
    packet: bytes
    xdp: Expect | None  # None: the row cannot run on this hook (see tc_only / xdp_only)
    tc: Expect | None
    flows: tuple[tuple[FlowKey, FlowAction], ...] = ()
    skb_ctx: bytes | None = None  # TC only: struct __sk_buff for the test run (GSO)
    packets: int = 1  # increment of the flow's packet counter on a forward
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def flow(self) -> tuple[FlowKey, FlowAction]:
        return self.flows[0]


def skb_ctx(gso_segs: int, gso_size: int) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, SKB_OFF_GSO_SEGS, gso_segs)
    struct.pack_into("<I", ctx, SKB_OFF_GSO_SIZE, gso_size)
    return bytes(ctx)


# ---- building input packets -------------------------------------------------------------


def payload(n: int) -> Raw:
    return Raw(bytes((i * 7 + 3) & 0xFF for i in range(n)))


def eth(dst: str = IN_MAC) -> Ether:
    return Ether(dst=dst, src=PEER_MAC)


def tcp4(src=CLIENT4, dst=SERVER4, sport=CPORT, dport=SPORT, flags="A", ttl=64, n=32, **ip) -> Packet:
    return IP(src=src, dst=dst, ttl=ttl, **ip) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                                      ack=2000) / payload(n)


def udp4(src=CLIENT4, dst=SERVER4, sport=CPORT, dport=SPORT, ttl=64, n=40, **ip) -> Packet:
    return IP(src=src, dst=dst, ttl=ttl, **ip) / UDP(sport=sport, dport=dport) / payload(n)


def tcp6(src=CLIENT6, dst=SERVER6, sport=CPORT, dport=SPORT, flags="A", hlim=64, n=32, **ip) -> Packet:
    return IPv6(src=src, dst=dst, hlim=hlim, **ip) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                                          ack=2000) / payload(n)


def udp6(src=CLIENT6, dst=SERVER6, sport=CPORT, dport=SPORT, hlim=64, n=40, **ip) -> Packet:
    return IPv6(src=src, dst=dst, hlim=hlim, **ip) / UDP(sport=sport, dport=dport) / payload(n)


def vlan(tci: int, tpid: int = ETH_P_8021Q) -> Packet:
    cls = Dot1AD if tpid == ETH_P_8021AD else Dot1Q
    return cls(prio=tci >> 13, dei=(tci >> 12) & 1, vlan=tci & 0xFFF)


def pppoe(sid: int, l3: Packet) -> Packet:
    return PPPoE(sessionid=sid) / PPP(proto=0x0021 if IP in l3 else 0x0057)


# ---- flow entries ------------------------------------------------------------------------


def key_of(l3: Packet, *, vlan_outer: int = 0, vlan_inner: int = 0, pppoe_sid: int = 0,
           ifindex: int = IFINDEX, tpid: int = ETH_P_8021Q) -> FlowKey:
    """The key the datapath must build for this packet (tpid: the outer tag's protocol)."""
    ip = l3[IP] if IP in l3 else l3[IPv6]
    l4 = l3[TCP] if TCP in l3 else l3[UDP]
    return FlowKey(ifindex=ifindex, proto=PROTO_TCP if TCP in l3 else PROTO_UDP, saddr=ip.src,
                   daddr=ip.dst, sport=l4.sport, dport=l4.dport, vlan_outer=vlan_outer,
                   vlan_inner=vlan_inner, pppoe_sid=pppoe_sid, vlan_outer_tpid=tpid)


AD = ETH_P_8021AD


def action(**kw: Any) -> FlowAction:
    base: dict[str, Any] = dict(out_ifindex=OUT_IFINDEX, tx_port=TX_SLOT, mtu=MTU, in_mac=IN_MAC,
                                dmac=NEXTHOP_MAC, smac=OUT_MAC)
    base.update(kw)
    return FlowAction(**base)


# ---- expected output -----------------------------------------------------------------------


def rewritten_l3(l3: Packet, act: FlowAction, *, keep_udp_zero: bool = False) -> Packet:
    """The IP packet as it must leave: NAT per the action, TTL / hop limit - 1, checksums redone."""
    p = l3.__class__(bytes(l3))  # a fresh copy with every field explicit, as on the wire
    ip = p[IP] if IP in p else p[IPv6]
    if act.nat_saddr is not None:
        ip.src = act.nat_saddr
    if act.nat_daddr is not None:
        ip.dst = act.nat_daddr
    if IP in p:
        ip.ttl -= 1
        del ip.chksum
    else:
        ip.hlim -= 1
    l4 = p[TCP] if TCP in p else p[UDP]
    if act.nat_sport is not None:
        l4.sport = act.nat_sport
    if act.nat_dport is not None:
        l4.dport = act.nat_dport
    if not keep_udp_zero:
        del l4.chksum
    return p


def egress_l2(act: FlowAction, l3: Packet, hook: str) -> Packet:
    """The egress L2 header in the frame data. TC hands the outer VLAN tag to the
    kernel as skb metadata (bpf_skb_vlan_push), so its data carries only the inner
    tag of a QinQ egress; the test run cannot show metadata (tests/integration/
    test_vlan_egress.py checks the tag on the wire)."""
    l2: Packet = Ether(dst=act.dmac, src=act.smac)
    if act.vlan_outer_tci is not None:
        if hook == "xdp":
            l2 = l2 / vlan(act.vlan_outer_tci, act.vlan_outer_tpid)
        if act.vlan_inner_tci is not None:
            l2 = l2 / vlan(act.vlan_inner_tci)
    if act.pppoe_sid is not None:
        l2 = l2 / pppoe(act.pppoe_sid, l3)
    return l2


def forwarded(l3: Packet, act: FlowAction, hook: str, *, keep_udp_zero: bool = False) -> bytes:
    new_l3 = rewritten_l3(l3, act, keep_udp_zero=keep_udp_zero)
    return bytes(egress_l2(act, new_l3, hook) / new_l3)


# ---- the table -----------------------------------------------------------------------------


def fwd_case(name: str, l2_in: Packet, l3: Packet, act: FlowAction, *, key: FlowKey | None = None,
             keep_udp_zero: bool = False, tc: Expect | None = None, trailer: bytes = b"", tags=()) -> Case:
    """A row whose packet hits its flow and is forwarded (by both hooks unless tc says otherwise).
    trailer: bytes after the IP packet (Ethernet padding), which travel along unchanged."""
    k = key if key is not None else key_of(l3)
    out = {hook: forwarded(l3, act, hook, keep_udp_zero=keep_udp_zero) + trailer for hook in ("xdp", "tc")}
    return Case(name, bytes(l2_in / l3) + trailer, xdp=Expect("forwarded", out["xdp"]),
                tc=tc or Expect("forwarded", out["tc"]), flows=((k, act),), tags=frozenset(tags))


def pass_case(name: str, frame: Packet | bytes, reason: str, flows=(), tags=()) -> Case:
    """A row the datapath must hand to the kernel unchanged, counting `reason` (both hooks)."""
    return Case(name, bytes(frame), xdp=Expect(reason), tc=Expect(reason), flows=tuple(flows),
                tags=frozenset(tags))


def hit_pass_case(name: str, l2_in: Packet, l3: Packet, reason: str, act: FlowAction | None = None,
                  key: FlowKey | None = None, tags=()) -> Case:
    """A packet whose flow is installed but which must still go to the kernel."""
    k = key if key is not None else key_of(l3)
    return pass_case(name, l2_in / l3, reason, flows=[(k, act or action())], tags=tags)


SNAT4 = dict(nat_saddr=ROUTER4, nat_sport=NAT_PORT)
DNAT4 = dict(nat_daddr=SERVER4, nat_dport=SPORT)
SNAT6 = dict(nat_saddr=ROUTER6, nat_sport=NAT_PORT)
DNAT6 = dict(nat_daddr=SERVER6, nat_dport=SPORT)


def build_cases() -> list[Case]:
    c: list[Case] = []

    # ---- forwarded: NAT variants, IPv4 / IPv6, TCP / UDP ----
    c.append(fwd_case("ipv4 tcp snat", eth(), tcp4(), action(**SNAT4), tags={"counters"}))
    c.append(fwd_case("ipv4 tcp dnat", eth(), tcp4(dst=PUBLIC4, dport=PUB_PORT), action(**DNAT4)))
    c.append(fwd_case("ipv4 tcp snat+dnat", eth(), tcp4(dst=PUBLIC4, dport=PUB_PORT),
                      action(**SNAT4, **DNAT4)))
    c.append(fwd_case("ipv4 tcp no nat", eth(), tcp4(), action()))
    c.append(fwd_case("ipv4 tcp options, dscp+ecn kept", eth(),
                      IP(src=CLIENT4, dst=SERVER4, ttl=9, tos=0xB9, id=4242, flags="DF")
                      / TCP(sport=CPORT, dport=SPORT, flags="PA",
                            options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]) / payload(100),
                      action(**SNAT4, **DNAT4)))
    c.append(fwd_case("ipv4 udp snat", eth(), udp4(), action(**SNAT4)))
    c.append(fwd_case("ipv4 udp dnat", eth(), udp4(dst=PUBLIC4, dport=PUB_PORT), action(**DNAT4)))
    udp0 = IP(src=CLIENT4, dst=SERVER4, ttl=64) / UDP(sport=CPORT, dport=SPORT, chksum=0) / payload(40)
    c.append(fwd_case("ipv4 udp checksum 0 stays 0", eth(), udp0, action(**SNAT4, **DNAT4),
                      keep_udp_zero=True))
    c.append(fwd_case("ipv4 udp in a padded minimum frame", eth(), udp4(n=2), action(**SNAT4, pppoe_sid=9),
                      trailer=bytes(60 - 14 - 30)))
    c.append(fwd_case("ipv4 ttl 2 leaves with 1", eth(), tcp4(ttl=2), action(**SNAT4)))
    c.append(fwd_case("ipv6 tcp snat+dnat", eth(), tcp6(dst=PUBLIC6, dport=PUB_PORT),
                      action(**SNAT6, **DNAT6)))
    c.append(fwd_case("ipv6 tcp no nat, tclass+flow label kept", eth(), tcp6(tc=0x2D, fl=0xABCDE),
                      action()))
    c.append(fwd_case("ipv6 udp snat", eth(), udp6(), action(**SNAT6)))
    c.append(fwd_case("ipv6 udp dnat", eth(), udp6(dst=PUBLIC6, dport=PUB_PORT), action(**DNAT6)))

    # ---- forwarded: L2 in / out ----
    l3 = tcp4()
    c.append(fwd_case("vlan in, untagged out", eth() / vlan(10), l3, action(**SNAT4),
                      key=key_of(l3, vlan_outer=10)))
    c.append(fwd_case("untagged in, vlan out", eth(), l3, action(vlan_outer_tci=20)))
    c.append(fwd_case("vlan in, other vlan out (prio kept from action)", eth() / vlan(10), l3,
                      action(vlan_outer_tci=(5 << 13) | 20), key=key_of(l3, vlan_outer=10)))
    c.append(fwd_case("802.1ad+802.1q in, untagged out", eth() / vlan(100, ETH_P_8021AD) / vlan(10), l3,
                      action(**SNAT4), key=key_of(l3, vlan_outer=100, vlan_inner=10, tpid=AD)))
    c.append(fwd_case("802.1q+802.1q in, vlan out", eth() / vlan(100) / vlan(10), l3,
                      action(vlan_outer_tci=30), key=key_of(l3, vlan_outer=100, vlan_inner=10)))
    c.append(fwd_case("untagged in, 802.1ad+802.1q out", eth(), tcp6(),
                      action(vlan_outer_tci=200, vlan_outer_tpid=ETH_P_8021AD, vlan_inner_tci=7)))
    c.append(fwd_case("vlan in, 802.1q+802.1q out", eth() / vlan(10), l3,
                      action(vlan_outer_tci=200, vlan_inner_tci=7), key=key_of(l3, vlan_outer=10)))
    c.append(fwd_case("untagged in, pppoe out (ipv4)", eth(), l3, action(**SNAT4, pppoe_sid=0x1234)))
    c.append(fwd_case("untagged in, pppoe out (ipv6)", eth(), udp6(), action(pppoe_sid=7)))
    # a PPP device in the action changes nothing for a packet that is not GSO
    c.append(fwd_case("untagged in, pppoe out, ppp device named", eth(), udp4(),
                      action(**SNAT4, pppoe_sid=0x77, ppp_ifindex=PPP_IFINDEX)))
    c.append(fwd_case("vlan in, vlan+pppoe out", eth() / vlan(10), udp4(),
                      action(vlan_outer_tci=35, pppoe_sid=0x55), key=key_of(udp4(), vlan_outer=10)))
    l3 = tcp4(src=SERVER4, dst=ROUTER4, sport=SPORT, dport=NAT_PORT)
    reply = action(nat_daddr=CLIENT4, nat_dport=CPORT)
    c.append(fwd_case("pppoe in, pppoe out (other session)", eth() / pppoe(0x1234, l3), l3,
                      action(nat_daddr=CLIENT4, nat_dport=CPORT, pppoe_sid=0x99),
                      key=key_of(l3, pppoe_sid=0x1234)))
    c.append(fwd_case("vlan+pppoe in, pppoe out", eth() / vlan(10) / pppoe(0x1234, l3), l3,
                      action(pppoe_sid=0x1234), key=key_of(l3, vlan_outer=10, pppoe_sid=0x1234)))
    c.append(fwd_case("pppoe in, untagged out (ipv4)", eth() / pppoe(0x1234, l3), l3, reply,
                      key=key_of(l3, pppoe_sid=0x1234)))
    # TC removes PPPoE by turning it into VLAN tags and popping those (context.h)
    c.append(fwd_case("vlan+pppoe in, untagged out", eth() / vlan(10) / pppoe(0x1234, l3), l3, reply,
                      key=key_of(l3, vlan_outer=10, pppoe_sid=0x1234)))
    c.append(fwd_case("802.1ad+802.1q+pppoe in, vlan out",
                      eth() / vlan(100, ETH_P_8021AD) / vlan(10) / pppoe(0x1234, l3), l3,
                      action(nat_daddr=CLIENT4, nat_dport=CPORT, vlan_outer_tci=30),
                      key=key_of(l3, vlan_outer=100, vlan_inner=10, pppoe_sid=0x1234, tpid=AD)))
    c.append(fwd_case("pppoe in, 802.1q+802.1q out (same length)", eth() / pppoe(0x1234, l3), l3,
                      action(nat_daddr=CLIENT4, nat_dport=CPORT, vlan_outer_tci=30, vlan_inner_tci=31),
                      key=key_of(l3, pppoe_sid=0x1234)))
    l3 = tcp6(src=SERVER6, dst=ROUTER6, sport=SPORT, dport=NAT_PORT)
    c.append(fwd_case("pppoe in, vlan out (ipv6)", eth() / pppoe(0x1234, l3), l3,
                      action(nat_daddr=CLIENT6, nat_dport=CPORT, vlan_outer_tci=10),
                      key=key_of(l3, pppoe_sid=0x1234)))

    # ---- passed: the flow is there but the packet is the kernel's ----
    l3 = tcp4()
    c.append(hit_pass_case("not for us (other destination MAC)", eth(OTHER_MAC), l3, "not_for_us"))
    c.append(hit_pass_case("broadcast destination MAC", eth("ff:ff:ff:ff:ff:ff"), l3, "not_for_us"))
    c.append(hit_pass_case("tcp fin", eth(), tcp4(flags="FA"), "tcp_fin_rst", tags={"closing"}))
    c.append(hit_pass_case("tcp rst", eth(), tcp4(flags="R"), "tcp_fin_rst", tags={"closing"}))
    c.append(hit_pass_case("ipv6 tcp rst+ack", eth(), tcp6(flags="RA"), "tcp_fin_rst", tags={"closing"}))
    c.append(hit_pass_case("ipv4 ttl 1", eth(), tcp4(ttl=1), "ttl_expired"))
    c.append(hit_pass_case("ipv4 ttl 0", eth(), udp4(ttl=0), "ttl_expired"))
    c.append(hit_pass_case("ipv6 hop limit 1", eth(), tcp6(hlim=1), "ttl_expired"))
    c.append(hit_pass_case("ipv4 over mtu", eth(), tcp4(n=1400), "over_mtu", action(mtu=1400)))
    c.append(hit_pass_case("ipv6 over mtu", eth(), udp6(n=1300), "over_mtu", action(mtu=1280)))
    c.append(fwd_case("ipv4 exactly mtu", eth(), tcp4(n=1400 - 52), action(mtu=1400)))
    c.append(hit_pass_case("egress port missing", eth(), tcp4(), "redirect_failed",
                           action(tx_port=EMPTY_SLOT, out_ifindex=0)))

    # ---- passed: misses, including keys that differ in one field ----
    c.append(pass_case("no flow at all", eth() / tcp4(), "miss"))
    c.append(pass_case("other source port", eth() / tcp4(sport=CPORT + 1), "miss",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("other ingress device", eth() / tcp4(), "miss",
                       flows=[(key_of(tcp4(), ifindex=IFINDEX + 1), action())]))
    c.append(pass_case("tagged packet, untagged flow", eth() / vlan(10) / tcp4(), "miss",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("other vlan", eth() / vlan(11) / tcp4(), "miss",
                       flows=[(key_of(tcp4(), vlan_outer=10), action())]))
    c.append(pass_case("other pppoe session", eth() / pppoe(2, tcp4()) / tcp4(), "miss",
                       flows=[(key_of(tcp4(), pppoe_sid=1), action())]))
    c.append(pass_case("udp packet, tcp flow", eth() / udp4(), "miss",
                       flows=[(key_of(tcp4()), action())]))

    # ---- passed: the parser's refusals (a matching flow is installed where one could match) ----
    c.append(pass_case("arp", eth("ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT4, pdst=ROUTER4), "not_ip"))
    c.append(pass_case("pppoe discovery", eth() / PPPoED(code=0x09), "not_ip"))
    lcp_echo = Raw(b"\x09\x01\x00\x08" + bytes(4))
    c.append(pass_case("pppoe lcp", eth() / PPPoE(sessionid=1) / PPP(proto=0xC021) / lcp_echo, "not_ip"))
    c.append(pass_case("unknown ethertype", Ether(dst=IN_MAC, src=PEER_MAC, type=0x88B5) / payload(50),
                       "not_ip"))
    c.append(pass_case("three vlan tags", eth() / vlan(1) / vlan(2) / vlan(3) / tcp4(), "l2_unsupported"))
    c.append(pass_case("802.1ad inner tag", eth() / vlan(1) / vlan(2, ETH_P_8021AD) / tcp4(),
                       "l2_unsupported"))
    c.append(pass_case("vlan id 0 (priority tag)", eth() / vlan(5 << 13) / tcp4(), "l2_unsupported",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("pppoe session 0", eth() / pppoe(0, tcp4()) / tcp4(), "l2_unsupported",
                       flows=[(key_of(tcp4()), action())]))
    # (A frame shorter than Ethernet's 14 bytes cannot be test-run on either hook; no NIC
    # delivers one.)
    c.append(Case("truncated ipv4 header", bytes(eth() / tcp4())[:14 + 16], xdp=Expect("malformed"),
                  tc=None))  # the kernel's TC test run refuses an IPv4 skb without a whole header
    c.append(pass_case("truncated tcp header",
                       eth() / IP(src=CLIENT4, dst=SERVER4, proto=6) / Raw(bytes(TCP(sport=CPORT))[:10]),
                       "malformed", flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("ipv4 version 5", _ipv4_with(tcp4(), version=5), "malformed"))
    c.append(pass_case("ipv4 total length over frame", _ipv4_with(tcp4(), len=500), "malformed"))
    c.append(pass_case("ipv4 total length under header", _ipv4_with(tcp4(), len=19), "malformed"))
    c.append(pass_case("tcp data offset 4", eth() / _tcp_doff(4), "malformed",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("tcp header past packet", eth() / _tcp_doff(15), "malformed",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("udp length over packet", eth() / (IP(src=CLIENT4, dst=SERVER4)
                                                          / UDP(sport=CPORT, dport=SPORT, len=200)
                                                          / payload(20)), "malformed"))
    c.append(pass_case("ipv6 udp checksum 0", eth() / (IPv6(src=CLIENT6, dst=SERVER6)
                                                        / UDP(sport=CPORT, dport=SPORT, chksum=0)
                                                        / payload(20)), "malformed",
                       flows=[(key_of(udp6()), action())]))
    c.append(pass_case("ipv6 payload length over frame",
                       eth() / IPv6(src=CLIENT6, dst=SERVER6, plen=400) / UDP(sport=CPORT, dport=SPORT)
                       / payload(20), "malformed"))
    c.append(pass_case("pppoe length shorter than ip",
                       eth() / PPPoE(sessionid=1, len=30) / PPP(proto=0x21) / tcp4(), "malformed",
                       flows=[(key_of(tcp4(), pppoe_sid=1), action())]))
    c.extend(_encap_edge_cases())
    c.append(pass_case("ipv4 options", eth() / (IP(src=CLIENT4, dst=SERVER4, options=[b"\x01\x01\x01\x00"])
                                                 / TCP(sport=CPORT, dport=SPORT)), "ipv4_options"))
    c.append(pass_case("ipv4 bad header checksum", _ipv4_with(tcp4(), chksum=0x1234), "ipv4_bad_checksum",
                       flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("ipv4 first fragment (MF)",
                       eth() / (IP(src=CLIENT4, dst=SERVER4, flags="MF") / TCP(sport=CPORT, dport=SPORT)
                                / payload(16)), "fragment", flows=[(key_of(tcp4()), action())]))
    c.append(pass_case("ipv4 later fragment (offset)", eth() / (IP(src=CLIENT4, dst=SERVER4, frag=100,
                                                                   proto=6) / payload(40)), "fragment"))
    c.append(pass_case("ipv6 hop-by-hop", eth() / (IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrHopByHop()
                                                    / TCP(sport=CPORT, dport=SPORT)), "ipv6_extension"))
    c.append(pass_case("ipv6 fragment header", eth() / (IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrFragment()
                                                         / UDP(sport=CPORT, dport=SPORT)), "ipv6_extension"))
    c.append(pass_case("icmp", eth() / IP(src=CLIENT4, dst=SERVER4) / ICMP(), "not_tcp_udp"))
    c.append(pass_case("icmpv6", eth() / IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(), "not_tcp_udp"))
    c.append(pass_case("gre", eth() / IP(src=CLIENT4, dst=SERVER4, proto=47) / payload(24), "not_tcp_udp"))
    return c


def _encap_edge_cases() -> list[Case]:
    """Tagged and PPPoE frames at the edges: cut headers, wrong ids and lengths, frames
    of the PPPoE control plane. The flow each one nearly matches is installed, so a
    wrong decision would be a redirect."""
    c: list[Case] = []
    l3 = tcp4(src=SERVER4, dst=ROUTER4, sport=SPORT, dport=NAT_PORT)
    reply = action(nat_daddr=CLIENT4, nat_dport=CPORT)
    sid = 0x1234
    plain = key_of(l3)
    k_sid = key_of(l3, pppoe_sid=sid)
    k_vlan_sid = key_of(l3, vlan_outer=10, pppoe_sid=sid)
    k_qinq_sid = key_of(l3, vlan_outer=100, vlan_inner=10, pppoe_sid=sid, tpid=AD)
    every = [(plain, reply), (k_sid, reply), (k_vlan_sid, reply), (k_qinq_sid, reply),
             (key_of(l3, vlan_outer=10), reply), (key_of(l3, vlan_outer=100, vlan_inner=10, tpid=AD), reply)]
    full = {"vlan": bytes(eth() / vlan(10) / l3),
            "qinq": bytes(eth() / vlan(100, ETH_P_8021AD) / vlan(10) / l3),
            "pppoe": bytes(eth() / pppoe(sid, l3) / l3),
            "vlan+pppoe": bytes(eth() / vlan(10) / pppoe(sid, l3) / l3)}

    # forwarded: single 802.1ad tag; a PPPoE length that also covers Ethernet padding after
    # the IP packet (the kernel trims the frame to it, then IP trims to its own length)
    c.append(fwd_case("802.1ad in, untagged out", eth() / vlan(100, ETH_P_8021AD), l3, reply,
                      key=key_of(l3, vlan_outer=100, tpid=AD)))
    pad = bytes(6)
    padded = PPPoE(sessionid=sid, len=len(l3) + 2 + len(pad)) / PPP(proto=0x21)
    c.append(fwd_case("pppoe length covering padding after ip", eth() / padded, l3, reply, key=k_sid,
                      trailer=pad))

    # cut headers: a tag, the inner tag, the PPPoE session header, the PPP protocol field
    c.append(pass_case("vlan tag cut", full["vlan"][:14 + 2], "malformed", flows=every))
    c.append(pass_case("qinq inner tag cut", full["qinq"][:18 + 3], "malformed", flows=every))
    c.append(pass_case("pppoe session header cut", full["pppoe"][:14 + 4], "malformed", flows=every))
    c.append(pass_case("pppoe cut before the ppp protocol", full["pppoe"][:14 + 6], "malformed", flows=every))
    c.append(pass_case("vlan+pppoe cut in the session header", full["vlan+pppoe"][:18 + 5], "malformed",
                       flows=every))
    c.append(pass_case("pppoe cut inside the ip header", full["pppoe"][:22 + 12], "malformed", flows=every))

    # wrong ids: the flow of another session, VLAN or encapsulation is there, this one is not
    c.append(pass_case("vlan+pppoe, other session", eth() / vlan(10) / pppoe(sid + 1, l3) / l3, "miss",
                       flows=every))
    c.append(pass_case("pppoe session of a vlan flow, untagged", eth() / pppoe(sid, l3) / l3, "miss",
                       flows=[(k_vlan_sid, reply), (k_qinq_sid, reply), (plain, reply)]))
    c.append(pass_case("vlan+pppoe, other vlan", eth() / vlan(11) / pppoe(sid, l3) / l3, "miss", flows=every))
    c.append(pass_case("qinq+pppoe, other inner vlan",
                       eth() / vlan(100, ETH_P_8021AD) / vlan(11) / pppoe(sid, l3) / l3, "miss", flows=every))
    c.append(pass_case("untagged packet, only pppoe flows", eth() / l3, "miss",
                       flows=[(k_sid, reply), (k_vlan_sid, reply)]))
    c.append(pass_case("pppoe session 0 over vlan", eth() / vlan(10) / pppoe(0, l3) / l3, "l2_unsupported",
                       flows=every))

    # the outer tag's protocol is part of the key: a frame with the VLAN ids (and session) of
    # a flow but the other TPID is not that flow's (802.1Q id 10 and 802.1ad id 10 on one port
    # are different VLANs)
    q = ETH_P_8021Q
    for name, tags, flow_tpid, session in (
            ("802.1q frame, 802.1ad flow of its id", ((10, q),), AD, 0),
            ("802.1ad frame, 802.1q flow of its id", ((10, AD),), q, 0),
            ("802.1q+802.1q frame, 802.1ad+802.1q flow of its ids", ((100, q), (10, q)), AD, 0),
            ("802.1ad+802.1q frame, 802.1q+802.1q flow of its ids", ((100, AD), (10, q)), q, 0),
            ("802.1ad+pppoe frame, 802.1q+pppoe flow of its id and session", ((10, AD),), q, sid),
            ("802.1q+802.1q+pppoe frame, 802.1ad+802.1q+pppoe flow of its ids and session",
             ((100, q), (10, q)), AD, sid)):
        frame = eth()
        for vid, tpid in tags:
            frame = frame / vlan(vid, tpid)
        if session:
            frame = frame / pppoe(session, l3)
        near = key_of(l3, vlan_outer=tags[0][0], vlan_inner=tags[1][0] if len(tags) > 1 else 0,
                      pppoe_sid=session, tpid=flow_tpid)
        c.append(pass_case(name, frame / l3, "miss", flows=[(near, reply)]))
    # both flows there, with different actions: each frame takes its own protocol's
    for tpid, other in ((q, AD), (AD, q)):
        mine = action(nat_daddr=CLIENT4, nat_dport=CPORT, vlan_outer_tci=20 if tpid == q else 21)
        theirs = action(nat_daddr=CLIENT4, nat_dport=CPORT, vlan_outer_tci=22)
        name = f"{'802.1q' if tpid == q else '802.1ad'} in beside a flow of the same id, other protocol"
        row = fwd_case(name, eth() / vlan(10, tpid), l3, mine, key=key_of(l3, vlan_outer=10, tpid=tpid))
        c.append(replace(row, flows=row.flows + ((key_of(l3, vlan_outer=10, tpid=other), theirs),)))

    # PPPoE lengths that disagree with the frame
    n = len(l3)
    for name, length, reason in (("pppoe length 0", 0, "malformed"),
                                 ("pppoe length one short of ip", n + 1, "malformed"),
                                 ("pppoe length past the frame", n + 3, "malformed"),
                                 ("pppoe length 0xffff", 0xFFFF, "malformed")):
        c.append(pass_case(name, eth() / PPPoE(sessionid=sid, len=length) / PPP(proto=0x21) / l3, reason,
                           flows=every))
    c.append(pass_case("vlan+pppoe length past the frame",
                       eth() / vlan(10) / PPPoE(sessionid=sid, len=n + 40) / PPP(proto=0x21) / l3,
                       "malformed", flows=every))

    # the PPPoE header's other fields, and what PPP carries besides IP
    c.append(pass_case("pppoe version 2", eth() / PPPoE(version=2, sessionid=sid) / PPP(proto=0x21) / l3,
                       "l2_unsupported", flows=every))
    c.append(pass_case("pppoe code not session data",
                       eth() / PPPoE(code=0xA7, sessionid=sid) / PPP(proto=0x21) / l3, "l2_unsupported",
                       flows=every))
    c.append(pass_case("pppoe ipcp", eth() / vlan(10) / PPPoE(sessionid=sid) / PPP(proto=0x8021)
                       / Raw(b"\x01\x01\x00\x0a\x03\x06\xc6\x12\x00\x01"), "not_ip", flows=every))
    c.append(pass_case("pppoe ipv4 protocol number compressed to one byte",
                       eth() / PPPoE(sessionid=sid, len=n + 1) / Raw(b"\x21") / l3, "not_ip", flows=every))
    c.append(pass_case("pppoe discovery over vlan (PADT)",
                       eth() / vlan(10) / PPPoED(code=0xA7, sessionid=sid), "not_ip", flows=every))
    c.append(pass_case("pppoe discovery over qinq (PADI)",
                       eth("ff:ff:ff:ff:ff:ff") / vlan(100, ETH_P_8021AD) / vlan(10) / PPPoED(code=0x09),
                       "not_ip", flows=every))

    # VLAN id 0: a priority tag, outer or inner, also in front of PPPoE
    c.append(pass_case("inner vlan id 0", eth() / vlan(100, ETH_P_8021AD) / vlan(3 << 13) / l3,
                       "l2_unsupported", flows=every))
    c.append(pass_case("priority tag before pppoe", eth() / vlan(6 << 13) / pppoe(sid, l3) / l3,
                       "l2_unsupported", flows=every))
    return c


def _ipv4_with(l3: Packet, **fields) -> bytes:
    """An Ethernet frame whose IPv4 header has the given fields forced (checksum kept right
    unless it is one of them)."""
    p = l3.__class__(bytes(l3))
    for name, value in fields.items():
        setattr(p[IP], name, value)
    if "chksum" not in fields:
        del p[IP].chksum
    return bytes(eth() / p)


def _tcp_doff(doff: int) -> Packet:
    return IP(src=CLIENT4, dst=SERVER4) / TCP(sport=CPORT, dport=SPORT, dataofs=doff) / payload(8)


def build_gso_cases() -> list[Case]:
    """TC rows with a GSO context (a GRO super-packet as TC ingress sees it)."""
    out: list[Case] = []
    # 3 segments of 1000 bytes: the super-packet is longer than the MTU, each segment is not.
    l3 = tcp4(n=3000)
    act = action(**SNAT4, mtu=1500)
    out.append(Case("gso: segments fit the mtu", bytes(eth() / l3), flows=((key_of(l3), act),),
                    xdp=None, tc=Expect("forwarded", forwarded(l3, act, "tc")),
                    skb_ctx=skb_ctx(3, 1000), packets=3, tags=frozenset({"counters"})))
    act = action(**SNAT4, mtu=1000)
    out.append(Case("gso: segments over the mtu", bytes(eth() / l3), flows=((key_of(l3), act),),
                    xdp=None, tc=Expect("over_mtu"), skb_ctx=skb_ctx(3, 1000)))
    tagged_out = (
        ("gso: untagged in, vlan out (tag as metadata)", action(**SNAT4, mtu=1500, vlan_outer_tci=20)),
        ("gso: untagged in, 802.1ad+802.1q out (inner tag pushed by the kernel)",
         action(**SNAT4, mtu=1500, vlan_outer_tci=20, vlan_outer_tpid=ETH_P_8021AD, vlan_inner_tci=21)),
    )
    for name, act in tagged_out:
        out.append(Case(name, bytes(eth() / l3), flows=((key_of(l3), act),), xdp=None,
                        tc=Expect("forwarded", forwarded(l3, act, "tc")),
                        skb_ctx=skb_ctx(3, 1000), packets=3))
    l3q = tcp4(n=3000)
    out.append(Case("gso: pppoe out at the same length", bytes(eth() / vlan(100) / vlan(10) / l3q),
                    flows=((key_of(l3q, vlan_outer=100, vlan_inner=10), action(**SNAT4, pppoe_sid=3)),),
                    xdp=None,
                    tc=Expect("l2_rewrite_failed", why="a PPPoE length cannot be right for each segment"),
                    skb_ctx=skb_ctx(3, 1000)))
    # Through the session's PPP device: the super-packet keeps its Ethernet header as it came
    # (the L3 device drops it; the kernel segments and the PPPoE channel encapsulates each
    # segment), only L3 is rewritten. Any tags the action names are the PPP device's business.
    via_ppp = "the PPP device drops the mac header and encapsulates each segment after segmentation"
    for name, act in (
        ("gso: untagged in, pppoe out through the ppp device",
         action(**SNAT4, mtu=1492, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)),
        ("gso: untagged in, vlan+pppoe out through the ppp device",
         action(**SNAT4, mtu=1492, vlan_outer_tci=7, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)),
        ("gso: pppoe out through the ppp device, no egress port needed",
         action(**SNAT4, mtu=1492, out_ifindex=0, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)),
    ):
        out.append(Case(name, bytes(eth() / l3), flows=((key_of(l3), act),), xdp=None,
                        tc=Expect("forwarded", bytes(eth() / rewritten_l3(l3, act)), why=via_ppp),
                        skb_ctx=skb_ctx(3, 1000), packets=3))
    l3v6 = tcp6(n=3000)
    act = action(**SNAT6, mtu=1492, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)
    out.append(Case("gso: ipv6 untagged in, pppoe out through the ppp device", bytes(eth() / l3v6),
                    flows=((key_of(l3v6), act),), xdp=None,
                    tc=Expect("forwarded", bytes(eth() / rewritten_l3(l3v6, act)), why=via_ppp),
                    skb_ctx=skb_ctx(3, 1000), packets=3))
    out.append(Case("gso: pppoe out, no ppp device", bytes(eth() / l3),
                    flows=((key_of(l3), action(**SNAT4, mtu=1492, pppoe_sid=3)),), xdp=None,
                    tc=Expect("l2_rewrite_failed", why="a PPPoE length cannot be right for each segment"),
                    skb_ctx=skb_ctx(3, 1000)))
    out.append(Case("gso: ppp device, segments over its mtu", bytes(eth() / l3),
                    flows=((key_of(l3), action(**SNAT4, mtu=1000, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)),),
                    xdp=None, tc=Expect("over_mtu"), skb_ctx=skb_ctx(3, 1000)))
    out.append(Case("gso: tagged in, pppoe out with a ppp device", bytes(eth() / vlan(100) / vlan(10) / l3q),
                    flows=((key_of(l3q, vlan_outer=100, vlan_inner=10),
                            action(**SNAT4, pppoe_sid=3, ppp_ifindex=PPP_IFINDEX)),),
                    xdp=None,
                    tc=Expect("l2_rewrite_failed", why="a GSO skb is taken only with a bare Ethernet header "
                              "in its data"),
                    skb_ctx=skb_ctx(3, 1000)))
    l3v = tcp4(n=3000)
    out.append(Case("gso: tag inline in the data", bytes(eth() / vlan(10) / l3v),
                    flows=((key_of(l3v, vlan_outer=10), action(**SNAT4, vlan_outer_tci=11)),),
                    xdp=None,
                    tc=Expect("l2_rewrite_failed", why="a GSO skb is taken only with a bare Ethernet header "
                              "in its data (the kernel moves the outer tag into metadata before TC, so an "
                              "inline tag is a QinQ inner one)"),
                    skb_ctx=skb_ctx(3, 1000)))
    return out


CASES: list[Case] = build_cases()
GSO_CASES: list[Case] = build_gso_cases()
