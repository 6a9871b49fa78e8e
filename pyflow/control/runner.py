"""The control loop: wires the datapath, conntrack, paths and the engine together.

One thread, one select(): conntrack events and path changes are handled as they
arrive (a path change is applied within one loop turn, well under the 100 ms the
operators' failover cases need), and the keep-alive tick runs every
``keepalive_period_s``. The loop owns no policy: that is the engine's.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyflow.control import keepalive
from pyflow.control.conntrack import CtNetlink
from pyflow.control.engine import Engine, EngineConfig, ManagedDevice, Offloaded
from pyflow.control.model import EventType, Tuple
from pyflow.control.paths import PathWatcher, RtPaths
from pyflow.control.stats import (
    FAMILY_NAMES,
    ConntrackStats,
    Direction,
    EngineCounters,
    FlowMapStats,
    FlowRecord,
    LatencyHistogram,
    LoopStats,
    Traffic,
)
from pyflow.datapath.abi import MAP_FLOWS
from pyflow.datapath.flowtable import Counters, FlowTable
from pyflow.datapath.loader import Datapath
from pyflow.errors import DatapathError
from pyflow.hw.offload import FlowerOffload

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often stop() reports a hand-back that is still going on.
STOP_REPORT_INTERVAL_S = 10.0


class LoopStopped(Exception):
    """A call into the control loop could not run: the loop is not running."""


class StillRunning(TimeoutError):
    """A call started inside the loop but did not finish in time: it runs to its end (its
    caller was told so), unlike a plain TimeoutError, whose call never runs."""


_QUEUED, _STARTED, _CANCELLED, _ABANDONED = "queued", "started", "cancelled", "abandoned"


class _Call:
    """One call into the loop. ``state`` changes under the control plane's call lock, so a
    caller that gives up and the loop that picks the call up agree on whether it runs."""

    __slots__ = ("fn", "state", "value", "error", "done")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.state = _QUEUED
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class BackgroundRead:
    """The keep-alive's read of the flow map in a thread of its own. The read is one C call
    that releases the GIL (cffi does around every call), so the loop goes on taking
    conntrack events while the kernel copies the table out (about two thirds of a walk:
    55 ms of 85 at 100k connections). The thread reads through a FlowTable of its own (its
    own result buffers) on the same map, indexes what it read (keepalive.index_of, also
    without the GIL) and says it is done through a pipe the loop selects on. The scan,
    which updates the engine's slots, runs in the loop, in parts between which it takes
    events (keepalive.begin_walk, Engine.scan)."""

    def __init__(self, fd: int):
        self.table = FlowTable(fd)
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread: threading.Thread | None = None
        self.counters: Counters | None = None
        self.index: Any = None  # keepalive.index_of(counters)
        self.cpu_s = 0.0
        self.total_cpu_s = 0.0  # every read's CPU seconds, for who measures the control plane
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def start(self) -> None:
        self.counters, self.index, self.error = None, None, None
        self.thread = threading.Thread(target=self._run, name="pyflow-map-read", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cpu = time.thread_time()
        try:
            self.counters = self.table.read_counters()
            self.index = keepalive.index_of(self.counters)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
            self.error = exc
        self.cpu_s = time.thread_time() - cpu
        self.total_cpu_s += self.cpu_s
        os.write(self.w, b"r")

    def finish(self) -> tuple[Counters, Any, float]:
        """The read's counters, their index and CPU seconds (raises what the read raised)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.r, 64)
        assert self.thread is not None
        self.thread.join()
        self.thread = None
        if self.error is not None:
            raise self.error
        assert self.counters is not None
        counters, index, self.counters, self.index = self.counters, self.index, None, None
        return counters, index, self.cpu_s

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(30)
            self.thread = None
        self.table.close()  # not the owner of the fd: only forgotten
        os.close(self.r)
        os.close(self.w)


