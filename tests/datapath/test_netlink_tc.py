"""pyflow.netlink.tc: which qdisc is the ingress hook, adding clsact, and removing it only
when no filter of anyone else lives on either of its hooks. Devices are veths in a
namespace this test creates; the kernel's view is read with iproute2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pyflow.netlink import tc
from tests import netns


class _Msg(dict):
    """A qdisc message as far as the hook check reads it."""


def test_the_hook_is_told_by_parent_and_handle():
    clsact = _Msg(parent=0xFFFFFFF1, handle=0xFFFF0000)
    root_numbered_ffff = _Msg(parent=0xFFFFFFFF, handle=0xFFFF0000)
    root = _Msg(parent=0xFFFFFFFF, handle=0)
    assert tc.is_hook_qdisc(clsact)
    assert not tc.is_hook_qdisc(root_numbered_ffff)
    assert not tc.is_hook_qdisc(root)
    assert tc.PARENT_INGRESS == (tc.TC_H_CLSACT & 0xFFFF0000) | tc.TC_H_MIN_INGRESS
    assert tc.PARENT_EGRESS == (tc.TC_H_CLSACT & 0xFFFF0000) | tc.TC_H_MIN_EGRESS


@pytest.fixture
def dev() -> Iterator[tuple[str, Any, int]]:
    """(namespace, IPRoute inside it, ifindex of veth pft-q0)."""
    from pyroute2 import IPRoute

    with netns.namespaces("tc") as (name,):
        netns.veth(name, "pft-q0", name, "pft-q1")
        with netns.inside(name):
            ipr = IPRoute(ext_ack=True)
            try:
                yield name, ipr, netns.ifindex(name, "pft-q0")
            finally:
                ipr.close()


def _kinds(ns: str) -> list[str]:
    res = netns.run(ns, ["tc", "-j", "qdisc", "show", "dev", "pft-q0"])
    return [q["kind"] for q in json.loads(res.stdout)]


@pytest.mark.root
def test_ensure_adds_clsact_once_and_reports_a_legacy_ingress(dev):
    ns, ipr, ifindex = dev
    assert tc.hook_qdisc_kind(ipr, ifindex) is None
    assert tc.ensure_clsact(ipr, ifindex) == ("clsact", True)
    assert tc.ensure_clsact(ipr, ifindex) == ("clsact", False)
    assert "clsact" in _kinds(ns)
    tc.remove_clsact_if_unused(ipr, ifindex)
    assert "clsact" not in _kinds(ns)
    netns.run(ns, "tc qdisc add dev pft-q0 ingress")
    assert tc.ensure_clsact(ipr, ifindex) == ("ingress", False)
    tc.remove_clsact_if_unused(ipr, ifindex)  # not a clsact: never ours to remove
    assert "ingress" in _kinds(ns)


@pytest.mark.root
def test_a_root_qdisc_numbered_ffff_is_not_the_hook(dev):
    """ffff: is a legal handle for an egress qdisc; it is no hook, and it blocks clsact:
    the kernel's refusal reaches the caller instead of a wrong kind."""
    ns, ipr, ifindex = dev
    netns.run(ns, "tc qdisc add dev pft-q0 root handle ffff: htb")
    assert tc.hook_qdisc_kind(ipr, ifindex) is None
    with pytest.raises(NetlinkError):
        tc.ensure_clsact(ipr, ifindex)
    tc.remove_clsact_if_unused(ipr, ifindex)
    assert "htb" in _kinds(ns)


@pytest.mark.root
@pytest.mark.parametrize("hook", ["ingress", "egress"])
def test_clsact_with_a_filter_on_either_hook_stays(dev, hook):
    """Removing clsact removes both hooks' filters, so a filter on either keeps it."""
    ns, ipr, ifindex = dev
    assert tc.ensure_clsact(ipr, ifindex) == ("clsact", True)
    netns.run(ns, f"tc filter add dev pft-q0 {hook} pref 7 u32 match u32 0 0")
    assert tc.hooks_in_use(ipr, ifindex)
    tc.remove_clsact_if_unused(ipr, ifindex)
    assert "clsact" in _kinds(ns)
    netns.run(ns, f"tc filter del dev pft-q0 {hook} pref 7")
    assert not tc.hooks_in_use(ipr, ifindex)
    tc.remove_clsact_if_unused(ipr, ifindex)
    assert "clsact" not in _kinds(ns)


@pytest.mark.root
def test_removal_on_a_vanished_device_is_quiet(dev):
    ns, ipr, ifindex = dev
    tc.ensure_clsact(ipr, ifindex)
    netns.run(ns, "ip link del pft-q0")
    tc.remove_clsact_if_unused(ipr, ifindex)
