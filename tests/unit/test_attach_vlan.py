"""XDP is never put on a device with VLAN uppers whose NIC strips tags on receive: XDP would
see the tagged frames as untagged (pyflow.datapath.netdev). The choice and the facts reader
with fake facts and a fake rtnetlink socket; the kernel's side is tests/lab/guest/test_vlan_strip.py."""

from __future__ import annotations

import pytest

from pyflow.datapath import netdev
from pyflow.datapath.attach import switch
from pyflow.errors import DeviceError
from pyflow.netlink import ethtool

NIC = netdev.DeviceFacts("eth1", 5, None, "pci", "0000:03:00.0", "mlx5_core", None, 1500, None, 0)
VETH = netdev.DeviceFacts("v0", 6, "veth", None, None, "veth", None, 1500, None, 0)
UPPERS = (("eth1.10", "802.1Q"), ("eth1.20", "802.1Q"))


def vlan(facts: netdev.DeviceFacts, uppers=UPPERS, strip=("rx-vlan-hw-parse",)) -> netdev.DeviceFacts:
    import dataclasses

    return dataclasses.replace(facts, vlan_uppers=uppers, vlan_rx_strip=strip)


@pytest.fixture(autouse=True)
def no_hw(monkeypatch):
    """No ethtool request for hw-tc-offload: the device has none, unless a test says so."""
    def fake(ifname, *, asked, skip_hw):
        if asked:
            return True, "hw-tc-offload is on: flower rules in the NIC"
        return False, ""
    monkeypatch.setattr(switch, "hw_choice", fake)


def test_no_hazard_without_uppers_or_without_stripping():
    assert NIC.vlan_hazard() is None
    assert vlan(NIC, uppers=()).vlan_hazard() is None
    assert vlan(NIC, strip=()).vlan_hazard() is None
    assert switch.choose(vlan(NIC, strip=()), "native", skip_hw=False).mode == "native"
    assert switch.choose(vlan(NIC, strip=()), "auto", skip_hw=False).mode == "native"
    assert switch.choose(vlan(NIC, uppers=()), "auto", skip_hw=False).mode == "native"


def test_auto_takes_tc_instead_of_native_and_says_why():
    c = switch.choose(vlan(NIC), "auto", skip_hw=False)
    assert (c.mode, c.fallback, c.hw) == ("tc", False, False)
    assert c.reason.startswith("TC ingress instead of native XDP: VLAN upper(s) eth1.10 (802.1Q), "
                               "eth1.20 (802.1Q) and rx VLAN offload on (rx-vlan-hw-parse)")
    assert "untagged" in c.reason


