"""pyflow on router r1 of the control-plane topology (tests.support.topology): datapath on
its three ports plus the control loop, with helpers to look at what it did."""

from __future__ import annotations

from pyflow.control.runner import ControlConfig, ControlPlane
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.pins import pin_dir
from tests.support.topology import LAN, UP, UP2
from tests.support.traffic import wait_for

MIB = 1 << 20


class Router:
    """pyflow running on r1: datapath + control loop, with helpers to look at it."""

    def __init__(self, topo, config: ControlConfig, *, start: bool = True):
        self.topo = topo
        self.pin = pin_dir("r1")
        with netns.inside(topo.r1):
            self.dp = Datapath(pin_dir=self.pin, state_file=f"/run/{self.pin.rsplit('/', 1)[1]}.json")
            for dev in (LAN, UP, UP2):
                self.dp.attach(dev, "auto")
            self.cp = ControlPlane(self.dp, config)
        if start:
            self.start()

    def start(self):
        with netns.inside(self.topo.r1):
            self.cp.start()

    @property
    def engine(self):
        return self.cp.engine

    def offloaded_with(self, port: int):
        """The Offloaded record whose original tuple has ``port`` as a port, if any."""
        for off in list(self.engine.offloaded.values()):
            if port in (off.conn.orig.sport, off.conn.orig.dport):
                return off
        return None

    def wait_offloaded(self, port: int, timeout: float = 5.0):
        off = wait_for(lambda: self.offloaded_with(port), timeout)
        assert off, f"connection on port {port} not offloaded; refused: {self.engine.stats.refused}"
        return off

    def wait_removed(self, port: int, causes: tuple[str, ...], timeout: float) -> bool:
        """Until the connection on ``port`` is off the fast path and a removal is counted under
        one of ``causes``. The engine lives in the control loop's thread and counts a removal
        last (after the entry left ``offloaded``, the map and conntrack), so a reader in this
        thread that saw only the entry gone could still read the count from before."""
        return wait_for(lambda: self.offloaded_with(port) is None
                        and any(self.engine.stats.removed.get(c) for c in causes), timeout)

    def flow_counters(self, off) -> list[tuple[int, ...]]:
        counters = self.cp.flows.read_counters().as_dict()
        return [counters[kb] for kb in off.key_bytes]

    def stats(self) -> dict[str, int]:
        return {name: packets for name, (packets, _) in self.dp.reason_counts().items()}

    def close(self):
        with netns.inside(self.topo.r1):
            self.cp.stop(hand_back=True)
            self.dp.destroy()


def forwarded_bytes(r) -> int:
    return r.dp.reason_counts()["forwarded"][1]
