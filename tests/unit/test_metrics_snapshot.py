"""A scrape is served from the snapshot the control loop kept at its last keep-alive tick:
it never enters the loop (looped scrapes cannot delay conntrack events) and taking a
snapshot does not walk the whole flow map again (the tick's read already counted it)."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

from prometheus_client import generate_latest

from pyflow.cli.main import show_pairs
from pyflow.control.engine import Engine
from pyflow.control.fdbkeep import OUTCOMES, FdbKeeper
from pyflow.control.returning import Returning
from pyflow.control.runner import ControlPlane
from pyflow.control.stats import LatencyHistogram, LoopStats
from pyflow.daemon import metrics
from pyflow.daemon.metrics import kept_snapshot, registry_for
from pyflow.daemon.stats import Stats


class Flows:
    """The flow table as the snapshot sees it: a full read is counted (each one walks every
    entry: 0.26 s at 100k connections)."""

    max_entries = 1000
    entries_seen = 640  # what the last keep-alive tick's read found

    def __init__(self) -> None:
        self.reads = 0

    def read_counters(self) -> list:
        self.reads += 1
        return [None] * self.entries_seen

    def memory(self) -> int:
        return 224000  # read once, like the real table's (all of max_entries is preallocated)


def _plane() -> ControlPlane:
    cp = ControlPlane(datapath=SimpleNamespace(reason_counts=lambda: {"forwarded": (5, 500)}))  # type: ignore[arg-type]
    cp.flows = Flows()  # type: ignore[assignment]
    cp.ct = SimpleNamespace(lost_events=0, discarded_events=0)  # type: ignore[assignment]
    cp.engine = SimpleNamespace(  # type: ignore[assignment]
        offloaded={}, pending={}, returning=Returning(1, 1), fdb=FdbKeeper(), stats=SimpleNamespace(
            resyncs=1, refreshes=0, offloaded=0, removed={}, refused={}, install_errors=0, rewritten=0,
            hw_offloaded=0, hw_failures=0, reoffloaded=0))
    cp.latency = LatencyHistogram()
    return cp


def _scrape(snapshot) -> dict[str, float]:
    text = generate_latest(registry_for(snapshot)).decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")}


def test_a_snapshot_takes_the_entry_count_of_the_last_tick_without_reading_the_map():
    cp = _plane()
    snap = cp.snapshot()
    assert cp.flows.reads == 0  # type: ignore[attr-defined]
    assert snap.flow_map.entries == 640


def test_a_scrape_reads_the_kept_snapshot_and_never_enters_the_loop():
    cp = _plane()  # its loop does not even run: a scrape that called into it would fail
    taken = []

    def source() -> Stats:
        taken.append(1)
        return Stats.of(cp.snapshot(), Stats().devices)

    cp.snapshot_source = source
    cp.keep_snapshot()  # what the loop does at each keep-alive tick
    scrape = kept_snapshot(lambda: cp.kept, lambda: cp.config.keepalive_period_s)
    for _ in range(5):
        samples = _scrape(scrape)
        assert samples["pyflow_up"] == 1.0
        assert samples["pyflow_flow_map_entries"] == 640.0
        assert samples["pyflow_fastpath_packets_total"] == 5.0
    assert len(taken) == 1  # five scrapes, one snapshot: the one the tick took


def test_no_snapshot_or_a_stale_one_says_down(monkeypatch):
    kept: list = [None]
    scrape = kept_snapshot(lambda: kept[0], lambda: 1.0)
    assert _scrape(scrape) == {"pyflow_up": 0.0}
    kept[0] = (time.monotonic() - 3600, Stats.of(LoopStats(), Stats().devices))
    assert _scrape(scrape) == {"pyflow_up": 0.0}
    monkeypatch.setattr(metrics, "STALE_AFTER_S", 7200.0)
    assert _scrape(scrape)["pyflow_up"] == 1.0


def test_a_failing_snapshot_keeps_the_previous_one_and_the_loop_going():
    cp = _plane()
    values = iter([Stats.of(LoopStats(), Stats().devices)])
    cp.snapshot_source = lambda: next(values)
    cp.keep_snapshot()
    first = cp.kept
    cp.keep_snapshot()  # StopIteration: logged, not raised
    assert cp.kept is first


class _Bridge:
    """BridgePorts as the FDB keep-alive uses it: entries in use, the bridge's ageing time,
    and each refresh's outcome as given (the kernel's side is tests/unit/test_fdbkeep.py's)."""

    def __init__(self, outcomes: dict[bytes, str]):
        self.used = {(5, mac, 0): 6 for mac in outcomes}
        self.outcomes = outcomes

    def ageing_s(self, _bridge: int) -> float:
        return 8.0

    def refresh(self, _bridge: int, mac: bytes, _vid: int, _port: int, _fresh_s: float) -> str:
        if self.outcomes[mac] == "error":
            raise OSError("rtnetlink socket gone")
        return self.outcomes[mac]


