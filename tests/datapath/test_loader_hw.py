"""Mode "hw" in pyflow.datapath.loader, on veth pairs in a namespace this test creates.

veth has no flower offload (hw-tc-offload is "off [fixed]"), which is exactly the device
hw must refuse; hw_skip_hw (software flower rules, for labs and tests) lets it through.
A device reporting hw-tc-offload on is simulated by replacing the capability reader.
"""

from __future__ import annotations

import pytest

from pyflow.errors import DeviceError
from pyflow.netlink import ethtool
from tests.support.datapath import devmap, link_xdp, our_filter

pytestmark = pytest.mark.root


def test_capability_of_a_veth_is_read_over_ethtool_netlink(ns):
    cap = ethtool.tc_offload("pft-a")
    assert cap == ethtool.TcOffload("pft-a", supported=False, active=False)
    assert cap.why_not() == "hw-tc-offload is unsupported"
    with pytest.raises(DeviceError, match=r"^no such device: eth9$"):
        ethtool.tc_offload("eth9")


def test_hw_on_a_device_that_cannot_offload_is_refused_and_nothing_changes(make_dp, ns):
    dp = make_dp()
    with pytest.raises(DeviceError) as err:
        dp.attach("pft-a", "hw")
    assert str(err.value) == ("pft-a cannot offload to hardware (hw-tc-offload is unsupported); "
                              "use --mode auto or tc")
    assert dp.status() == [] and devmap(dp.pin_dir) == {}
    assert our_filter(ns, "pft-a") is None and link_xdp(ns, "pft-a") == (0, 0)


def test_hw_with_skip_hw_attaches_the_software_hook_and_marks_the_device(make_dp, ns):
    dp = make_dp(hw_skip_hw=True)
    st = dp.attach("pft-a", "hw")
    assert (st.mode, st.hw) == ("tc", True)
    assert "flower rules in software" in st.reason and "veth" in st.reason
    assert our_filter(ns, "pft-a") is not None  # refused flows still have the fast path
    assert [(s.ifname, s.hw) for s in dp.status()] == [("pft-a", True)]
    # a restarted process adopts the device as a hardware device
    again = make_dp(hw_skip_hw=True)
    assert [(s.ifname, s.mode, s.hw) for s in again.status()] == [("pft-a", "tc", True)]
    # and a plain re-attach makes it a software device again
    assert again.attach("pft-a", "tc").hw is False


def test_auto_picks_hw_only_where_hw_tc_offload_is_on(make_dp, ns, monkeypatch):
    dp = make_dp()
    assert dp.attach("pft-a", "auto").hw is False
    monkeypatch.setattr(ethtool, "tc_offload",
                        lambda name: ethtool.TcOffload(name, supported=True, active=name == "pft-b"))
    st = dp.attach("pft-b", "auto")
    assert (st.mode, st.hw) == ("tc", True) and "hw-tc-offload is on" in st.reason
    assert dp.attach("pft-a", "auto").hw is False
    with pytest.raises(DeviceError, match=r"^pft-a cannot offload to hardware \(hw-tc-offload is off\)"):
        dp.attach("pft-a", "hw")
    assert {s.ifname: s.hw for s in dp.status()} == {"pft-a": False, "pft-b": True}
