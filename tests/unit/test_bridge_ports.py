"""Bridge port decisions from decoded messages (pyflow.control.bridge), no root.

The messages are built in the kernel's layout (fdb_fill_info for the FDB entry,
br_fill_ifinfo for the AF_BRIDGE view of a port, br_fill_info for the bridge's
IFLA_INFO_DATA) so that VLAN filtering, which this host's kernel lacks, is tested
through the same decoders the resolver uses.
"""

from __future__ import annotations

import struct

import pytest

from pyflow.control import model
from pyflow.control.bridge import (
    AF_BRIDGE,
    BridgeInfo,
    BridgePort,
    decide,
    parse_bridge,
    parse_fdb,
    parse_port,
)
from pyflow.control.model import NoPath, NotYet
from pyflow.netlink import uapi as U
from pyflow.netlink.wire import BE16, U16, U32, nest, nla, request

BR, L1, L2, WIFI = 5, 6, 7, 8
MAC = bytes.fromhex("02005e100101")
UP = U.IFF_UP | U.IFF_RUNNING
PVID, UNTAGGED = U.BRIDGE_VLAN_INFO_PVID, U.BRIDGE_VLAN_INFO_UNTAGGED


def fdb_msg(port: int, *, vid: int = 0, state: int = U.NUD_REACHABLE, master: int = BR,
            mtype: int = U.RTM_NEWNEIGH) -> bytes:
    body = struct.pack("=BxxxiHBB", AF_BRIDGE, port, state, U.NTF_MASTER, 0) + nla(U.NDA_LLADDR, MAC)
    if master:
        body += nla(U.NDA_MASTER, U32.pack(master))
    if vid:
        body += nla(U.NDA_VLAN, U16.pack(vid))
    return request(mtype, 0, 1, body)