def test_fdb_keepalive_counts_reach_the_metrics_and_the_stats_answer():
    """The keeper's work by outcome, and its rounds, from the engine's FdbKeeper through the
    loop's snapshot to /metrics and to pyflowctl stats, with their values."""
    outcomes = {bytes([2, 0, 0, 0, 0, n]): o for n, o in enumerate(
        ("refreshed", "refreshed", "refreshed", "fresh", "moved", "gone", "not_learned", "error"))}
    bridge = _Bridge(outcomes)
    now = 10**12
    conns = {n: SimpleNamespace(hw=True, slot=-1, last_seen_ns=now, conn=SimpleNamespace(family=2), path=(
        None, None, SimpleNamespace(dmac=bytes(6)), SimpleNamespace(dmac=mac), None, None))
        for n, mac in enumerate(outcomes)}
    cp = _plane()
    eng = cp.engine
    eng.planner = SimpleNamespace(paths=SimpleNamespace(bridge_ports=bridge))  # type: ignore[attr-defined]
    eng.offloaded, eng.clock = conns, (lambda: now)  # type: ignore[attr-defined]
    eng.pacer, eng.slots = SimpleNamespace(interval_s=0.0), SimpleNamespace(activity=None)  # type: ignore[attr-defined]
    eng.last_seen_ns = functools.partial(Engine.last_seen_ns, eng)  # type: ignore[attr-defined]
    clock = [100.0]
    keeper = eng.fdb = FdbKeeper(monotonic=lambda: clock[0])  # type: ignore[attr-defined]
    keeper.tick(eng)  # type: ignore[arg-type]
    clock[0] += 2.5  # a quarter of the ageing time later: the second round
    keeper.tick(eng)  # type: ignore[arg-type]
    assert keeper.rounds == 2

    stats = Stats.of(cp.snapshot(), Stats().devices)
    # two rounds over the eight entries (this fake keeps moved and gone ones in use)
    want = {"refreshed": 6, "fresh": 2, "moved": 2, "gone": 2, "not_learned": 2, "failed": 2}
    assert stats.engine.fdb_keepalive == want and stats.engine.fdb_keepalive_rounds == 2
    samples = _scrape(lambda: stats)
    for outcome in OUTCOMES:
        assert samples[f'pyflow_fdb_keepalive_entries_total{{outcome="{outcome}"}}'] == want[outcome], outcome
    assert samples["pyflow_fdb_keepalive_rounds_total"] == 2
    js = stats.to_json()["engine"]
    assert (js["fdb_keepalive"], js["fdb_keepalive_rounds"]) == (want, 2)
    # pyflowctl stats prints them as NAME VALUE rows
    rows = {line.split()[0]: line.split()[1] for line in show_pairs(stats.to_json()).splitlines()[1:]}
    assert rows["engine.fdb_keepalive.refreshed"] == "6" and rows["engine.fdb_keepalive_rounds"] == "2"
