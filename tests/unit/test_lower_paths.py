"""A path down to the real port: VLAN, QinQ, PPPoE (over VLAN) and bridge-port layers, the
managed layer the planner picks, and the keys and actions both directions get from it.

The devices are LinkInfo values and the routes RouteReply values, run through the real
plan_egress / build_egress / port_layers; only the kernel (route and neighbour answers,
the PPPoE session table, the bridge FDB) is faked. The PPPoE session table is the kernel's
/proc/net/pppoe text, laid out as pppoe_seq_show writes it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, replace

import pytest

from pyflow.control import model, pppoe
from pyflow.control import paths as P
from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import Egress, Layer, NoPath, NotYet
from tests.support.fakes import CLIENT_MAC, FakeConntrack, FakeDevices, FakeFlows, masq_conn, offer

V4 = socket.AF_INET
UP = 0x11043  # IFF_UP | IFF_RUNNING | ... as a working device reports
LAN1, LAN2, BR, BR10, WAN, WAN7, PPP, SVLAN, CVLAN, L2TP = 2, 4, 5, 15, 3, 7, 20, 11, 12, 21


def mac(n: int) -> bytes:
    return bytes((2, 0, 0, 0, 0, n))


CONC_MAC = bytes.fromhex("02000000aa01")  # the PPPoE concentrator
GW_MAC = bytes.fromhex("020000000099")


def eth(ifindex: int, name: str, **kw) -> P.LinkInfo:
    return P.LinkInfo(ifindex=ifindex, ifname=name, arptype=P.ARPHRD_ETHER, flags=UP, mtu=kw.pop("mtu", 1500),
                      mac=kw.pop("mac", mac(ifindex)), kind=kw.pop("kind", None), link=kw.pop("link", None),
                      link_netnsid=None, **kw)


def vlan(ifindex: int, name: str, lower: int, vid: int, proto: int = P.ETH_P_8021Q, **kw) -> P.LinkInfo:
    return eth(ifindex, name, kind="vlan", link=lower, vlan_id=vid, vlan_proto=proto, **kw)


LINKS = {
    LAN1: eth(LAN1, "lan1"), LAN2: eth(LAN2, "lan2"),
    BR: eth(BR, "br-lan", kind="bridge", mac=mac(0x55)),
    BR10: vlan(BR10, "br-lan.10", BR, 10, mac=mac(0x55)),
    WAN: eth(WAN, "wan"), WAN7: vlan(WAN7, "wan.7", WAN, 7, mtu=1500),
    SVLAN: vlan(SVLAN, "wan.300", WAN, 300, P.ETH_P_8021AD), CVLAN: vlan(CVLAN, "wan.300.20", SVLAN, 20),
    PPP: P.LinkInfo(ifindex=PPP, ifname="pppoe-wan", arptype=P.ARPHRD_PPP, flags=0x10051, mtu=1492, mac=None,
                    kind="ppp", link=None, link_netnsid=None),
    L2TP: P.LinkInfo(ifindex=L2TP, ifname="l2tp-vpn", arptype=P.ARPHRD_PPP, flags=0x10051, mtu=1400,
                     mac=None, kind="ppp", link=None, link_netnsid=None),
}


def proc_text(*sessions: tuple[int, bytes, str]) -> str:
    """/proc/net/pppoe as pppoe_seq_show prints it: "%08X %pM %8s" of the __be16 session id
    (its two bytes in network order, read as a host integer), the MAC, the device."""
    lines = ["Id       Address              Device"]
    for sid, remote, dev in sessions:
        raw = int.from_bytes(sid.to_bytes(2, "big"), sys.byteorder)
        lines.append(f"{raw:08X} {':'.join(f'{b:02x}' for b in remote)} {dev:>8}")
    return "\n".join(lines) + "\n"


# ---- /proc/net/pppoe ---------------------------------------------------------------------

def test_proc_text_is_parsed_in_the_kernels_byte_order():
    text = proc_text((0x1234, CONC_MAC, "wan.7"), (1, mac(9), "eth0"))
    assert pppoe.parse_sessions(text) == [pppoe.Session(0x1234, CONC_MAC, "wan.7"),
                                          pppoe.Session(1, mac(9), "eth0")]
    if sys.byteorder == "little":
        # session 1 as the kernel prints it on x86/arm: its be16 bytes 00 01 read little-endian
        assert pppoe.parse_sessions("Id       Address              Device\n"
                                    "00000100 02:00:00:00:aa:01    wan.7\n")[0].sid == 1
    assert pppoe.parse_sessions("Id       Address              Device\n") == []


@pytest.mark.parametrize("line", ["00000100 02:00:00:00:aa:01", "00000100 02:00:00:00:aa wan.7",
                                  "1000000 02:00:00:00:aa:01 wan.7", "zz 02:00:00:00:aa:01 wan.7"])
def test_a_line_that_is_not_a_session_is_an_error_not_a_guess(line):
    with pytest.raises(ValueError, match="line 2"):
        pppoe.parse_sessions("Id       Address              Device\n" + line + "\n")


def test_session_of_is_exact_or_refused_with_a_code():
    one = [pppoe.Session(0x1234, CONC_MAC, "wan.7")]
    assert pppoe.session_of("pppoe-wan", ["pppoe-wan"], one) == one[0]
    cases = [
        ([], ["pppoe-wan"], model.PPPOE_NO_SESSION),  # L2TP/serial ppp, or not connected
        ([pppoe.Session(0, CONC_MAC, "wan.7")], ["pppoe-wan"], model.PPPOE_NO_SESSION),  # reserved id
        (one + [pppoe.Session(0x99, mac(8), "wan.8")], ["pppoe-wan"], model.PPPOE_AMBIGUOUS),
        (one, ["pppoe-wan", "l2tp-vpn"], model.PPPOE_AMBIGUOUS),  # which ppp is the PPPoE one?
    ]
    for sessions, devices, code in cases:
        with pytest.raises(NoPath) as info:
            pppoe.session_of("pppoe-wan", devices, sessions)
        assert info.value.code == code
        assert "pppoe-wan" in str(info.value)


def test_session_table_reads_nothing_without_the_pppoe_module(tmp_path):
    table = pppoe.SessionTable(str(tmp_path / "absent"))
    assert table.read() == []
    (tmp_path / "pppoe").write_text(proc_text((7, CONC_MAC, "wan.7")))
    assert pppoe.SessionTable(str(tmp_path / "pppoe")).read() == [pppoe.Session(7, CONC_MAC, "wan.7")]


# ---- layers of one egress ----------------------------------------------------------------

def route(oif: int, mtu: int = 0) -> P.RouteReply:
    return P.RouteReply(V4, P.RTN_UNICAST, 254, oif, None, 0, None, mtu, 0, False)


def session_lookup(sessions: list[pppoe.Session], links=LINKS):
    """The resolver's ppp -> session step over a fake namespace (its ppp devices and /proc text)."""
    def lookup(dev: P.LinkInfo):
        ppp_names = [i.ifname for i in links.values() if i.kind == "ppp"]
        s = pppoe.session_of(dev.ifname, ppp_names, sessions)
        by_name = {i.ifname: i for i in links.values()}
        return s, by_name[s.device]
    return lookup