def test_auto_on_a_device_tc_anyway_keeps_its_reason_and_adds_the_vlan_one():
    plain = switch.choose(VETH, "auto", skip_hw=False)
    c = switch.choose(vlan(VETH, uppers=(("v0.7", "802.1Q"),)), "auto", skip_hw=False)
    assert c.mode == "tc" and c.reason.startswith(plain.reason)
    assert "XDP would be ruled out anyway: VLAN upper(s) v0.7 (802.1Q)" in c.reason


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_explicit_xdp_is_refused_in_one_line_naming_device_uppers_and_fix(mode):
    with pytest.raises(DeviceError) as exc:
        switch.choose(vlan(NIC), mode, skip_hw=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == (f"eth1: {mode} XDP refused: VLAN upper(s) eth1.10 (802.1Q), eth1.20 (802.1Q) "
                   "and rx VLAN offload on (rx-vlan-hw-parse): the NIC strips the tags before XDP, "
                   "which would take tagged frames for untagged ones; use --mode tc (or auto), "
                   "or run `ethtool -K eth1 rxvlan off` first")


def test_the_fix_names_every_stripping_feature_that_is_on():
    both = vlan(NIC, uppers=(("eth1.100", "802.1ad"),),
                strip=("rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"))
    with pytest.raises(DeviceError, match=r"eth1\.100 \(802\.1ad\)") as exc:
        switch.choose(both, "generic", skip_hw=False)
    assert "`ethtool -K eth1 rxvlan off rx-vlan-stag-hw-parse off`" in str(exc.value)
    # an 802.1Q upper with only 802.1ad stripping on is refused too: the port is a trunk
    stag = vlan(NIC, strip=("rx-vlan-stag-hw-parse",))
    with pytest.raises(DeviceError, match="ethtool -K eth1 rx-vlan-stag-hw-parse off"):
        switch.choose(stag, "native", skip_hw=False)


def test_tc_is_accepted_with_the_hazard():
    c = switch.choose(vlan(NIC), "tc", skip_hw=False)
    assert (c.mode, c.reason) == ("tc", "asked for tc")


def test_hw_keeps_flower_but_its_software_hook_is_tc():
    """Flower rules match the tag themselves; the hook for the flows the NIC refuses is
    XDP by the auto rule, so it moves to TC as auto does."""
    c = switch.choose(vlan(NIC), "hw", skip_hw=False)
    assert c.hw and c.mode == "tc" and not c.fallback
    assert "software hook for refused flows: TC ingress instead of native XDP" in c.reason
    assert switch.choose(NIC, "hw", skip_hw=False).mode == "native"


# ---- reading the facts -----------------------------------------------------------------

class Nla:
    def __init__(self, **attrs):
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


def link(name, index, kind=None, lower=None, proto=None, netnsid=None):
    info = None
    if kind:
        data = Nla(IFLA_VLAN_PROTOCOL=proto) if kind == "vlan" else None
        info = Nla(IFLA_INFO_KIND=kind, IFLA_INFO_DATA=data)
    return Nla(IFLA_IFNAME=name, IFLA_LINKINFO=info, IFLA_LINK=lower, IFLA_LINK_NETNSID=netnsid,
               index=index)


class FakeIpr:
    def __init__(self, links):
        self.links = links

    def link(self, cmd, **kw):
        assert cmd == "dump"
        return self.links


LINKS = [
    link("lo", 1), link("eth1", 5), link("eth2", 7),
    link("eth1.20", 9, "vlan", 5, 0x8100), link("eth1.10", 8, "vlan", 5, 0x8100),
    link("eth1.s100", 10, "vlan", 5, 0x88A8),
    link("eth2.30", 11, "vlan", 7, 0x8100),
    link("mv0", 12, "macvlan", 5),                 # an upper, but not a VLAN one
    link("other.5", 13, "vlan", 5, 0x8100, netnsid=3),  # its lower is ifindex 5 of another namespace
]


def test_vlan_uppers_are_the_vlan_devices_on_top_of_this_one_in_this_namespace():
    assert netdev.vlan_uppers(FakeIpr(LINKS), 5) == (
        ("eth1.10", "802.1Q"), ("eth1.20", "802.1Q"), ("eth1.s100", "802.1ad"))
    assert netdev.vlan_uppers(FakeIpr(LINKS), 7) == (("eth2.30", "802.1Q"),)
    assert netdev.vlan_uppers(FakeIpr(LINKS), 1) == ()


def test_read_vlan_facts_asks_ethtool_only_when_there_are_uppers(monkeypatch):
    asked = []

    def strip(ifname):
        asked.append(ifname)
        return ("rx-vlan-hw-parse",)
    monkeypatch.setattr(ethtool, "vlan_rx_strip", strip)
    lo = netdev.read_vlan_facts(FakeIpr(LINKS), netdev.DeviceFacts("lo", 1, None, None, None, None,
                                                                    None, 65536, None, 0))
    assert (lo.vlan_uppers, lo.vlan_rx_strip, asked) == ((), (), [])
    eth2 = netdev.read_vlan_facts(FakeIpr(LINKS), netdev.DeviceFacts("eth2", 7, None, "pci", "x", None,
                                                                      None, 1500, None, 0))
    assert eth2.vlan_uppers == (("eth2.30", "802.1Q"),) and eth2.vlan_rx_strip == ("rx-vlan-hw-parse",)
    assert asked == ["eth2"]


def test_unreadable_stripping_counts_as_on(monkeypatch):
    def broken(ifname):
        raise DeviceError(f"{ifname}: cannot read device features over ethtool netlink: nope")
    monkeypatch.setattr(ethtool, "vlan_rx_strip", broken)
    f = netdev.read_vlan_facts(FakeIpr(LINKS), NIC)
    assert "rx VLAN offload unreadable, taken as on" in (f.vlan_hazard() or "")
    assert switch.choose(f, "auto", skip_hw=False).mode == "tc"
    with pytest.raises(DeviceError, match="`ethtool -K eth1 rxvlan off`"):
        switch.choose(f, "native", skip_hw=False)


def test_ethtool_features_are_read_by_their_ethtool_names(monkeypatch):
    monkeypatch.setattr(ethtool, "features", lambda ifname: (
        {"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse", "hw-tc-offload"},
        {"rx-vlan-stag-hw-parse", "rx-vlan-hw-parse", "rx-checksum"}))
    assert ethtool.vlan_rx_strip("eth1") == ("rx-vlan-hw-parse", "rx-vlan-stag-hw-parse")
    assert ethtool.tc_offload("eth1") == ethtool.TcOffload("eth1", supported=True, active=False)
