"""Bridge ports under VLAN filtering (pyflow.control.bridge.BridgePorts) on the lab kernel.

The host kernel has no bridge VLAN filtering; the lab's has. One namespace, a bridge
pft-br with vlan_filtering on and three ports (veth ends whose peers stay outside):

- pft-l1: an access port of VLAN 1 (PVID, untagged), later also VLAN 10 untagged;
- pft-l2: a trunk: VLAN 1 (PVID, untagged) and VLAN 10 tagged;
- the bridge itself in VLAN 1 (PVID, untagged: the router's own untagged frames) and
  VLAN 10 (tagged: a VLAN device pft-br.10 would send there).

Static FDB entries put the clients where the test wants them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from pyflow.control import model
from pyflow.control.bridge import BridgePort, BridgePorts
from pyflow.control.model import NoPath, NotYet
from tests import netns

A, B = "02:00:5e:10:03:01", "02:00:5e:10:03:02"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@pytest.fixture
def ns() -> Iterator[str]:
    name = netns.create(netns.unique("lbv"))
    try:
        netns.run(name, "ip link add pft-br type bridge")
        probe = subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "pft-br", "type", "bridge",
                                "vlan_filtering", "1"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"the kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): "
                        f"{probe.stderr.strip()}")
        for cmd in ("ip link add pft-l1 type veth peer name pft-p1",
                    "ip link add pft-l2 type veth peer name pft-p2",
                    "ip link set pft-l1 master pft-br", "ip link set pft-l2 master pft-br",
                    "ip link set pft-br up", "ip link set pft-l1 up", "ip link set pft-l2 up",
                    "ip link set pft-p1 up", "ip link set pft-p2 up",
                    "bridge vlan add vid 10 dev pft-l2",
                    "bridge vlan add vid 10 dev pft-br self",
                    f"bridge fdb add {A} dev pft-l1 master static vlan 1",
                    f"bridge fdb add {B} dev pft-l2 master static vlan 10"):
            netns.run(name, cmd)
        yield name
    finally:
        netns.remove(name)


def test_ports_and_tags_follow_the_bridge_vlans(ns: str) -> None:
    l1, l2 = netns.ifindex(ns, "pft-l1"), netns.ifindex(ns, "pft-l2")
    br = netns.ifindex(ns, "pft-br")
    with netns.inside(ns):
        ports = BridgePorts()
    try:
        # untagged from the router: the bridge's PVID 1, untagged on the access port
        assert ports.port_of(br, _mac(A), None) == BridgePort(l1, "pft-l1", None, mtu=1500)
        # from a VLAN 10 device on the bridge: tagged on the trunk
        assert ports.port_of(br, _mac(B), 10) == BridgePort(l2, "pft-l2", 10, mtu=1500)
        with pytest.raises(NotYet):
            ports.port_of(br, _mac(B), None)  # B is known in VLAN 10 only

        netns.run(ns, "bridge vlan add vid 10 dev pft-l1 untagged")
        netns.run(ns, f"bridge fdb replace {B} dev pft-l1 master static vlan 10")  # B moved
        assert ports.port_of(br, _mac(B), 10) == BridgePort(l1, "pft-l1", None, mtu=1500)

        with pytest.raises(NoPath) as exc:
            ports.port_of(br, _mac(B), 30)
        assert exc.value.code == model.BRIDGE_VLAN_FILTERED  # the bridge is not in VLAN 30

        # the port leaves VLAN 10; the static entry stays, pointing at a port outside the VLAN
        netns.run(ns, "bridge vlan del vid 10 dev pft-l1")
        with pytest.raises(NoPath) as exc:
            ports.port_of(br, _mac(B), 10)
        assert exc.value.code == model.BRIDGE_VLAN_FILTERED
        netns.run(ns, f"bridge fdb replace {B} dev pft-l2 master static vlan 10")
        assert ports.port_of(br, _mac(B), 10).ifindex == l2

        netns.run(ns, "ip link set pft-br type bridge vlan_protocol 802.1ad")
        got = ports.port_of(br, _mac(B), 10)
        assert (got.vlan_tci, got.vlan_tpid) == (10, 0x88A8)

        netns.run(ns, "bridge vlan del vid 1 dev pft-br self")  # no PVID on the bridge
        with pytest.raises(NoPath) as exc:
            ports.port_of(br, _mac(A), None)
        assert exc.value.code == model.BRIDGE_NO_PVID
    finally:
        ports.close()