def plan(oif: int, *, sessions=(), links=LINKS, mtu: int = 0) -> P.Plan:
    return P.plan_egress(V4, socket.inet_pton(V4, "198.19.0.50"), route(oif, mtu), links.get,
                         session_lookup(list(sessions), links))


def test_pppoe_over_vlan_layers():
    p = plan(PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")],
             links={k: v for k, v in LINKS.items() if k != L2TP}, mtu=1480)
    head, wan7, wan = p.layers
    assert head.ifindex == PPP and head.refusal and head.refusal[0] == model.NOT_ETHERNET
    assert wan7 == Layer(WAN7, "wan.7", pppoe_sid=0x1234)
    assert wan == Layer(WAN, "wan", vlan_outer_tci=7, pppoe_sid=0x1234)
    # frames go to the concentrator (no neighbour), from the session device's address, with
    # the smaller of route MTU and the ppp device's own
    assert (p.dmac, p.smac, p.mtu, p.ppp_ifindex) == (CONC_MAC, mac(WAN7), 1480, PPP)
    eg = P.build_egress(p, p.dmac)
    at_wan = model.egress_at(eg, wan)
    assert at_wan == Egress(ifindex=WAN, ifname="wan", smac=mac(WAN7), dmac=CONC_MAC, mtu=1480,
                            vlan_outer_tci=7, pppoe_sid=0x1234, lower_ifindex=WAN, ppp_ifindex=PPP)
    assert plan(PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")],
                links={k: v for k, v in LINKS.items() if k != L2TP}).mtu == 1492
    with pytest.raises(NoPath) as info:
        model.egress_at(eg, head)
    assert info.value.code == model.NOT_ETHERNET