DRAIN_BATCH = 100
"""Conntrack timeouts the loop writes between two looks for events (about 1.5 ms of
netlink): a walk that found ten thousand running low delays no event by more than that."""

GC_FULL_EVERY_S = 600.0
"""How often the loop lets Python's collector look at every object once (see _GcPacer)."""


class _GcPacer:
    """Python's full collections walk every object the process holds: with 100k offloaded
    connections (half a million objects) one takes 150-250 ms, several times a minute
    while connections come and go, and every event that arrives meanwhile waits. At every
    tick the survivors are frozen (gc.freeze: a list splice, no walk), so that the
    collections the interpreter starts itself only look at what the last second made;
    once every GC_FULL_EVERY_S the loop unfreezes and collects everything, so that a
    reference cycle among old objects is reclaimed at most that late."""

    def __init__(self) -> None:
        self.next_full = time.monotonic() + GC_FULL_EVERY_S

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_full:
            gc.unfreeze()
            gc.collect()
            self.next_full = now + GC_FULL_EVERY_S
        gc.freeze()


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


class CountedFlowTable(FlowTable):
    """The flow table, remembering how many entries its last full counter read found: the
    keep-alive tick reads every entry anyway, so a stats snapshot takes the count from
    there instead of walking the whole map again (0.26 s at 100k connections)."""

    entries_seen = 0
    _memory = 0

    def memory(self) -> int:
        """The map's kernel memory (FlowTable.memory_bytes), read once: all of max_entries is
        preallocated, so it does not change with the entries. Any thread may ask."""
        if not self._memory:
            self._memory = self.memory_bytes()
        return self._memory

    def flow_map(self) -> dict[str, int]:
        """What status shows of the map: capacity, its kernel memory, and the entries the
        last keep-alive tick counted. Plain reads: any thread may ask."""
        return {"entries": self.entries_seen, "capacity": self.max_entries, "memory_bytes": self.memory()}

    def read_counters(self) -> Counters:
        counters = super().read_counters()
        self.entries_seen = len(counters)
        return counters


class LoaderDevices:
    """The engine's device registry, read from the loader: every attached device with its
    tx-port slot and MAC. Refreshed on link changes (a MAC can change)."""

    def __init__(self, datapath: Datapath, paths: RtPaths):
        self.dp = datapath
        self.paths = paths
        self._by_index: dict[int, ManagedDevice] = {}
        # devices on their way out (being removed): no connection may resolve through them,
        # so that their flows go back to the kernel path before the hook goes away
        self.leaving: set[int] = set()
        self.hw_devices: list[int] = []  # attached in hw mode: flows there are offered to flower rules
        self.on_refresh: Callable[[], None] | None = None  # the control plane follows hw devices
        self.refresh()

    def refresh(self) -> None:
        devices = {}
        statuses = self.dp.status()
        self.hw_devices = [st.ifindex for st in statuses
                           if st.hw and st.slot is not None and st.ifindex not in self.leaving]
        for st in statuses:
            if st.slot is None or st.ifindex in self.leaving:
                continue
            try:
                mac = self.paths.mac_of(st.ifindex)
            except Exception:  # noqa: BLE001 - a device vanishing mid-refresh is simply not managed
                continue
            devices[st.ifindex] = ManagedDevice(st.ifindex, st.slot, mac)
        self._by_index = devices
        if self.on_refresh is not None:
            self.on_refresh()

    def get(self, ifindex: int) -> ManagedDevice | None:
        return self._by_index.get(ifindex)


