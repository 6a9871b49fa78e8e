"""pyflow's flower placement on r1 of the control-plane topology, without an XDP datapath:
the engine with its real adapters (ctnetlink, rtnetlink paths, the flower adapter) driven
by a loop thread in r1's namespace. Used by the kernel lab's flower tests, which compile
no BPF program (the emulated lab is slow)."""

from __future__ import annotations

import collections
import dataclasses
import socket
import subprocess
import threading
import time

from pyflow.control.conntrack import CtNetlink
from pyflow.control.engine import Engine, EngineConfig, ManagedDevice
from pyflow.control.paths import PathWatcher, RtPaths
from pyflow.datapath.abi import coarse_clock_ns
from pyflow.hw.offload import FlowerOffload
from tests import netns
from tests.support.fakes import FakeFlows
from tests.support.topology import LAN, UP, UP2
from tests.support.traffic import wait_for

MODULES = ("cls_flower", "act_pedit", "act_csum", "act_mirred", "act_gact", "act_vlan")


def flower_missing() -> str | None:
    """None if the flower classifier and its actions load, else modprobe's complaint."""
    res = subprocess.run(["modprobe", "-a", *MODULES], capture_output=True, text=True)
    if res.returncode != 0:
        return res.stderr.strip() or "modprobe failed"
    return None


class MapOfRefused(FakeFlows):
    """The flow map of these tests: there is no XDP datapath (no BPF compile in the emulated
    lab), so whatever the engine puts here is a flow the flower adapter refused and handed
    to the XDP path. Its counters stay at zero; ``inserted`` counts the entries put in."""

    def __init__(self):
        super().__init__()
        self.inserted = 0

    def insert(self, items, *, mode="any"):
        n = super().insert(items, mode=mode)
        self.inserted += n
        return n


class RecordingOffload(FlowerOffload):
    """The flower adapter, keeping each rule's last counters (read through pyflow's decoder
    in the same dump format the keep-alive uses) as it removes the rule: a connection's
    rules go as soon as conntrack reports its close, before a test could look."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.final: dict = {}

    def remove(self, ids):
        now = self.stats()
        self.final.update({rid: now[rid] for rid in ids if rid in now})
        super().remove(ids)


class Devices:
    def __init__(self, paths: RtPaths, names):
        self.by_index = {}
        for slot, name in enumerate(names):
            ifindex = socket.if_nametoindex(name)
            self.by_index[ifindex] = ManagedDevice(ifindex, slot, paths.mac_of(ifindex))

    def get(self, ifindex):
        return self.by_index.get(ifindex)


class FlowerRouter:
    """The engine on r1 with the flower adapter, driven by a loop thread in r1's namespace:
    conntrack events, path changes and a keep-alive tick every 0.2 s."""

    def __init__(self, ns: str, *, idle_timeout_s: float = 30.0, skip_hw: bool = True):
        self.ns = ns
        self.skip_hw = skip_hw
        self.device_refusals: dict[str, str | None] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._idle = idle_timeout_s
        # for the failure messages: the last conntrack events, and how the loop keeps up
        self.events: collections.deque = collections.deque(maxlen=400)
        self.slowest_tick = 0.0
        self.last_turn = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "flower router did not start"
        if self.error:
            raise self.error

    def _run(self):
        try:
            with netns.inside(self.ns):
                self.ct = CtNetlink(offload_mark=0x100)
                self.paths = RtPaths()
                self.watcher = PathWatcher()
                self.hw = RecordingOffload(skip_hw=self.skip_hw)
                for name in (LAN, UP, UP2):
                    self.device_refusals[name] = self.hw.add_device(socket.if_nametoindex(name))
                self.flows = MapOfRefused()
                self.engine = Engine(self.ct, self.paths, self.flows, Devices(self.paths, (LAN, UP, UP2)),
                                     EngineConfig(idle_timeout_s=self._idle), clock=coarse_clock_ns,
                                     hw=self.hw)
                self.engine.resync()
                self._ready.set()
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self._ready.set()

    def _loop(self):
        import select

        next_tick = time.monotonic() + 0.2
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.ct.fileno(), self.watcher.fileno()], [], [], 0.05)
                if self.ct.fileno() in ready:
                    events = self.ct.poll(0)
                    now = time.monotonic()
                    self.events.extend((now, ev) for ev in events)
                    self.engine.handle(events)
                if self.watcher.fileno() in ready and self.watcher.poll(0):
                    self.engine.paths_changed()
                if time.monotonic() >= next_tick:
                    t0 = time.monotonic()
                    self.engine.tick()
                    self.slowest_tick = max(self.slowest_tick, time.monotonic() - t0)
                    next_tick = time.monotonic() + 0.2
                self.last_turn = time.monotonic()
            self.engine.flush()
        finally:
            for part in (self.hw, self.ct, self.watcher, self.paths):
                part.close()

    def offloaded_with(self, port: int):
        for off in list(self.engine.offloaded.values()):
            if port in (off.conn.orig.sport, off.conn.orig.dport):
                return off
        return None

    def wait_offloaded(self, port: int, timeout: float = 60.0):  # emulated: rule dumps per tick are slow
        off = wait_for(lambda: self.offloaded_with(port), timeout)
        assert off, self.why_not(port)
        return off

    def why_not(self, port: int) -> str:
        """What the engine saw of a connection on port: its events, the engine's counters,
        lost events, the loop's pace and conntrack's own view."""
        now = time.monotonic()
        seen = [f"{t - now:+.1f}s {'RESYNC' if ev is None else self._event_text(ev)}"
                for t, ev in list(self.events)
                if ev is None or port in (ev.conn.orig.sport, ev.conn.orig.dport)]
        ct = netns.run(self.ns, ["conntrack", "-L", "-p", "tcp"], check=False).stdout
        return (f"connection on port {port} not offloaded; loop error {self.error!r}\n"
                f"engine stats {dataclasses.asdict(self.engine.stats)}; pending {list(self.engine.pending)}\n"
                f"lost conntrack events {self.ct.lost_events}; slowest tick {self.slowest_tick:.1f}s; "
                f"last loop turn {now - self.last_turn:.1f}s ago\n"
                f"events on port {port}: {seen}\n"
                f"conntrack: {[ln for ln in ct.splitlines() if str(port) in ln]}")

    def rule_dump(self) -> str:
        return "\n".join(netns.run(self.ns, ["tc", "-s", "filter", "show", "dev", dev, "ingress"],
                                    check=False).stdout for dev in (LAN, UP))

    @staticmethod
    def _event_text(ev) -> str:
        c = ev.conn
        return (f"{ev.type.name} {c.orig.src}:{c.orig.sport}->{c.orig.dst}:{c.orig.dport} "
                f"state {c.tcp_state} status {c.status:#x}")

    def close(self):
        self._stop.set()
        self._thread.join(30)
        if self.error:
            raise self.error