def test_pppoe_ambiguity_is_refused_when_planned():
    with pytest.raises(NoPath) as info:  # an L2TP ppp device next to the PPPoE one
        plan(PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")])
    assert info.value.code == model.PPPOE_AMBIGUOUS


def test_a_bridge_ends_the_walk_and_its_port_continues_it():
    p = plan(BR10)
    assert p.layers == (Layer(BR10, "br-lan.10"), Layer(BR, "br-lan", vlan_outer_tci=10, bridge=True))
    assert P.bridge_vid(p.layers[1]) == 10
    # the bridge gives the frame its port's tag (here: untagged on lan1)
    assert P.port_layers(p.layers[1], Port(LAN1, "lan1", None), LINKS.get) == (Layer(LAN1, "lan1"),)
    assert P.port_layers(p.layers[1], Port(LAN2, "lan2", 10), LINKS.get) == (
        Layer(LAN2, "lan2", vlan_outer_tci=10),)
    with pytest.raises(NoPath) as info:
        P.port_layers(p.layers[1], Port(99, "gone", None), LINKS.get)
    assert info.value.code == model.DEVICE_GONE


# ---- the planner: which layer, and the keys of the other direction ----------------------

@dataclass(frozen=True)
class Port:
    """What BridgePorts.port_of answers (pyflow.control.bridge.BridgePort's fields)."""

    ifindex: int
    ifname: str
    vlan_tci: int | None
    vlan_tpid: int = P.ETH_P_8021Q


class FakeBridgePorts:
    """BridgePorts.port_of over a table: (bridge, mac, vid) -> port; NotYet if absent."""

    def __init__(self):
        self.fdb: dict[tuple[int, bytes, int | None], Port] = {}
        self.calls = 0

    def port_of(self, bridge_ifindex, mac, vid):
        self.calls += 1
        port = self.fdb.get((bridge_ifindex, mac, vid))
        if port is None:
            raise NotYet(f"{mac.hex()} not learned on bridge {bridge_ifindex}")
        return port


class LayeredPaths:
    """model.PathResolver over the fake namespace: 198.18.0.0/24 lives behind ``lan`` (on-link,
    the client's MAC), everything else behind ``wan`` (gateway MAC, or the PPPoE session)."""

    def __init__(self, lan: int, wan: int, sessions=(), links=None):
        self.lan, self.wan = lan, wan
        self.links = dict(links if links is not None else {k: v for k, v in LINKS.items() if k != L2TP})
        self.sessions = list(sessions)
        self.bridges = FakeBridgePorts()

    def device_of(self, family, addr, *, mark):
        return self.lan if ipaddress.ip_address(addr) in ipaddress.ip_network("198.18.0.0/24") else self.wan

    def egress(self, family, src, dst, *, iif, mark):
        dev = self.device_of(family, dst, mark=mark)
        p = P.plan_egress(family, socket.inet_pton(family, dst), route(dev), self.links.get,
                          session_lookup(self.sessions, self.links))
        return P.build_egress(p, p.dmac or (CLIENT_MAC if dev == self.lan else GW_MAC))

    def below_bridge(self, bridge, dmac):
        return P.port_layers(bridge, self.bridges.port_of(bridge.ifindex, dmac, P.bridge_vid(bridge)),
                             self.links.get)

    def mac_of(self, ifindex):
        return self.links[ifindex].mac


def engine(paths, managed):
    devices = FakeDevices(managed=managed, macs={i: mac(i) for i in managed})
    return Engine(FakeConntrack(), paths, FakeFlows(), devices, EngineConfig(), clock=lambda: 1)


def keys_actions(paths, managed):
    keys, actions = engine(paths, managed).plan(masq_conn())
    return keys, actions


def test_vlan_uplink_on_the_real_port():
    keys, actions = keys_actions(LayeredPaths(LAN1, WAN7), (LAN1, WAN))
    # to the internet: out on wan, tag 7 written, from wan.7's address
    assert (actions[0].out_ifindex, actions[0].vlan_outer_tci, actions[0].smac) == (WAN, 7, mac(WAN7))
    # from the internet: arrives on wan with VLAN 7, addressed to wan.7
    assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].vlan_inner, keys[1].pppoe_sid) == (WAN, 7, 0, 0)
    assert keys[1].vlan_outer_tpid == actions[0].vlan_outer_tpid == P.ETH_P_8021Q
    assert actions[1].in_mac == mac(WAN7)
    assert (keys[0].ifindex, keys[0].vlan_outer) == (LAN1, 0)
    assert (actions[1].out_ifindex, actions[1].vlan_outer_tci) == (LAN1, None)


