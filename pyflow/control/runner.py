"""The control loop: wires the datapath, conntrack, paths and the engine together.

One thread, one select(): conntrack events and path changes are handled as they
arrive (a path change is applied within one loop turn, well under the 100 ms the
operators' failover cases need), and the keep-alive tick runs every
``keepalive_period_s``. The loop owns no policy: that is the engine's.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass, field

from ..abi import MAP_FLOWS
from ..flowtable import FlowTable
from ..loader import Datapath
from .conntrack import CtNetlink
from .engine import Engine, EngineConfig, ManagedDevice
from .paths import PathWatcher, RtPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    keepalive_period_s: float = 1.0
    conntrack_rcvbuf: int = 8 << 20
    offload_mark: int = 0  # conntrack mark bit set on offloaded entries (0: leave marks alone)


CT_EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"


def ensure_conntrack_events(path: str = CT_EVENTS_SYSCTL) -> None:
    """Make conntrack report every entry's events (nf_conntrack_events = 1).

    The kernel's default, 2, gives an entry an event cache only if a listener existed
    when the entry was created: an entry made while pyflow was not yet listening never
    reports its DESTROY, and its flows would stay offloaded until idle expiry. The
    setting is per network namespace; this runs in the loop's namespace.
    """
    try:
        with open(path) as f:
            current = f.read().strip()
        if current != "1":
            with open(path, "w") as f:
                f.write("1")
            log.info("nf_conntrack_events was %s; set to 1 so that every connection reports "
                     "its end", current)
    except OSError as exc:
        log.warning("cannot set nf_conntrack_events to 1 (%s): connections created while pyflow "
                    "was not listening will leave the fast path only when idle", exc.strerror)


class LoaderDevices:
    """The engine's device registry, read from the loader: every attached device with its
    tx-port slot and MAC. Refreshed on link changes (a MAC can change)."""

    def __init__(self, datapath: Datapath, paths: RtPaths):
        self.dp = datapath
        self.paths = paths
        self._by_index: dict[int, ManagedDevice] = {}
        self.refresh()

    def refresh(self) -> None:
        devices = {}
        for st in self.dp.status():
            if st.slot is None:
                continue
            try:
                mac = self.paths.mac_of(st.ifindex)
            except Exception:  # noqa: BLE001 - a device vanishing mid-refresh is simply not managed
                continue
            devices[st.ifindex] = ManagedDevice(st.ifindex, st.slot, mac)
        self._by_index = devices

    def get(self, ifindex: int) -> ManagedDevice | None:
        return self._by_index.get(ifindex)


class ControlPlane:
    """Runs the loop in a thread of its own, in the network namespace of the thread that
    calls start(). The netlink adapters are made inside that thread: pyroute2's
    synchronous sockets must be used from the thread that created them."""

    def __init__(self, datapath: Datapath, config: ControlConfig | None = None):
        self.config = config or ControlConfig()
        self.dp = datapath
        self.engine: Engine
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._hand_back = True

    def _setup(self) -> None:
        ensure_conntrack_events()
        self.flows = FlowTable(self.dp.map_fd(MAP_FLOWS))
        self.ct = CtNetlink(rcvbuf=self.config.conntrack_rcvbuf, offload_mark=self.config.offload_mark)
        self.paths = RtPaths()
        self.watcher = PathWatcher()
        self.devices = LoaderDevices(self.dp, self.paths)
        self.engine = Engine(self.ct, self.paths, self.flows, self.devices, self.config.engine)

    def run(self) -> None:
        """Set up, start from a full dump (adopting whatever a previous process left in
        the map), then follow events until stop()."""
        try:
            self._setup()
            self.engine.resync()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        period = self.config.keepalive_period_s
        next_tick = time.monotonic() + period
        sources = [self.ct.fileno(), self.watcher.fileno()]
        while not self._stop.is_set():
            wait = max(0.0, min(next_tick - time.monotonic(), 0.2))
            ready, _, _ = select.select(sources, [], [], wait)
            if self.ct.fileno() in ready:
                self.engine.handle(self.ct.poll(0))
            if self.watcher.fileno() in ready:
                self._paths_changed()
            if time.monotonic() >= next_tick:
                self.engine.tick()
                next_tick += period
                if next_tick < time.monotonic():  # fell behind: do not burst to catch up
                    next_tick = time.monotonic() + period
        if self._hand_back:
            self.engine.flush()

    def _paths_changed(self) -> None:
        changes = self.watcher.poll(0)
        if not changes:
            return
        if any(change[0] == "link" for change in changes):
            self.devices.refresh()
        self.engine.paths_changed()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pyflow-control", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self, *, hand_back: bool = True) -> None:
        """Stop the loop; with hand_back every flow leaves the fast path first."""
        self._hand_back = hand_back
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _close(self) -> None:
        for name in ("ct", "watcher", "paths", "flows"):
            part = getattr(self, name, None)
            close = getattr(part, "close", None)
            if close is not None:
                close()