class ControlPlane:
    """Runs the loop in a thread of its own, in the network namespace of the thread that
    calls start(). The netlink adapters are made inside that thread: pyroute2's
    synchronous sockets must be used from the thread that created them.

    What others may use: start(), stop(), call(), running, error, last_turn, kept (with
    snapshot_source set before start()), and, inside
    the loop through call(), reconfigure(), snapshot(), offloaded(), flush() and the
    device calls. The engine, the tables and the adapters stay the loop's own."""

    def __init__(self, datapath: Datapath, config: ControlConfig | None = None):
        self.config = config or ControlConfig()
        self.dp = datapath
        self.engine: Engine
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._hand_back = True
        self._devices_stale = False  # a device refresh could not run: retried at each tick
        # calls from other threads (control socket, metrics) run inside the loop, which
        # owns the engine; a pipe wakes the loop's select() when one is queued
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._call_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ct_events = {t.value: 0 for t in EventType}
        self.latency = LatencyHistogram()
        self.last_turn = time.monotonic()  # when the loop last went round (a watchdog reads it)
        # Set before start() to have the loop keep a snapshot: it runs inside the loop at its
        # start and after every keep-alive tick, and ``kept`` holds (monotonic time, value)
        # of the last one, so readers (/metrics) never enter the loop nor wait for it.
        self.snapshot_source: Callable[[], Any] | None = None
        self.reader: BackgroundRead | None = None  # the keep-alive's map reads (their CPU: total_cpu_s)
        self.kept: tuple[float, Any] | None = None
        self._snapshot_failing = False

    def _setup(self) -> None:
        ensure_conntrack_events()
        self.flows = CountedFlowTable(self.dp.map_fd(MAP_FLOWS))
        self.ct = CtNetlink(rcvbuf=self.config.conntrack_rcvbuf, offload_mark=self.config.offload_mark)
        self.paths = RtPaths()
        self.watcher = PathWatcher()
        self.devices = LoaderDevices(self.dp, self.paths)
        self.hw: FlowerOffload | None = None
        self.engine = Engine(self.ct, self.paths, self.flows, self.devices, self.config.engine)
        self._hw_devices()
        self.devices.on_refresh = self._hw_devices

    def _hw_devices(self) -> None:
        """Follow the devices attached in hw mode with the flower adapter, made when the first
        one appears: new ones registered, gone ones dropped, the rest re-read (a link change
        can change a name or an MTU)."""
        wanted = self.devices.hw_devices
        if self.hw is None:
            if not wanted:
                return
            self.hw = FlowerOffload(skip_hw=self.dp.hw_skip_hw)
            self.engine.hw = self.hw
        for ifindex in self.hw.device_ifindexes() - set(wanted):
            self.hw.remove_device(ifindex)
        for ifindex in wanted:
            self.hw.add_device(ifindex)

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
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._close()

    def _loop(self) -> None:
        reader = self.reader = BackgroundRead(self.flows.fd)
        try:
            self._turns(reader)
        finally:
            reader.close()
        if self._hand_back:
            self.engine.flush()
        self._run_calls()  # answer what came in meanwhile (LoopStopped from now on)

    def _tick(self, reader: BackgroundRead) -> None:
        """The keep-alive tick; a walk of a large table reads the map in ``reader``'s thread
        and is scanned when that read is done (_turns), the rest of the tick runs now."""
        if reader.busy or self.engine.pacer.walk is not None:
            self.engine.tick(walk=False)
        elif keepalive.wants_background_read(self.engine):
            keepalive.begin_read(self.engine)
            reader.start()
            self.engine.tick(walk=False)
        else:
            self.engine.tick()

    def _turns(self, reader: BackgroundRead) -> None:
        self.engine.pacer.defer_writes = True  # written between the turns (DRAIN_BATCH)
        gc_full = _GcPacer()
        next_tick = time.monotonic() + self.config.keepalive_period_s
        sources = [self.ct.fileno(), self.watcher.fileno(), self._wake_r, reader.r]
        if self.snapshot_source is not None:
            self.flows.read_counters()  # the entry count until the first tick reads it
        self.keep_snapshot()
        while not self._stop.is_set():
            self.last_turn = now = time.monotonic()
            # timeouts queued to write or a scan under way: only look for events, then go on
            pacer = self.engine.pacer
            # events read while changes were sent wait in the adapter, not on its socket
            backlog = getattr(self.ct, "backlog", 0)
            wait = 0.0 if pacer.queue or pacer.walk or backlog else max(0.0, min(next_tick - now, 0.2))
            ready, _, _ = select.select(sources, [], [], wait)
            if backlog or self.ct.fileno() in ready:
                self._conntrack_events()
            if self.watcher.fileno() in ready:
                self._paths_changed()
            if self._wake_r in ready:
                self._run_calls()
            if reader.r in ready:
                counters, index, cpu_s = reader.finish()
                self.flows.entries_seen = len(counters)
                keepalive.begin_walk(self.engine, counters, index, cpu_s)
            if pacer.walk is not None:
                self.engine.scan(keepalive.SCAN_SLICE)
            if self.engine.pacer.queue:
                keepalive.drain(self.engine, DRAIN_BATCH)
            if time.monotonic() >= next_tick:
                if self._devices_stale:
                    self._refresh_devices_or_later()
                self._tick(reader)
                self.keep_snapshot()
                gc_full.tick()
                period = self.config.keepalive_period_s  # read each time: a reload may change it
                next_tick += period
                if next_tick < time.monotonic():  # fell behind: do not burst to catch up
                    next_tick = time.monotonic() + period

    def _conntrack_events(self) -> None:
        """One poll's events into the engine; the time from reading them to their entries
        being written is each newly offloaded connection's offload latency."""
        received = time.monotonic()
        events = self.ct.poll(0)
        counts = self.ct_events
        for ev in events:
            if ev is not None:
                counts[ev.type.value] += 1
        before = self.engine.stats.offloaded
        self.engine.handle(events)
        new = self.engine.stats.offloaded - before
        if new > 0:
            self.latency.observe(time.monotonic() - received, new)

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            with self._call_lock:
                if call.state == _CANCELLED:
                    continue  # its caller was answered "not run": running it now would surprise
                call.state = _STARTED
            try:
                call.value = call.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                call.error = exc
            call.done.set()
            with self._call_lock:
                late = call.state == _ABANDONED
            if late:
                log.warning("a request answered as still running has now finished%s",
                            f" with an error: {call.error}" if call.error is not None else "")

    def keep_snapshot(self) -> None:
        """Inside the loop: take ``snapshot_source``'s value and keep it with its time. A
        failure is logged (once until it works again) and leaves the previous one: it
        must not end the loop."""
        source = self.snapshot_source
        if source is None:
            return
        try:
            self.kept = (time.monotonic(), source())
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop forwarding decisions
            if not self._snapshot_failing:
                log.warning("stats snapshot failed (the last one is kept): %s", exc)
            self._snapshot_failing = True
        else:
            self._snapshot_failing = False

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run fn inside the loop thread (where the engine lives) and return its result or
        raise its exception. Raises LoopStopped when the loop is not running; when fn did
        not finish within ``timeout`` seconds, TimeoutError if the loop had not started it
        (it is cancelled: it never runs) or StillRunning if it had (it runs to its end)."""
        if self._thread is None or not self._thread.is_alive() or self._stop.is_set():
            raise LoopStopped("the control loop is not running")
        call = _Call(fn)
        self._calls.put(call)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        while not call.done.wait(0.1):
            timeout -= 0.1
            stopped = not self._thread.is_alive()
            if not stopped and timeout > 0:
                continue
            state = self._give_up(call)
            if stopped and state != _STARTED:
                raise LoopStopped("the control loop stopped")
            if state == _CANCELLED:
                raise TimeoutError("the control loop did not answer in time; the request was not run")
            if state == _ABANDONED:
                raise StillRunning("the control loop did not finish in time; the request is still "
                                   "running and will complete")
            break  # it finished just now
        if call.error is not None:
            raise call.error
        return call.value

    def _give_up(self, call: _Call) -> str:
        """The caller stops waiting for ``call``: _CANCELLED if it had not started (it will
        never run), _ABANDONED if it is running (it will complete), _STARTED if it is done."""
        with self._call_lock:
            if call.state == _QUEUED:
                call.state = _CANCELLED
            elif not call.done.is_set():
                call.state = _ABANDONED
            return call.state

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What ended the loop thread, if it ended by an exception."""
        return self._error

    # ---- what the daemon asks of the loop (each call runs inside it, through call()) ----

    def reconfigure(self, config: ControlConfig) -> None:
        """Apply re-read settings: the engine's at its next decision, the keep-alive period
        at the next tick. The conntrack socket's settings (buffer, offload mark) were used
        at set-up and stay as they were."""
        self.config = config
        self.engine.config = config.engine

    def snapshot(self, *, fresh: bool = False) -> LoopStats:
        """Every counter of the loop, the engine and the datapath's verdicts, as one copy.
        The flow map's entry count is the last keep-alive tick's unless ``fresh`` (a walk of
        the whole map: for a request someone typed, not for a scraper's loop)."""
        engine, es = self.engine, self.engine.stats
        offloaded = {name: {"software": 0, "hardware": 0} for name in FAMILY_NAMES.values()}
        for off in engine.offloaded.values():
            family = FAMILY_NAMES.get(off.conn.family)
            if family is not None:
                offloaded[family]["hardware" if off.hw else "software"] += 1
        reasons = self.dp.reason_counts()
        fast = reasons.pop("forwarded", (0, 0))
        return LoopStats(
            offloaded=offloaded,
            flow_map=FlowMapStats.of(len(self.flows.read_counters()) if fresh else self.flows.entries_seen,
                                     self.flows.max_entries, self.flows.memory()),
            fast_path=Traffic(*fast),
            slow_path={name: Traffic(p, b) for name, (p, b) in reasons.items()},
            conntrack=ConntrackStats(events=dict(self.ct_events), lost_events=self.ct.lost_events,
                                     discarded_events=self.ct.discarded_events, resyncs=es.resyncs,
                                     refreshes=es.refreshes,
                                     malformed_messages=getattr(self.ct, "malformed_messages", 0),
                                     rcvbuf_grown=getattr(self.ct, "rcvbuf_grown", 0)),
            engine=EngineCounters(offloads=es.offloaded, removed=dict(es.removed), refused=dict(es.refused),
                                  pending=len(engine.pending), install_errors=es.install_errors,
                                  rewritten=es.rewritten, hw_offloads=es.hw_offloaded,
                                  hw_failures=es.hw_failures, returning=len(engine.returning),
                                  reoffloaded=es.reoffloaded,
                                  returns_abandoned={"expired": engine.returning.expired,
                                                     "overflow": engine.returning.overflow},
                                  fdb_keepalive=dict(engine.fdb.counts),
                                  fdb_keepalive_rounds=engine.fdb.rounds),
            latency=self.latency.snapshot(),
        )

    def offloaded(self) -> list[FlowRecord]:
        """Every connection on the fast path with its counters (one dump of the flow map)."""
        counters = self.flows.read_counters().as_dict()
        eng = self.engine
        now = eng.clock()
        return [_record(off, counters, now, eng.last_seen_ns(off)) for off in eng.offloaded.values()]

    @property
    def offloaded_count(self) -> int:
        """How many connections are on the fast path (a plain read: any thread may ask)."""
        return len(self.engine.offloaded)

    def flush(self) -> int:
        """Hand every connection back to the kernel path; returns how many there were."""
        n = len(self.engine.offloaded)
        self.engine.flush()
        return n

    def devices_changed(self) -> None:
        """A device was attached: connections through it that already exist become
        eligible, so re-read the registry and reconcile with a full conntrack dump."""
        self.devices.refresh()
        self.engine.resync()

    def release_device(self, ifindex: int) -> int:
        """Take every connection through ``ifindex`` off the fast path before the device is
        detached (so no packet meets a half-removed device); returns how many."""
        before = len(self.engine.offloaded)
        self.devices.leaving.add(ifindex)
        try:
            self.devices.refresh()
            self.engine.paths_changed()  # connections through it no longer resolve: handed back
            return before - len(self.engine.offloaded)
        finally:
            self.devices.leaving.discard(ifindex)

    def refresh_devices(self) -> None:
        """Re-read the device registry after a device went away."""
        self.devices.refresh()

    def _paths_changed(self) -> None:
        changes = self.watcher.poll(0)
        if not changes:
            return
        if any(change[0] == "link" for change in changes):
            self._refresh_devices_or_later()
        self.engine.paths_changed()

    def _refresh_devices_or_later(self) -> None:
        """Re-read the device registry; if the datapath's state is locked by another process
        for longer than its bounded wait, keep the registry as it is and try again at the
        next keep-alive tick rather than let the loop die (the lock's holder can only be root:
        the state dir is root's alone)."""
        try:
            self.devices.refresh()
            self._devices_stale = False
        except DatapathError as exc:
            if not self._devices_stale:
                log.warning("device registry not refreshed, retrying at the next tick: %s", exc)
            self._devices_stale = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pyflow-control", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self, *, hand_back: bool = True) -> None:
        """Stop the loop; with hand_back every flow leaves the fast path first.

        Waits for the loop thread however long the hand-back takes (100,000 connections
        take more than 10 s): returning earlier would let the caller close the maps under
        a thread still deleting from them. A loop that never ends is the service
        manager's to kill (TimeoutStopSec), which leaves the datapath pinned for the next
        start to adopt, as after any crash."""
        self._hand_back = hand_back
        self._stop.set()
        if self._thread is None:
            return
        started = time.monotonic()
        while True:
            self._thread.join(timeout=STOP_REPORT_INTERVAL_S)
            if not self._thread.is_alive():
                return
            log.warning("still stopping after %.0f s: %d connections left to hand back",
                        time.monotonic() - started, len(self.engine.offloaded))

    def _close(self) -> None:
        self._stop.set()  # calls queued from now on are refused, not left waiting
        self._run_calls()
        # flower rules go even without hand-back: a later process could not adopt them (it
        # re-offloads from its conntrack dump), and nothing would keep them alive meanwhile
        for name in ("hw", "ct", "watcher", "paths", "flows"):
            part = getattr(self, name, None)
            close = getattr(part, "close", None)
            if close is not None:
                close()