def test_a_vlan_device_managed_itself_takes_its_frames_untagged():
    """The VLAN device managed directly (TC on wan.7): it is the first managed layer going
    down, so the kernel writes the tag, and its ingress sees frames already untagged."""
    keys, actions = keys_actions(LayeredPaths(LAN1, WAN7), (LAN1, WAN7, WAN))
    assert (actions[0].out_ifindex, actions[0].vlan_outer_tci, actions[0].tx_port) == (WAN7, None, WAN7 * 10)
    assert (keys[1].ifindex, keys[1].vlan_outer) == (WAN7, 0)


def test_qinq_keys_hold_both_ids():
    keys, actions = keys_actions(LayeredPaths(LAN1, CVLAN), (LAN1, WAN))
    a = actions[0]
    assert (a.out_ifindex, a.vlan_outer_tci, a.vlan_outer_tpid, a.vlan_inner_tci) == (WAN, 300, 0x88A8, 20)
    assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].vlan_inner) == (WAN, 300, 20)
    # the S-VLAN device's protocol (IFLA_VLAN_PROTOCOL) is matched on the way back in
    assert keys[1].vlan_outer_tpid == P.ETH_P_8021AD
    # managed on the S-VLAN device: only the inner tag is left to write
    keys, actions = keys_actions(LayeredPaths(LAN1, CVLAN), (LAN1, SVLAN))
    assert (actions[0].out_ifindex, actions[0].vlan_outer_tci, actions[0].vlan_inner_tci) == (SVLAN, 20, None)
    assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].vlan_inner) == (SVLAN, 20, 0)
    assert (actions[0].vlan_outer_tpid, keys[1].vlan_outer_tpid) == (P.ETH_P_8021Q, P.ETH_P_8021Q)


def test_an_802_1ad_vlan_device_gives_key_and_action_its_protocol():
    """wan.400 is an 802.1ad VLAN device (IFLA_VLAN_PROTOCOL 0x88a8): the tag written on the way
    out and the tag matched on the way back in are 802.1ad, so an 802.1Q frame of VLAN 400
    on wan does not hit the flow. The same id on an 802.1Q device gives 802.1Q in both."""
    for proto in (P.ETH_P_8021AD, P.ETH_P_8021Q):
        links = {**LINKS, 40: vlan(40, "wan.400", WAN, 400, proto)}
        keys, actions = keys_actions(LayeredPaths(LAN1, 40, links=links), (LAN1, WAN))
        a = actions[0]
        assert (a.out_ifindex, a.vlan_outer_tci, a.vlan_outer_tpid) == (WAN, 400, proto)
        assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].vlan_outer_tpid) == (WAN, 400, proto)
        assert keys[0].vlan_outer_tpid == P.ETH_P_8021Q and keys[0].vlan_outer == 0  # lan1: untagged


def test_pppoe_over_vlan_keys_and_actions():
    paths = LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")])
    keys, actions = keys_actions(paths, (LAN1, WAN))
    up, down = actions
    assert (up.out_ifindex, up.dmac, up.smac, up.mtu) == (WAN, CONC_MAC, mac(WAN7), 1492)
    assert (up.vlan_outer_tci, up.pppoe_sid, up.ppp_ifindex) == (7, 0x1234, PPP)
    assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].pppoe_sid) == (WAN, 7, 0x1234)
    assert down.in_mac == mac(WAN7)  # the concentrator sends to the session device's address
    assert (down.pppoe_sid, down.ppp_ifindex, down.mtu) == (None, 0, 1500)
    # managed on wan.7 itself: the PPPoE header only
    keys, actions = keys_actions(paths, (LAN1, WAN7))
    assert (actions[0].out_ifindex, actions[0].vlan_outer_tci, actions[0].pppoe_sid) == (WAN7, None, 0x1234)
    assert (keys[1].ifindex, keys[1].vlan_outer, keys[1].pppoe_sid) == (WAN7, 0, 0x1234)


