"""The flower codec (pyflow/hw/flower.py) and the rules built from flow entries
(pyflow/hw/rules.py), without root: every filter is encoded into a real RTM_NEWTFILTER
message, parsed back from its bytes and compared field by field; the pedit edits are
applied to real packets by a model of act_pedit and compared with the rewrite the XDP
path makes for the same entry."""

from __future__ import annotations

import socket
import struct

import pytest
from pyroute2.netlink.rtnl.tcmsg import tcmsg
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from pyflow.datapath.abi import FlowAction, FlowKey
from pyflow.hw import flower as F
from pyflow.hw import rules

F.register()
IN_MAC, GW_MAC, OUT_MAC = "02:00:00:00:01:01", "02:00:00:00:02:99", "02:00:00:00:02:01"


def roundtrip(f: F.FlowerFilter, *, ifindex=4, prio=0x2E10, protocol=F.ETH_P_IP, handle=77) -> F.Dumped:
    """Encode as the kernel would receive it, decode from the bytes."""
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"], msg["handle"], msg["parent"] = ifindex, handle, 0xFFFFFFF2
    req = {"protocol": protocol, "prio": prio}
    F.fix_request(req)
    msg["info"] = req["info"]
    msg["attrs"] = [["TCA_KIND", "flower"], ["TCA_OPTIONS", F.get_parameters({"filter": f})]]
    msg.encode()
    back = tcmsg(msg.data)
    back.decode()
    dumped = F.decode_filter(back)
    assert dumped is not None
    assert (dumped.ifindex, dumped.prio, dumped.protocol, dumped.handle) == (ifindex, prio, protocol, handle)
    return dumped


def masq_v4(proto=socket.IPPROTO_TCP) -> tuple[FlowKey, FlowAction]:
    key = FlowKey(4, proto, "198.18.0.10", "198.19.0.50", 40000, 443)
    act = FlowAction(5, 1, 1500, IN_MAC, GW_MAC, OUT_MAC, nat_saddr="198.19.0.1", nat_sport=61000)
    return key, act


def dnat_v6() -> tuple[FlowKey, FlowAction]:
    key = FlowKey(4, socket.IPPROTO_TCP, "2001:2::10", "2001:2:1::1", 40000, 8080)
    act = FlowAction(5, 1, 1500, IN_MAC, GW_MAC, OUT_MAC, nat_daddr="2001:2:2::50", nat_dport=80)
    return key, act


# ---- codec ------------------------------------------------------------------------

def test_every_field_survives_encode_and_decode():
    match = F.Match(eth_type=F.ETH_P_8021Q, indev="eth1", vlan_id=100, vlan_eth_type=F.ETH_P_8021Q,
                    cvlan_id=7, cvlan_eth_type=F.ETH_P_IPV6, ip_proto=socket.IPPROTO_UDP, src="2001:2::1",
                    dst="2001:2::2", sport=53, dport=5353, ip_ttl=(0, 0xFE),
                    ip_flags=(0, F.FLOW_DIS_IS_FRAGMENT))
    acts = (F.Vlan(F.VLAN_POP), F.Vlan(F.VLAN_POP),
            F.Pedit((F.PeditKey(F.HTYPE_ETH, F.CMD_SET, 0, b"\0\0\0\0", b"\x02\0\0\0"),
                     F.PeditKey(F.HTYPE_IP6, F.CMD_ADD, 4, b"\xff\xff\xff\0", b"\0\0\0\xff"),
                     F.PeditKey(F.HTYPE_UDP, F.CMD_SET, 0, b"\0\0\xff\xff", b"\x13\x88\0\0"))),
            F.Csum(F.CSUM_UDP), F.Vlan(F.VLAN_PUSH, 300, 5, F.ETH_P_8021AD), F.Vlan(F.VLAN_MODIFY, 12, 0),
            F.Mirred(9), F.Gact(F.TC_ACT_OK))
    f = F.FlowerFilter(match, acts, F.SKIP_HW)
    d = roundtrip(f, protocol=F.ETH_P_8021Q)
    assert d.filter.match == match
    assert d.filter.actions == acts
    assert d.filter == f
    assert [s.packets for s in d.stats] == [0] * len(acts)


