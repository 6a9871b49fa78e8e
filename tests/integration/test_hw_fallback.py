"""Hardware placement refused for real: every flow falls back to the XDP/TC fast path,
counted, and carries its transfer.

r1's three ports are attached in mode hw with hw_skip_hw (software flower rules, as labs
use). Placement is refused by the kernel itself: this machine's kernel has no cls_flower
(the guard rules are refused with ENOENT); on a kernel that has it, the orig direction
leaves over the 1400-byte uplink while its ingress takes 1500-byte packets, which a
flower rule cannot carry (over-MTU packets would be dropped by mirred instead of getting
their ICMP too-big), so the refusal reason is then "mtu". Either way the connection
must be offloaded to the XDP/TC entries, never lost.
"""

from __future__ import annotations

import contextlib

import pytest

from pyflow.control.engine import EngineConfig
from pyflow.control.runner import ControlConfig, ControlPlane
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.pins import pin_dir
from tests.support.router import MIB, Router, forwarded_bytes
from tests.support.topology import LAN, UP, UP2, V4, V6, topology
from tests.support.traffic import payload, tcp_transfer, wait_for

pytestmark = pytest.mark.root


class HwRouter(Router):
    def __init__(self, topo, config: ControlConfig):
        self.topo = topo
        self.pin = pin_dir("r1hw")
        with netns.inside(topo.r1):
            self.dp = Datapath(pin_dir=self.pin, state_file=f"/run/{self.pin.rsplit('/', 1)[1]}.json",
                               hw_skip_hw=True)
            for dev in (LAN, UP, UP2):
                assert self.dp.attach(dev, "hw").hw
            self.cp = ControlPlane(self.dp, config)
        self.start()


@contextlib.contextmanager
def hw_router():
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, offload_mark=0x100)
    with topology(nat=True) as topo:
        r = HwRouter(topo, cfg)
        try:
            yield topo, r
        finally:
            r.close()


def ingress_flower_filters(ns: str, ifname: str) -> str:
    res = netns.run(ns, ["tc", "filter", "show", "dev", ifname, "ingress"], check=False)
    return "\n".join(line for line in res.stdout.splitlines() if "flower" in line)


@pytest.mark.parametrize("family", [4, 6])
def test_refused_hardware_placement_falls_back_and_carries_the_transfer(family):
    size = 4 * MIB
    addrs = V4 if family == 4 else V6
    with hw_router() as (topo, r):
        assert r.cp.hw is not None, "hw devices must give the engine a flower adapter"
        for port, upload in ((5201, True), (5202, False)):
            seen: list = []
            fast_before = forwarded_bytes(r)
            res = tcp_transfer(topo.sv, addrs["sv"], port, topo.cl, addrs["sv"], port, payload(size, port),
                               upload=upload, gate=lambda p=port, s=seen: s.append(r.wait_offloaded(p)))
            assert res.received == size and res.received_sha == res.sent_sha
            off = seen[0]
            assert off.hw is False and off.hw_rules == ()
            assert forwarded_bytes(r) - fast_before > size * 0.9  # the XDP/TC entries carried it
            assert wait_for(lambda p=port: r.offloaded_with(p) is None, 3.0)
        st = r.engine.stats
        assert st.hw_offloaded == 0 and st.hw_failures == 2
        assert set(st.hw_refused) <= {"enoent", "mtu"} and sum(st.hw_refused.values()) == 2, st.hw_refused
        for dev in (LAN, UP, UP2):
            assert ingress_flower_filters(topo.r1, dev) == ""
