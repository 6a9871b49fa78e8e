"""Inside the kernel lab (it has 8021q, the host kernel has not): no XDP on a device with a
VLAN upper while it strips VLAN tags on receive, since XDP would see the tagged frames as
untagged. veth offers rx VLAN stripping as a switchable feature (rx-vlan-hw-parse,
rx-vlan-stag-hw-parse, both on by default), which is all the check reads; the choice
itself is unit-tested in tests/unit/test_attach_vlan.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pyflow.datapath import netdev
from pyflow.datapath.loader import Datapath
from pyflow.errors import DeviceError
from tests import netns
from tests.pins import remove_pin_dir
from tests.support.datapath import link_xdp, our_filter, qdisc_kinds

pytestmark = pytest.mark.root
DEV, UPPER, QINQ = "pft-a", "pft-a.10", "pft-a.s20"


def ethtool_on(ns: str, dev: str) -> set[str]:
    """Features ``ethtool -k`` lists as on (read without pyflow)."""
    out = netns.run(ns, ["ethtool", "-k", dev]).stdout
    return {line.split(":")[0].strip() for line in out.splitlines()[1:] if ": on" in line}


def rxvlan(ns: str, ctag: str, stag: str) -> None:
    netns.run(ns, ["ethtool", "-K", DEV, "rxvlan", ctag, "rx-vlan-stag-hw-parse", stag])
    on = ethtool_on(ns, DEV)
    # ethtool -k shows the kernel's rx-vlan-hw-parse under its old name
    assert ("rx-vlan-offload" in on) == (ctag == "on") and ("rx-vlan-stag-hw-parse" in on) == (stag == "on")


@pytest.fixture
def ns() -> Iterator[str]:
    """veth pft-a <-> pft-b with 802.1Q upper pft-a.10 and rx VLAN stripping on for 802.1Q only."""
    with netns.namespaces("vs") as (name,):
        netns.veth(name, DEV, name, "pft-b")
        res = netns.run(name, ["ip", "link", "add", "link", DEV, "name", UPPER, "type", "vlan", "id", "10"],
                        check=False)
        if res.returncode != 0:
            pytest.skip(f"no 802.1Q devices on this kernel: {res.stderr.strip()}")
        rxvlan(name, "on", "off")
        with netns.inside(name):
            yield name


@pytest.fixture
def dp(ns, tmp_path) -> Iterator[Datapath]:
    pin = f"/sys/fs/bpf/pft-vs-{tmp_path.name}"
    d = Datapath(pin, state_file=str(tmp_path / "state.json"))
    try:
        yield d
    finally:
        d.close()
        remove_pin_dir(pin)


def untouched(ns: str) -> bool:
    return (link_xdp(ns, DEV) == (0, 0) and our_filter(ns, DEV) is None
            and "clsact" not in qdisc_kinds(ns, DEV))


def test_the_facts_are_the_kernels(ns):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        facts = netdev.read_vlan_facts(ipr, netdev.read_facts(ipr, DEV))
        assert facts.vlan_uppers == ((UPPER, "802.1Q"),)
        assert facts.vlan_rx_strip == ("rx-vlan-hw-parse",)
        peer = netdev.read_vlan_facts(ipr, netdev.read_facts(ipr, "pft-b"))
        assert peer.vlan_uppers == () and peer.vlan_hazard() is None
        detail = json.loads(netns.run(ns, ["ip", "-j", "-d", "link", "show", UPPER]).stdout)[0]
        assert detail["linkinfo"]["info_kind"] == "vlan" and detail["link"] == DEV
        netns.run(ns, ["ip", "link", "add", "link", DEV, "name", QINQ, "type", "vlan",
                       "protocol", "802.1ad", "id", "20"])
        facts = netdev.read_vlan_facts(ipr, netdev.read_facts(ipr, DEV))
        assert facts.vlan_uppers == ((UPPER, "802.1Q"), (QINQ, "802.1ad"))


def test_auto_picks_tc_and_says_why(ns, dp, monkeypatch):
    st = dp.attach(DEV, "auto")
    assert st.mode == "tc" and "veth" in st.reason  # a veth is tc anyway: the reason adds the VLAN one
    assert f"XDP would be ruled out anyway: VLAN upper(s) {UPPER} (802.1Q)" in st.reason
    assert link_xdp(ns, DEV) == (0, 0) and our_filter(ns, DEV) is not None
    # a device the rule calls a NIC (no NIC here: the rule is made to call the veth one)
    monkeypatch.setattr(netdev, "choose_mode", lambda facts: ("native", "pretend NIC"))
    st = dp.attach(DEV, "auto")
    assert st.mode == "tc"
    assert st.reason.startswith(f"TC ingress instead of native XDP: VLAN upper(s) {UPPER} (802.1Q) "
                                "and rx VLAN offload on (rx-vlan-hw-parse)")
    assert {s.ifname: s.reason for s in dp.status()}[DEV] == st.reason
    assert link_xdp(ns, DEV) == (0, 0) and our_filter(ns, DEV) is not None


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_explicit_xdp_is_refused_and_nothing_changes(ns, dp, mode):
    with pytest.raises(DeviceError) as exc:
        dp.attach(DEV, mode)
    msg = str(exc.value)
    assert msg.startswith(f"{DEV}: {mode} XDP refused: VLAN upper(s) {UPPER} (802.1Q)")
    assert msg.endswith(f"use --mode tc (or auto), or run `ethtool -K {DEV} rxvlan off` first")
    assert untouched(ns) and dp.status() == []
    # attached in tc, a refused native leaves tc as it was
    tc = dp.attach(DEV, "tc")
    filt = our_filter(ns, DEV)
    with pytest.raises(DeviceError, match="XDP refused"):
        dp.attach(DEV, mode)
    assert link_xdp(ns, DEV) == (0, 0) and our_filter(ns, DEV) == filt
    assert [(s.mode, s.prog_id) for s in dp.status()] == [("tc", tc.prog_id)]


def test_with_rxvlan_off_native_is_accepted_and_a_later_upper_is_caught_at_reattach(ns, dp):
    rxvlan(ns, "off", "off")
    st = dp.attach(DEV, "native")
    assert st.mode == "native" and link_xdp(ns, DEV) == (1, st.prog_id)
    # stripping switched back on under a running hook is not watched; the next attach sees it
    rxvlan(ns, "on", "off")
    with pytest.raises(DeviceError, match="XDP refused"):
        dp.attach(DEV, "native")
    assert link_xdp(ns, DEV) == (1, st.prog_id)  # the refused attach changed nothing
    auto = dp.attach(DEV, "auto")  # auto moves it to tc
    assert auto.mode == "tc" and link_xdp(ns, DEV) == (0, 0)


def test_802_1ad_stripping_counts_too(ns, dp):
    """802.1ad tags stripped are as invisible to XDP as 802.1Q ones."""
    rxvlan(ns, "off", "on")
    with pytest.raises(DeviceError, match=f"`ethtool -K {DEV} rx-vlan-stag-hw-parse off`"):
        dp.attach(DEV, "native")
    assert untouched(ns)