def test_ipv4_tcp_match_and_flags_roundtrip():
    match = F.Match(eth_type=F.ETH_P_IP, indev="veth0", ip_proto=socket.IPPROTO_TCP, src="198.18.0.1",
                    dst="198.19.0.9", sport=1, dport=65535, tcp_flags=(0, 7))
    f = F.FlowerFilter(match, (F.Mirred(3),), F.SKIP_SW)
    assert roundtrip(f).filter == f


def test_bad_values_are_refused_with_a_message():
    with pytest.raises(ValueError, match="TCP or UDP"):
        F.encode_match(F.Match(eth_type=F.ETH_P_IP, ip_proto=1, sport=5))
    with pytest.raises(ValueError, match="1..255 keys"):
        F.encode_action(F.Pedit(()))
    with pytest.raises(ValueError, match="multiple of 4"):
        F.encode_action(F.Pedit((F.PeditKey(F.HTYPE_ETH, F.CMD_SET, 2, b"\0" * 4, b"\0" * 4),)))
    with pytest.raises(ValueError, match="filter=FlowerFilter"):
        F.get_parameters({})
    assert F.get_parameters({"filter": F.NO_OPTIONS}) == {"attrs": []}


def test_register_makes_pyroute2_dispatch_flower_to_us():
    from pyroute2.netlink.rtnl.tcmsg import plugins

    assert plugins["flower"] is F


# ---- a model of act_pedit, applied to real packets ----------------------------------

def apply_pedit(frame: bytes, pedit: F.Pedit) -> bytes:
    """act_pedit on an untagged Ethernet frame: each key edits one 32-bit word as it lies in
    memory, at its offset from the header its type names (IPv4 header length read from IHL)."""
    buf = bytearray(frame)
    ethertype = struct.unpack_from("!H", buf, 12)[0]
    l3 = 14
    l4 = l3 + ((buf[l3] & 0x0F) * 4 if ethertype == F.ETH_P_IP else 40)
    base = {F.HTYPE_ETH: 0, F.HTYPE_IP4: l3, F.HTYPE_IP6: l3, F.HTYPE_TCP: l4, F.HTYPE_UDP: l4}
    for k in pedit.keys:
        at = base[k.htype] + k.off
        word = int.from_bytes(buf[at:at + 4], "little")
        mask, val = int.from_bytes(k.mask, "little"), int.from_bytes(k.val, "little")
        if k.cmd == F.CMD_SET:
            new = (word & mask) ^ val
        else:
            new = (word & mask) | (((word + val) & 0xFFFFFFFF) & ~mask)
        buf[at:at + 4] = new.to_bytes(4, "little")
    return bytes(buf)


def forwarded(frame: bytes, f: F.FlowerFilter) -> bytes:
    (pedit,) = [a for a in f.actions if isinstance(a, F.Pedit)]
    return apply_pedit(frame, pedit)


def test_masquerade_rule_rewrites_as_the_fast_path_does():
    key, act = masq_v4()
    place, f = rules.flow_filter(key, act, indev="lan0", flags=F.SKIP_HW, ingress_mtu=1500)
    assert place == rules.Placement(4, rules.RULE_PRIO, F.ETH_P_IP)
    assert f.match == F.Match(eth_type=F.ETH_P_IP, indev="lan0", ip_proto=6, src="198.18.0.10",
                              dst="198.19.0.50", sport=40000, dport=443, tcp_flags=(0, 7),
                              ip_flags=(0, F.FLOW_DIS_IS_FRAGMENT))
    assert f.actions[-2:] == (F.Csum(F.CSUM_IPV4HDR | F.CSUM_TCP), F.Mirred(5))
    pkt = Ether(src="02:00:00:00:00:0c", dst=IN_MAC) / IP(src=key.saddr, dst=key.daddr, ttl=64) / \
        TCP(sport=key.sport, dport=key.dport, flags="A") / b"payload"
    out = Ether(forwarded(bytes(pkt), f))
    assert (out.dst, out.src) == (GW_MAC, OUT_MAC)
    assert (out[IP].src, out[IP].dst, out[IP].ttl) == ("198.19.0.1", "198.19.0.50", 63)
    assert (out[TCP].sport, out[TCP].dport, bytes(out[TCP].payload)) == (61000, 443, b"payload")
    assert roundtrip(f).filter == f