def port_msg(index: int, name: str, *, vlans: dict[int, int] | None = None, state: int | None = 3,
             flags: int = UP, arptype: int = U.ARPHRD_ETHER, master: int = BR, mtu: int = 1500,
             ranges: list[tuple[int, int, int]] = ()) -> bytes:
    body = struct.pack("=BxHiII", AF_BRIDGE, arptype, index, flags, 0)
    body += nla(U.IFLA_IFNAME, name.encode() + b"\0") + nla(U.IFLA_MASTER, U32.pack(master))
    body += nla(U.IFLA_MTU, U32.pack(mtu))
    if state is not None:
        body += nest(U.IFLA_PROTINFO, nla(U.IFLA_BRPORT_STATE, bytes((state,))))
    entries = [nla(U.IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", f, v)) for v, f in (vlans or {}).items()]
    for lo, hi, f in ranges:
        for flag, vid in ((U.BRIDGE_VLAN_INFO_RANGE_BEGIN, lo), (U.BRIDGE_VLAN_INFO_RANGE_END, hi)):
            entries.append(nla(U.IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", f | flag, vid)))
    if entries:
        body += nest(U.IFLA_AF_SPEC, *entries)
    return request(U.RTM_NEWLINK, 0, 1, body)


def bridge_msg(*, filtering: bool, proto: int = U.ETH_P_8021Q, kind: bytes = b"bridge") -> bytes:
    body = struct.pack("=BxHiII", 0, U.ARPHRD_ETHER, BR, UP, 0) + nla(U.IFLA_IFNAME, b"br-lan\0")
    data = nest(U.IFLA_INFO_DATA, nla(U.IFLA_BR_VLAN_FILTERING, bytes((int(filtering),))),
                nla(U.IFLA_BR_VLAN_PROTOCOL, BE16.pack(proto)))
    body += nest(U.IFLA_LINKINFO, nla(U.IFLA_INFO_KIND, kind + b"\0"), data)
    return request(U.RTM_NEWLINK, 0, 1, body)


def ports_of(*msgs: bytes) -> dict:
    out = {}
    for m in msgs:
        p = parse_port(m, 0, len(m))
        out[p.ifindex] = p
    return out


def bridge(filtering: bool, proto: int = U.ETH_P_8021Q) -> BridgeInfo:
    info = parse_bridge(bridge_msg(filtering=filtering, proto=proto))
    assert info is not None
    return info


# the LAN of a router with VLAN filtering: the bridge itself in VLAN 1 (PVID, untagged) and
# VLAN 10 (tagged: br-lan.10 above it); lan1 an access port of VLAN 1, lan2 a trunk carrying
# VLAN 10 tagged and VLAN 1 untagged, wifi only VLAN 20
FILTERED = ports_of(
    port_msg(BR, "br-lan", vlans={1: PVID | UNTAGGED, 10: 0}, state=None),
    port_msg(L1, "lan1", vlans={1: PVID | UNTAGGED}),
    port_msg(L2, "lan2", vlans={1: PVID | UNTAGGED, 10: 0}),
    port_msg(WIFI, "wifi", vlans={20: PVID | UNTAGGED}),
)


def test_decoders_read_the_kernel_layout() -> None:
    e = parse_fdb(fdb_msg(L2, vid=10, state=U.NUD_NOARP))
    assert e is not None and (e.ifindex, e.master, e.mac, e.vid, e.state) == (L2, BR, MAC, 10, U.NUD_NOARP)
    ip_neigh = bytearray(fdb_msg(L2))
    ip_neigh[16] = 2  # AF_INET: not an FDB entry
    assert parse_fdb(bytes(ip_neigh)) is None
    p = FILTERED[L2]
    assert (p.ifname, p.master, p.stp_state, p.mtu, dict(p.vlans), p.pvid) == (
        "lan2", BR, 3, 1500, {1: PVID | UNTAGGED, 10: 0}, 1)
    ranged = parse_port(m := port_msg(L1, "lan1", ranges=[(100, 103, 0)]), 0, len(m))
    assert dict(ranged.vlans) == {100: 0, 101: 0, 102: 0, 103: 0}
    assert bridge(True) == BridgeInfo(BR, "br-lan", True, U.ETH_P_8021Q)
    assert parse_bridge(bridge_msg(filtering=False, kind=b"veth")) is None


def test_without_filtering_the_port_is_the_fdb_entry_and_tags_pass() -> None:
    ports = ports_of(port_msg(BR, "br-lan", state=None), port_msg(L1, "lan1"), port_msg(L2, "lan2"))
    entry = parse_fdb(fdb_msg(L1))
    assert decide(bridge(False), ports, entry, MAC, None) == BridgePort(L1, "lan1", None, mtu=1500)
    # the tag passes as it entered the bridge: its protocol is the VLAN device's above the
    # bridge (vlan_tpid 0), whatever the bridge's own VLAN protocol, which applies to filtering
    assert decide(bridge(False), ports, entry, MAC, 10) == BridgePort(L1, "lan1", 10, 0, mtu=1500)
    assert decide(bridge(False, U.ETH_P_8021AD), ports, entry, MAC, 10) == BridgePort(L1, "lan1", 10, 0,
                                                                                       mtu=1500)
    with pytest.raises(NotYet):
        decide(bridge(False), ports, None, MAC, None)


def test_vlan_filtering_tags_by_the_port_membership() -> None:
    br = bridge(True)
    # untagged from the host: the bridge's PVID 1, untagged on both lan1 and lan2
    assert decide(br, FILTERED, parse_fdb(fdb_msg(L1, vid=1)), MAC, None).vlan_tci is None
    assert decide(br, FILTERED, parse_fdb(fdb_msg(L2, vid=1)), MAC, None).vlan_tci is None
    # from br-lan.10: tagged 10 on the trunk
    trunk = decide(br, FILTERED, parse_fdb(fdb_msg(L2, vid=10)), MAC, 10)
    assert trunk == BridgePort(L2, "lan2", 10, mtu=1500)
    # 802.1ad bridge: the tag carries its protocol
    ad = decide(bridge(True, U.ETH_P_8021AD), FILTERED, parse_fdb(fdb_msg(L2, vid=10)), MAC, 10)
    assert (ad.vlan_tci, ad.vlan_tpid) == (10, U.ETH_P_8021AD)


@pytest.mark.parametrize("port, vid, fdb_vid, code", [
    (L1, 10, 10, model.BRIDGE_VLAN_FILTERED),  # lan1 is not in VLAN 10
    (WIFI, None, 1, model.BRIDGE_VLAN_FILTERED),  # wifi is not in the bridge's PVID
    (L2, 20, 20, model.BRIDGE_VLAN_FILTERED),  # the bridge itself is not in VLAN 20
    (BR, None, 1, model.BRIDGE_LOCAL_MAC),  # an entry of the bridge itself
    (99, None, 1, model.DEVICE_GONE),  # a port that left
])
def test_vlan_filtering_refusals(port, vid, fdb_vid, code) -> None:
    with pytest.raises(NoPath) as exc:
        decide(bridge(True), FILTERED, parse_fdb(fdb_msg(port, vid=fdb_vid)), MAC, vid)
    assert exc.value.code == code


def test_no_pvid_on_the_bridge_refuses_untagged() -> None:
    ports = dict(FILTERED)
    ports.update(ports_of(port_msg(BR, "br-lan", vlans={10: 0}, state=None)))
    with pytest.raises(NoPath) as exc:
        decide(bridge(True), ports, parse_fdb(fdb_msg(L2, vid=1)), MAC, None)
    assert exc.value.code == model.BRIDGE_NO_PVID


@pytest.mark.parametrize("msg, code", [
    (port_msg(L1, "lan1", vlans={1: PVID | UNTAGGED}, state=0), model.BRIDGE_PORT_BLOCKED),
    (port_msg(L1, "lan1", vlans={1: PVID | UNTAGGED}, flags=U.IFF_UP), model.DEVICE_DOWN),
    (port_msg(L1, "lan1", vlans={1: PVID | UNTAGGED}, arptype=U.ARPHRD_PPP), model.NOT_ETHERNET),
    (port_msg(L1, "lan1", vlans={1: PVID | UNTAGGED}, master=BR + 100), model.DEVICE_GONE),
])
def test_unusable_ports_are_refused(msg, code) -> None:
    ports = dict(FILTERED)
    ports.update(ports_of(msg))
    with pytest.raises(NoPath) as exc:
        decide(bridge(True), ports, parse_fdb(fdb_msg(L1, vid=1)), MAC, None)
    assert exc.value.code == code


def test_a_local_entry_is_refused_on_any_port() -> None:
    with pytest.raises(NoPath) as exc:
        decide(bridge(False), ports_of(port_msg(L1, "lan1")), parse_fdb(fdb_msg(L1, state=U.NUD_PERMANENT)),
               MAC, None)
    assert exc.value.code == model.BRIDGE_LOCAL_MAC


def test_watcher_reports_fdb_first_seen_moves_and_deletes_only() -> None:
    from pyflow.control.paths import PathWatcher

    w = PathWatcher(groups=())
    try:
        def fed(msg: bytes) -> list:
            out: list = []
            w._decode(msg, out)
            return out

        change = [("fdb", BR, "02:00:5e:10:01:01")]
        assert fed(fdb_msg(L1)) == change  # first seen
        assert fed(fdb_msg(L1, state=U.NUD_STALE)) == []  # aged in place: same port
        assert fed(fdb_msg(L2)) == change  # moved
        assert fed(fdb_msg(L2, state=U.NUD_PERMANENT)) == change  # became the host's
        assert fed(fdb_msg(L2, mtype=U.RTM_DELNEIGH)) == change
        assert fed(fdb_msg(L1, vid=10)) == [("fdb", BR, "02:00:5e:10:01:01 vlan 10")]
        assert fed(fdb_msg(L1, master=0)) == []  # a device's own address list, no bridge
        assert fed(port_msg(L1, "lan1", state=0)) == [("link", L1, None)]  # STP / VLAN changes
    finally:
        w.close()
