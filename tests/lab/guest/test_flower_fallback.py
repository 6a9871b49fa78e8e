"""Inside the kernel lab: when the kernel refuses pyflow's flower rules, every flow is handed
to the XDP fast path instead, counted, never lost.

The refusal is the kernel's own: the adapter installs its rules as it does for a NIC, with
skip_sw ("in hardware only"), on r1's veth ports. veth has no flower offload, so the lab
kernel, which has cls_flower, refuses them -- what a NIC does with a rule it cannot run or
a table that is full. As in test_flower.py no datapath is compiled here (the emulated lab
is slow): the engine's flow map is an in-memory one, so the test shows each refused
connection's two entries handed to it while the connection's traffic takes the kernel
path. That those entries then carry the traffic is shown on the host by
tests/integration/test_hw_fallback.py, where the kernel refuses flower altogether.
"""

from __future__ import annotations

import pytest

from tests import netns
from tests.support.flower import FlowerRouter
from tests.support.topology import LAN, UP, UP2, V4, V6, topology
from tests.support.traffic import payload, tcp_transfer, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("flower_kernel")]
KIB = 1024


def test_refused_rules_hand_every_flow_to_the_xdp_path_counted():
    with topology(nat=True) as topo:
        for ns, dev in ((topo.cl, "pft-cl-0"), (topo.r1, LAN)):
            netns.run(ns, ["ip", "link", "set", dev, "mtu", "1400"])  # as in test_flower: MTU is no reason
        r = FlowerRouter(topo.r1, skip_hw=False)
        try:
            refusals = set(r.device_refusals.values())
            assert None not in refusals, r.device_refusals  # every port refused the hardware-only rules
            assert not {"enoent", "mtu"} & refusals, refusals  # by the kernel that has cls_flower
            cases = ((4, 7401, True), (4, 7402, False), (6, 7403, True), (6, 7404, False))
            for family, port, upload in cases:
                addrs = V4 if family == 4 else V6
                seen: list = []

                def placed(p=port, s=seen):
                    off = r.wait_offloaded(p)
                    s.append((off, {kb for kb in off.key_bytes if kb in r.flows.entries}))

                res = tcp_transfer(topo.sv, addrs["sv"], port, topo.cl, addrs["sv"], port,
                                   payload(128 * KIB, port), upload=upload, timeout=120, gate=placed)
                assert res.received_sha == res.sent_sha
                off, in_map = seen[0]
                assert off.hw is False and off.hw_rules == ()
                assert in_map == set(off.key_bytes), "both directions handed to the XDP map"
                assert wait_for(lambda p=port: r.offloaded_with(p) is None, 20.0)
            st = r.engine.stats
            assert st.hw_offloaded == 0 and st.hw_failures == len(cases), (st.hw_failures, st.hw_refused)
            assert set(st.hw_refused) == refusals, (st.hw_refused, refusals)
            listed = [netns.run(topo.r1, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
                      for dev in (LAN, UP, UP2)]
            assert not any("flower" in text for text in listed), "no rule was accepted, none is left"
        finally:
            r.close()