def test_refusals_of_a_pppoe_path_are_counted():
    cases = [
        (LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(1, CONC_MAC, "wan.7")]), (LAN1, PPP),
         model.NOT_ETHERNET),  # pyflow on the ppp device: it carries no Ethernet frames
        (LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(1, CONC_MAC, "wan.7")], links=LINKS), (LAN1, WAN),
         model.PPPOE_AMBIGUOUS),
        (LayeredPaths(LAN1, PPP), (LAN1, WAN), model.PPPOE_NO_SESSION),
        (LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(1, CONC_MAC, "wan.7")]), (LAN1,),
         model.INGRESS_NOT_MANAGED),
    ]
    for paths, managed, code in cases:
        eng = engine(paths, managed)
        offer(eng, eng.ct, masq_conn())
        assert not eng.offloaded and eng.stats.refused == {code: 1}, code


def test_bridge_port_egress_follows_the_fdb():
    paths = LayeredPaths(BR, WAN)
    paths.bridges.fdb[(BR, CLIENT_MAC, None)] = Port(LAN2, "lan2", None)
    keys, actions = keys_actions(paths, (LAN1, LAN2, WAN))
    assert (actions[1].out_ifindex, actions[1].vlan_outer_tci, actions[1].smac) == (LAN2, None, mac(0x55))
    assert (keys[0].ifindex, keys[0].vlan_outer) == (LAN2, 0)
    assert actions[0].in_mac == mac(0x55)  # the client sends to the bridge's address
    # not learned yet: the connection waits (pending), nothing is guessed
    paths.bridges.fdb.clear()
    eng = engine(paths, (LAN1, LAN2, WAN))
    offer(eng, eng.ct, masq_conn())
    assert not eng.offloaded and len(eng.pending) == 1


def test_bridge_port_with_vlan_filtering():
    """br-lan.10: frames enter the bridge in VLAN 10; the port says how they leave: tagged
    on a trunk port, untagged on an access port."""
    paths = LayeredPaths(BR10, WAN)
    paths.bridges.fdb[(BR, CLIENT_MAC, 10)] = Port(LAN1, "lan1", 10)
    keys, actions = keys_actions(paths, (LAN1, WAN))
    assert (actions[1].out_ifindex, actions[1].vlan_outer_tci) == (LAN1, 10)
    assert (keys[0].ifindex, keys[0].vlan_outer) == (LAN1, 10)
    paths.bridges.fdb[(BR, CLIENT_MAC, 10)] = Port(LAN1, "lan1", None)
    keys, actions = keys_actions(paths, (LAN1, WAN))
    assert (actions[1].vlan_outer_tci, keys[0].vlan_outer) == (None, 0)


def test_bridge_vlan_protocol_802_1ad_tags_and_keys_the_port():
    """A VLAN-filtering bridge with vlan_protocol 802.1ad tags a trunk port's frames 802.1ad
    (the port answer's vlan_tpid): the action writes 802.1ad, the key matches it."""
    paths = LayeredPaths(BR10, WAN)
    paths.bridges.fdb[(BR, CLIENT_MAC, 10)] = Port(LAN1, "lan1", 10, P.ETH_P_8021AD)
    keys, actions = keys_actions(paths, (LAN1, WAN))
    assert (actions[1].out_ifindex, actions[1].vlan_outer_tci, actions[1].vlan_outer_tpid) == (
        LAN1, 10, P.ETH_P_8021AD)
    assert (keys[0].ifindex, keys[0].vlan_outer, keys[0].vlan_outer_tpid) == (LAN1, 10, P.ETH_P_8021AD)
    # no VLAN filtering (vlan_tpid 0): the tag keeps the protocol of the VLAN device above the
    # bridge, whatever the bridge's vlan_protocol
    for proto in (P.ETH_P_8021AD, P.ETH_P_8021Q):
        links = {**LINKS, BR10: vlan(BR10, "br-lan.10", BR, 10, proto, mac=mac(0x55))}
        paths = LayeredPaths(BR10, WAN, links=links)
        paths.bridges.fdb[(BR, CLIENT_MAC, 10)] = Port(LAN1, "lan1", 10, 0)
        keys, actions = keys_actions(paths, (LAN1, WAN))
        assert (actions[1].vlan_outer_tci, actions[1].vlan_outer_tpid) == (10, proto)
        assert (keys[0].vlan_outer, keys[0].vlan_outer_tpid) == (10, proto)


def test_a_managed_bridge_is_the_egress_without_fdb_lookup():
    paths = LayeredPaths(BR10, WAN)
    keys, actions = keys_actions(paths, (BR, LAN1, WAN))
    assert (actions[1].out_ifindex, actions[1].vlan_outer_tci) == (BR, 10)
    assert (keys[0].ifindex, keys[0].vlan_outer) == (BR, 10)
    assert paths.bridges.calls == 0