def _record(off: Offloaded, counters: dict[bytes, tuple[int, ...]], now_ns: int,
            last_seen_ns: int) -> FlowRecord:
    """One offloaded connection as reported; ``counters``: the flow map's (packets, bytes,
    closing) by key; ``last_seen_ns``: Engine.last_seen_ns."""
    conn = off.conn
    in_o, in_r, eg_o, eg_r = off.path[:4]
    co: tuple[int, ...] | None = counters.get(off.key_bytes[0])
    cr: tuple[int, ...] | None = counters.get(off.key_bytes[1])
    if off.hw_counters:  # a hardware flow counts in its rules, not in the map
        (po, bo), (pr, br) = off.hw_counters
        co, cr = (po, bo, 0), (pr, br, 0)
    last = max(last_seen_ns, off.since_ns)

    def direction(t: Tuple, ingress: Any, egress: Any, c: tuple[int, ...] | None) -> Direction:
        return Direction(t, ingress.ifindex, egress.ifindex, Traffic(c[0], c[1]) if c else None)

    return FlowRecord(family=conn.family, proto=conn.proto, hardware=off.hw,
                      original=direction(conn.orig, in_o, eg_o, co),
                      reply=direction(conn.reply, in_r, eg_r, cr),
                      mark=conn.mark, zone=conn.zone, age_ns=max(0, now_ns - off.since_ns),
                      idle_ns=max(0, now_ns - last))