def test_dnat_ipv6_rule_rewrites_destination_and_hop_limit():
    key, act = dnat_v6()
    place, f = rules.flow_filter(key, act, indev="lan0", flags=F.SKIP_SW, ingress_mtu=1500)
    assert place.protocol == F.ETH_P_IPV6 and place.prio == rules.RULE_PRIO + 1
    pkt = Ether(dst=IN_MAC) / IPv6(src=key.saddr, dst=key.daddr, hlim=2) / \
        TCP(sport=40000, dport=8080, flags="PA")
    out = Ether(forwarded(bytes(pkt), f))
    assert (out[IPv6].src, out[IPv6].dst, out[IPv6].hlim) == ("2001:2::10", "2001:2:2::50", 1)
    assert (out[TCP].sport, out[TCP].dport) == (40000, 80)
    assert f.actions[-2] == F.Csum(F.CSUM_TCP)
    assert roundtrip(f, protocol=F.ETH_P_IPV6, prio=place.prio).filter == f


def test_udp_rule_without_nat_only_touches_macs_and_ttl():
    key = FlowKey(4, socket.IPPROTO_UDP, "198.18.0.10", "198.19.0.50", 5000, 53)
    act = FlowAction(5, 1, 1500, IN_MAC, GW_MAC, OUT_MAC)
    _place, f = rules.flow_filter(key, act, indev="lan0", flags=0, ingress_mtu=1500)
    assert f.match.tcp_flags is None
    (pedit,) = [a for a in f.actions if isinstance(a, F.Pedit)]
    assert {k.htype for k in pedit.keys} == {F.HTYPE_ETH, F.HTYPE_IP4}
    pkt = Ether(dst=IN_MAC) / IP(src=key.saddr, dst=key.daddr, ttl=9) / UDP(sport=5000, dport=53)
    out = Ether(forwarded(bytes(pkt), f))
    assert (out[IP].src, out[IP].dst, out[IP].ttl, out[UDP].sport) == (key.saddr, key.daddr, 8, 5000)


def test_both_ports_rewritten_share_one_pedit_word():
    key = FlowKey(4, socket.IPPROTO_UDP, "198.18.0.10", "198.19.0.50", 5000, 53)
    act = FlowAction(5, 1, 1500, IN_MAC, GW_MAC, OUT_MAC, nat_sport=6000, nat_dport=5353)
    keys = rules.pedit_keys(key, act)
    l4 = [k for k in keys if k.htype == F.HTYPE_UDP]
    assert l4 == [F.PeditKey(F.HTYPE_UDP, F.CMD_SET, 0, b"\0\0\0\0", (6000).to_bytes(2, "big") +
                             (5353).to_bytes(2, "big"))]