def test_a_redial_rewrites_the_flows_of_the_old_session():
    paths = LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")])
    eng = engine(paths, (LAN1, WAN))
    offer(eng, eng.ct, masq_conn())
    (off,) = eng.offloaded.values()
    old_key = off.keys[1]
    assert old_key.pppoe_sid == 0x1234
    paths.sessions = [pppoe.Session(0x2345, CONC_MAC, "wan.7")]  # pppd dialled again
    eng.paths_changed()
    (off,) = eng.offloaded.values()
    assert (off.keys[1].pppoe_sid, off.actions[0].pppoe_sid) == (0x2345, 0x2345)
    assert replace(old_key, pppoe_sid=0x2345) == off.keys[1]
    assert len(eng.flows.entries) == 2  # the old session's entry is gone, not left beside the new
    assert eng.stats.rewritten == 1


# ---- the resolver's cache: a re-dial is never answered with the old session --------------

class FakeTable:
    """pppoe.SessionTable over a list; counts reads (each one is a /proc read)."""

    def __init__(self, sessions):
        self.sessions = sessions
        self.reads = 0
        self.netns = pppoe.netns_id()

    def read(self):
        self.reads += 1
        return list(self.sessions)


class FakeWatcher:
    def __init__(self):
        self.changes = []

    def poll(self, timeout):
        out, self.changes = self.changes, []
        return out

    def close(self):
        pass


def test_the_resolver_reads_sessions_when_planning_and_forgets_them_on_changes():
    links = {k: v for k, v in LINKS.items() if k != L2TP}
    rt = P.RtPaths()
    real_watch = rt._watch
    try:
        rt._watch = watch = FakeWatcher()
        rt._lookup = lambda *args: route(PPP)  # the kernel's route answer: via pppoe-wan
        rt._link = links.get
        rt._namespace_links = lambda: list(links.values())
        rt._sessions = table = FakeTable([pppoe.Session(0x1234, CONC_MAC, "wan.7")])

        def sid(dst="198.19.0.50"):
            eg = rt.egress(V4, "198.18.0.10", dst, iif=LAN1, mark=0)
            return model.egress_at(eg, eg.layers[-1]).pppoe_sid

        assert sid() == 0x1234
        assert sid() == 0x1234 and sid("198.19.0.51") == 0x1234
        assert table.reads == 1  # not a /proc read per lookup: once per plan
        table.sessions = [pppoe.Session(0x2345, CONC_MAC, "wan.7")]
        watch.changes = [("neigh", WAN7, "198.19.0.1")]  # nothing a session depends on
        assert sid() == 0x1234 and table.reads == 1
        watch.changes = [("link", PPP, None)]  # pppd re-dialled: the ppp device went down and up
        assert sid() == 0x2345 and table.reads == 2
        table.sessions = [pppoe.Session(0x3456, CONC_MAC, "wan.7")]
        watch.changes = [("route", PPP, "0.0.0.0/0")]  # demand dialling: the device stays, routes change
        assert sid() == 0x3456 and table.reads == 3
        table.sessions = []
        watch.changes = [("link", PPP, None)]
        with pytest.raises(NoPath) as info:
            sid()
        assert info.value.code == model.PPPOE_NO_SESSION
    finally:
        rt._watch = real_watch
        rt.close()


def test_not_managed_says_which_side():
    """No managed layer on the way to a host: ingress_not_managed when the host lives behind
    that route device (its own traffic arrives where pyflow does not run); egress_not_managed
    when policy routing sends the direction out elsewhere than where the host lives."""
    eng = engine(LayeredPaths(LAN1, WAN7), (LAN1,))
    offer(eng, eng.ct, masq_conn())
    assert eng.stats.refused == {model.INGRESS_NOT_MANAGED: 1}

    class Elsewhere(LayeredPaths):
        def egress(self, family, src, dst, *, iif, mark):
            if self.device_of(family, dst, mark=mark) == self.wan:  # routed out via wan.300.20
                p = P.plan_egress(family, socket.inet_pton(family, dst), route(CVLAN), self.links.get)
                return P.build_egress(p, GW_MAC)
            return super().egress(family, src, dst, iif=iif, mark=mark)

    eng = engine(Elsewhere(LAN1, WAN7), (LAN1, WAN7))
    offer(eng, eng.ct, masq_conn())
    assert eng.stats.refused == {model.EGRESS_NOT_MANAGED: 1}
