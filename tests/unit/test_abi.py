"""The Python ABI helpers fill the header's structs in the documented byte order.

Expected bytes are packed here with the struct module from the field list in
pyflow_abi.h, independently of cffi, so a header change that cffi follows but the
documented wire order does not is caught.
"""

import ipaddress
import struct

import pytest

from pyflow._native import ffi, lib
from pyflow.datapath import abi


def test_key_bytes_follow_header_order():
    k = abi.FlowKey(ifindex=7, proto=6, saddr="198.18.0.1", daddr="198.19.0.2", sport=1000, dport=80,
                    vlan_outer=100, vlan_inner=200, pppoe_sid=0x1234)
    want = struct.pack("=IHHHBB", 7, 100, 200, 0x1234, abi.FAMILY_IPV4, 6)
    want += struct.pack("!HH", 1000, 80)
    want += ipaddress.ip_address("198.18.0.1").packed + bytes(12)
    want += ipaddress.ip_address("198.19.0.2").packed + bytes(12)
    assert abi.key_bytes(k) == want
    assert abi.KEY_SIZE == len(want) == 48


def test_the_outer_tag_protocol_is_a_bit_of_the_outer_vlan_field():
    """802.1ad sets bit 15 of vlan_outer (the key does not grow); 802.1Q leaves the bare id.
    The bytes path and the cffi path agree, and entry_bytes gives the same key."""
    base = dict(ifindex=7, proto=6, saddr="198.18.0.1", daddr="198.19.0.2", sport=1000, dport=80)
    q = abi.FlowKey(**base, vlan_outer=7)
    ad = abi.FlowKey(**base, vlan_outer=7, vlan_outer_tpid=abi.ETH_P_8021AD)
    qinq = abi.FlowKey(**base, vlan_outer=100, vlan_inner=200, pppoe_sid=5, vlan_outer_tpid=abi.ETH_P_8021AD)
    assert abi.KEY_VLAN_8021AD == 0x8000 and abi.KEY_SIZE == 48
    assert struct.unpack_from("=HH", abi.key_bytes(q), 4) == (7, 0)
    assert struct.unpack_from("=HH", abi.key_bytes(ad), 4) == (0x8007, 0)
    assert struct.unpack_from("=HHH", abi.key_bytes(qinq), 4) == (0x8064, 200, 5)
    assert abi.key_bytes(q) != abi.key_bytes(ad)
    for k in (q, ad, qinq):
        assert abi.key_bytes(k) == bytes(ffi.buffer(k.to_c()))
        fields = (k.ifindex, k.proto, k.saddr, k.daddr, k.sport, k.dport, k.vlan_outer, k.vlan_inner,
                  k.pppoe_sid, k.vlan_outer_tpid)
        action = (4, 2, 1500, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03")
        assert abi.entry_bytes(fields, action)[0] == abi.key_bytes(k)


@pytest.mark.parametrize("fields, message", [
    (dict(vlan_outer=7, vlan_outer_tpid=0x9100), "neither 802.1Q nor 802.1ad"),
    (dict(vlan_outer_tpid=abi.ETH_P_8021AD), "needs an outer VLAN id"),
    (dict(vlan_outer=0x8007), "VLAN ids must be"),
    (dict(vlan_outer=7, vlan_inner=4096), "VLAN ids must be"),
])
def test_bad_vlan_fields_of_a_key_are_refused(fields, message):
    k = abi.FlowKey(7, 6, "198.18.0.1", "198.19.0.2", 1000, 80, **fields)
    with pytest.raises(ValueError, match=message):
        abi.key_bytes(k)
    with pytest.raises(ValueError, match=message):
        k.to_c()


def test_ipv6_key():
    k = abi.FlowKey(ifindex=1, proto=17, saddr="2001:2::1", daddr="2001:2:0:1::2", sport=53, dport=5353)
    raw = abi.key_bytes(k)
    assert raw[10] == abi.FAMILY_IPV6
    assert raw[16:32] == ipaddress.ip_address("2001:2::1").packed
    assert raw[32:48] == ipaddress.ip_address("2001:2:0:1::2").packed


def test_mixed_families_refused():
    with pytest.raises(ValueError, match="families differ"):
        abi.key_bytes(abi.FlowKey(1, 6, "198.18.0.1", "2001:2::1", 1, 2))


def test_action_nat_flags_and_defaults():
    k = abi.FlowKey(3, 6, "198.18.0.1", "198.19.0.2", 1000, 80)
    a = abi.FlowAction(out_ifindex=4, tx_port=2, mtu=1500, in_mac="02:00:00:00:00:01",
                       dmac="02:00:00:00:00:02", smac="02:00:00:00:00:03",
                       nat_saddr="198.18.1.1", nat_sport=4000)
    v = abi.flow_value(a, k)
    assert v.action.flags == lib.PYFLOW_ACT_SNAT
    assert bytes(ffi.buffer(v.action.nat_saddr))[:4] == bytes([198, 18, 1, 1])
    # DNAT not requested: destination fields carry the key's own values
    assert bytes(ffi.buffer(v.action.nat_daddr))[:4] == bytes([198, 19, 0, 2])
    assert struct.pack("=H", v.action.nat_sport) == struct.pack("!H", 4000)
    assert struct.pack("=H", v.action.nat_dport) == struct.pack("!H", 80)
    assert v.counters.packets == 0 and v.action.closing == 0


def test_action_encap_flags():
    k = abi.FlowKey(3, 17, "198.18.0.1", "198.19.0.2", 1, 2)
    a = abi.FlowAction(4, 2, 1492, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03",
                       vlan_outer_tci=10, vlan_outer_tpid=abi.ETH_P_8021AD, vlan_inner_tci=20, pppoe_sid=7)
    v = abi.flow_value(a, k)
    want = lib.PYFLOW_ACT_VLAN_OUTER | lib.PYFLOW_ACT_VLAN_INNER | lib.PYFLOW_ACT_PPPOE
    assert v.action.flags == want
    assert struct.pack("=H", v.action.encap.vlan_outer_tpid) == b"\x88\xa8"


def test_action_ppp_device_in_the_value():
    """ppp_ifindex sits in the action after the encapsulation, host order, bytes 76..80 of
    the 80-byte action (the header's two pad bytes before it): the fast bytes path and
    the cffi path agree, and the default 0 leaves it empty."""
    k = abi.FlowKey(3, 6, "198.18.0.1", "198.19.0.2", 1000, 80)
    a = abi.FlowAction(4, 2, 1492, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03",
                       pppoe_sid=7, ppp_ifindex=0x01020304)
    assert ffi.sizeof("struct pyflow_flow_action") == 80
    assert ffi.offsetof("struct pyflow_flow_action", "ppp_ifindex") == 76
    raw = abi.value_bytes(a, k)
    assert raw[76:80] == struct.pack("=I", 0x01020304)
    assert raw == bytes(ffi.buffer(abi.flow_value(a, k)))
    fields = ((3, 6, "198.18.0.1", "198.19.0.2", 1000, 80),
              (4, 2, 1492, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03",
               None, None, None, None, None, abi.ETH_P_8021Q, None, 7, 0x01020304))
    assert abi.entry_bytes(*fields)[1] == raw
    plain = abi.FlowAction(4, 2, 1492, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03",
                           pppoe_sid=7)
    assert abi.value_bytes(plain, k)[76:80] == bytes(4)


@pytest.mark.parametrize("kwargs, message", [
    ({"vlan_inner_tci": 5}, "inner VLAN tag needs an outer"),
    ({"pppoe_sid": 0}, "PPPoE session id out of range"),
    ({"pppoe_sid": 0xFFFF}, "PPPoE session id out of range"),
    ({"ppp_ifindex": 9}, "needs a PPPoE session"),
    ({"pppoe_sid": 7, "ppp_ifindex": 1 << 32}, "PPP device ifindex out of range"),
    ({"pppoe_sid": 7, "ppp_ifindex": -1}, "PPP device ifindex out of range"),
])
def test_action_bad_encap_refused(kwargs, message):
    a = abi.FlowAction(4, 2, 1500, "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03", **kwargs)
    with pytest.raises(ValueError, match=message):
        a.flags()


def test_bad_mac_refused():
    with pytest.raises(ValueError, match="not a MAC"):
        abi.mac_bytes("02:00:00")


def test_reason_names_cover_enum():
    assert len(abi.REASONS) == lib.PYFLOW_R__COUNT
    assert abi.REASONS[lib.PYFLOW_R_FORWARDED] == "forwarded"
    assert abi.REASONS[lib.PYFLOW_R_MISS] == "miss"
    assert len(set(abi.REASONS)) == len(abi.REASONS)


def test_bad_address_refused():
    with pytest.raises(ValueError, match="not an IP address"):
        abi.key_bytes(abi.FlowKey(1, 6, "198.18.0.300", "198.18.0.1", 1, 2))


def test_address_objects_accepted():
    k1 = abi.FlowKey(1, 6, ipaddress.ip_address("2001:2::1"), "2001:2::2", 1, 2)
    k2 = abi.FlowKey(1, 6, "2001:2::1", "2001:2::2", 1, 2)
    assert abi.key_bytes(k1) == abi.key_bytes(k2)
