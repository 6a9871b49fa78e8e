"""The lab kernel offers what the lab is for, and a software flower rule really forwards.

Topology (all in namespaces made here):

    left (198.18.10.1) --- mid: flower on ingress, mirred redirect --- right (198.18.10.2)

``mid`` has no addresses, no forwarding and no bridge: a frame crosses it only if a
flower rule (skip_hw, so the kernel's software classifier runs it) redirects it.
"""

from __future__ import annotations

import json
import platform

import pytest

from tests import netns
from tests.lab.guest.lab import module_loaded
from tests.support import topology

# The capabilities the lab exists for (the host kernel lacks them: flower and its actions,
# the nf flowtable, 802.1Q): without them it is not the lab kernel.
LAB_MODULES = ("cls_flower", "act_pedit", "act_csum", "act_mirred", "act_vlan", "act_gact",
               "nf_flow_table", "nf_flow_table_inet", "nft_flow_offload", "8021q", "veth")


def test_lab_kernel_has_the_modules_the_lab_is_for():
    missing = [m for m in LAB_MODULES if not module_loaded(m)]
    assert not missing, f"kernel {platform.release()} did not load: {missing}"


def _flower_redirect(ns: str, from_dev: str, to_dev: str, dst: str) -> None:
    netns.run(ns, ["tc", "qdisc", "add", "dev", from_dev, "clsact"])
    netns.run(ns, ["tc", "filter", "add", "dev", from_dev, "ingress", "protocol", "ip", "pref", "10",
                   "flower", "skip_hw", "dst_ip", dst, "action", "mirred", "egress", "redirect",
                   "dev", to_dev])


def _flower_stats(ns: str, dev: str) -> tuple[int, bool]:
    """(packets matched, whether the rule is in hardware) of the flower rule on dev's ingress."""
    out = netns.run(ns, ["tc", "-s", "-j", "filter", "show", "dev", dev, "ingress"]).stdout
    for item in json.loads(out):
        opts = item.get("options")
        if item.get("kind") == "flower" and opts:
            packets = sum(a.get("stats", {}).get("packets", 0) for a in opts.get("actions", []))
            return packets, bool(opts.get("in_hw"))
    raise AssertionError(f"no flower rule on {dev}: {out}")


def _ping(ns: str, dst: str, count: int) -> bool:
    return netns.run(ns, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst], check=False,
                     timeout=30).returncode == 0


@pytest.fixture
def three_namespaces():
    spec = topology.Spec(
        namespaces={"left": "left", "mid": "mid", "right": "right"},
        veths=(topology.Veth("left", "pft-l0", "mid", "pft-m-l", ethtool=(None, None)),
               topology.Veth("mid", "pft-m-r", "right", "pft-r0", ethtool=(None, None))),
        addrs=(("left", "pft-l0", "198.18.10.1/24"), ("right", "pft-r0", "198.18.10.2/24")),
    )
    with topology.network(spec) as net:
        # static neighbours: only IPv4 frames need to cross, no ARP
        topology.static_neighbour(net, "left", "pft-l0", "198.18.10.2", "right", "pft-r0")
        topology.static_neighbour(net, "right", "pft-r0", "198.18.10.1", "left", "pft-l0")
        left, mid, right = net.ns["left"], net.ns["mid"], net.ns["right"]
        yield left, mid, right


def test_software_flower_rule_with_mirred_forwards_between_namespaces(three_namespaces):
    left, mid, right = three_namespaces
    assert not _ping(left, "198.18.10.2", 1), "frames crossed mid without any rule"
    _flower_redirect(mid, "pft-m-l", "pft-m-r", "198.18.10.2")
    _flower_redirect(mid, "pft-m-r", "pft-m-l", "198.18.10.1")
    assert _ping(left, "198.18.10.2", 5)
    there, in_hw = _flower_stats(mid, "pft-m-l")
    back, _ = _flower_stats(mid, "pft-m-r")
    assert there >= 5 and back >= 5, (there, back)
    assert not in_hw, "a veth cannot hold a hardware rule"