def test_vlan_egress_pushes_and_tagged_ingress_pops_or_modifies():
    key, act = masq_v4()
    tagged_out = FlowAction(**{**act.__dict__, "vlan_outer_tci": (3 << 13) | 100, "vlan_inner_tci": 7})
    place, f = rules.flow_filter(key, tagged_out, indev="lan0", flags=0, ingress_mtu=1500)
    assert place.protocol == F.ETH_P_IP
    assert [a for a in f.actions if isinstance(a, F.Vlan)] == [F.Vlan(F.VLAN_PUSH, 7, 0),
                                                                F.Vlan(F.VLAN_PUSH, 100, 3)]
    tagged_in = FlowKey(**{**key.__dict__, "vlan_outer": 20})
    place, f = rules.flow_filter(tagged_in, act, indev="lan0", flags=0, ingress_mtu=1500)
    assert place == rules.Placement(4, rules.RULE_PRIO + 2, F.ETH_P_8021Q)
    assert (f.match.eth_type, f.match.vlan_id, f.match.vlan_eth_type) == (F.ETH_P_8021Q, 20, F.ETH_P_IP)
    assert f.actions[0] == F.Vlan(F.VLAN_POP)
    one_out = FlowAction(**{**act.__dict__, "vlan_outer_tci": 30})
    _p, f = rules.flow_filter(tagged_in, one_out, indev="lan0", flags=0, ingress_mtu=1500)
    assert [a for a in f.actions if isinstance(a, F.Vlan)] == [F.Vlan(F.VLAN_MODIFY, 30, 0)]
    assert roundtrip(f, protocol=F.ETH_P_8021Q).filter == f
    # a tagged frame: the pedit offsets stay those of the untagged frame once the tag is popped
    pkt = Ether(dst=IN_MAC) / Dot1Q(vlan=20) / IP(src=key.saddr, dst=key.daddr) / TCP(sport=40000, dport=443)
    untagged = Ether(dst=pkt.dst, src=pkt.src) / pkt[IP]
    assert Ether(forwarded(bytes(untagged), f))[IP].src == "198.19.0.1"


def test_the_ingress_tag_protocol_is_matched():
    """A key of an 802.1ad outer tag gets a rule under protocol 802.1ad (its own priority),
    matching eth_type 802.1ad: an 802.1Q frame of the same VLAN id does not hit it."""
    key, act = masq_v4()
    s_tag = FlowKey(**{**key.__dict__, "vlan_outer": 20, "vlan_outer_tpid": F.ETH_P_8021AD})
    place, f = rules.flow_filter(s_tag, act, indev="lan0", flags=0, ingress_mtu=1500)
    assert place == rules.Placement(4, rules.RULE_PRIO + 3, F.ETH_P_8021AD)
    assert (f.match.eth_type, f.match.vlan_id, f.match.vlan_eth_type) == (F.ETH_P_8021AD, 20, F.ETH_P_IP)
    qinq = FlowKey(**{**s_tag.__dict__, "vlan_inner": 7})
    place, f = rules.flow_filter(qinq, act, indev="lan0", flags=0, ingress_mtu=1500)
    assert place.protocol == F.ETH_P_8021AD
    assert (f.match.eth_type, f.match.vlan_id, f.match.vlan_eth_type, f.match.cvlan_id,
            f.match.cvlan_eth_type) == (F.ETH_P_8021AD, 20, F.ETH_P_8021Q, 7, F.ETH_P_IP)
    assert roundtrip(f, protocol=F.ETH_P_8021AD).filter == f
    with pytest.raises(rules.Unplaceable, match="VLAN protocol 0x9100"):
        rules.flow_filter(FlowKey(**{**s_tag.__dict__, "vlan_outer_tpid": 0x9100}), act, indev="lan0",
                          flags=0, ingress_mtu=1500)


@pytest.mark.parametrize("change, reason", [
    ({"mtu": 1400}, "mtu"),
    ({"pppoe_sid": 5}, "pppoe"),
])
def test_what_a_rule_cannot_carry_is_unplaceable(change, reason):
    key, act = masq_v4()
    with pytest.raises(rules.Unplaceable, match=reason):
        rules.flow_filter(key, FlowAction(**{**act.__dict__, **change}), indev="lan0", flags=0,
                          ingress_mtu=1500)


def test_guards_pass_ttl_zero_and_one_to_the_kernel_ahead_of_flow_rules():
    guards = rules.guard_filters(4, flags=F.SKIP_HW)
    assert [(p.protocol, f.match.ip_ttl, f.actions) for p, f in guards] == [
        (F.ETH_P_IP, (0, 0xFE), (F.Gact(F.TC_ACT_OK),)), (F.ETH_P_IPV6, (0, 0xFE), (F.Gact(F.TC_ACT_OK),))]
    from pyflow.datapath.loader import TC_PRIO

    assert all(p.prio < rules.RULE_PRIO < TC_PRIO for p, _f in guards)
    for place, f in guards:
        assert roundtrip(f, protocol=place.protocol, prio=place.prio).filter == f
