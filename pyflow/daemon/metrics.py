"""Prometheus metrics: every value from the stats snapshot the control loop keeps.

Each metric is declared once, in ``METRICS``: its name, type, help and where its value
comes from in the stats snapshot (:class:`pyflow.daemon.stats.Stats`, taken inside the
control loop at every keep-alive tick; ``pyflowctl stats`` answers from the same type).
A scrape reads the last kept snapshot and never enters the loop: looped scrapes cannot
delay conntrack events, and a scrape is at most one keep-alive period stale. Names carry the prefix
``pyflow_`` and base units; counters get ``_total`` from the client; no per-flow labels.
The registry is a parameter so tests and embedders can use their own. The list of
metrics is in the README ("Running pyflowd").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyflow import __version__
from pyflow.control.stats import Latency
from pyflow.daemon.config import parse_address
from pyflow.daemon.stats import Stats
from pyflow.errors import PyflowError

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_FAMILY = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily}

# A metric's value: one number, samples by label values, or a histogram's state
Value = float | Mapping[tuple[str, ...], float] | Latency


@dataclass(frozen=True)
class MetricDef:
    name: str  # without _total: the client adds it to counters
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    help: str
    value: Callable[[Stats], Value]
    labels: tuple[str, ...] = ()


def _by(values: Mapping[str, int]) -> dict[tuple[str, ...], float]:
    """Samples labelled by the keys of ``values`` (one label)."""
    return {(key,): n for key, n in values.items()}


def _by_family_placement(s: Stats) -> dict[tuple[str, ...], float]:
    return {(family, place): n for family, by_place in s.offloaded.items() for place, n in by_place.items()}


UP = MetricDef("pyflow_up", GAUGE,
               "1 when the control loop's last snapshot is fresh (the loop keeps ticking), else 0",
               lambda s: 1)

# How much older than one keep-alive period the kept snapshot may be before a scrape says
# the loop is down (pyflow_up 0): the loop has stopped ticking.
STALE_AFTER_S = 10.0

METRICS: tuple[MetricDef, ...] = (
    MetricDef("pyflow_build_info", GAUGE, "pyflow version",
              lambda s: {(__version__,): 1}, ("version",)),
    MetricDef("pyflow_offloaded_flows", GAUGE,
              "Connections on the fast path (each holds two flow-map entries)",
              _by_family_placement, ("family", "placement")),
    MetricDef("pyflow_flow_map_entries", GAUGE, "Entries in the flow map",
              lambda s: s.flow_map.entries),
    MetricDef("pyflow_flow_map_capacity", GAUGE, "Size of the flow map in entries",
              lambda s: s.flow_map.capacity),
    MetricDef("pyflow_flow_map_pressure_ratio", GAUGE, "Flow map fill level, entries / capacity (0..1)",
              lambda s: s.flow_map.pressure),
    MetricDef("pyflow_fastpath_packets", COUNTER, "Packets forwarded by the fast path",
              lambda s: s.fast_path.packets),
    MetricDef("pyflow_fastpath_bytes", COUNTER, "Bytes forwarded by the fast path",
              lambda s: s.fast_path.bytes),
    MetricDef("pyflow_conntrack_event_overruns", COUNTER,
              "Conntrack event socket overruns (ENOBUFS): events were lost",
              lambda s: s.conntrack.lost_events),
    MetricDef("pyflow_conntrack_discarded_events", COUNTER,
              "Queued conntrack events dropped after an overrun (older than the resync)",
              lambda s: s.conntrack.discarded_events),
    MetricDef("pyflow_resyncs", COUNTER, "Full conntrack dumps reconciled with the fast path",
              lambda s: s.conntrack.resyncs),
    MetricDef("pyflow_conntrack_refreshes", COUNTER,
              "Conntrack timeouts refreshed for connections the fast path carries",
              lambda s: s.conntrack.refreshes),
    MetricDef("pyflow_offloads", COUNTER, "Connections put on the fast path",
              lambda s: s.engine.offloads),
    MetricDef("pyflow_hw_offloads", COUNTER, "Connections placed in hardware",
              lambda s: s.engine.hw_offloads),
    MetricDef("pyflow_hw_offload_failures", COUNTER,
              "Hardware placements that failed (software fast path used)",
              lambda s: s.engine.hw_failures),
    MetricDef("pyflow_install_errors", COUNTER, "Flow-map writes that failed",
              lambda s: s.engine.install_errors),
    MetricDef("pyflow_slowpath_packets", COUNTER, "Packets the fast path handed to the kernel, by reason",
              lambda s: {(r,): t.packets for r, t in s.slow_path.items()}, ("reason",)),
    MetricDef("pyflow_slowpath_bytes", COUNTER, "Bytes the fast path handed to the kernel, by reason",
              lambda s: {(r,): t.bytes for r, t in s.slow_path.items()}, ("reason",)),
    MetricDef("pyflow_conntrack_events", COUNTER, "Conntrack events received, by type",
              lambda s: _by(s.conntrack.events), ("type",)),
    MetricDef("pyflow_offload_removals", COUNTER, "Connections taken off the fast path, by cause",
              lambda s: _by(s.engine.removed), ("cause",)),
    MetricDef("pyflow_offload_refusals", COUNTER, "Conntrack reports of connections not offloaded, by reason",
              lambda s: _by(s.engine.refused), ("reason",)),
    MetricDef("pyflow_pending_flows", GAUGE, "Connections waiting for a neighbour to resolve",
              lambda s: s.engine.pending),
    MetricDef("pyflow_offload_latency_seconds", HISTOGRAM,
              "Time from reading a conntrack event to its flow entries being written",
              lambda s: s.latency),
    MetricDef("pyflow_managed_devices", GAUGE, "Devices running the datapath, by attach mode",
              lambda s: _by(s.devices.by_mode), ("mode",)),
    MetricDef("pyflow_failed_devices", GAUGE, "Wanted devices that could not be attached",
              lambda s: s.devices.failed),
)


def family(metric: MetricDef, stats: Stats) -> Metric:
    """``metric``'s family with its samples from ``stats`` (labelled samples sorted)."""
    value = metric.value(stats)
    if isinstance(value, Latency):
        hist = HistogramMetricFamily(metric.name, metric.help)
        hist.add_metric([], [(_le(b), n) for b, n in value.buckets], value.sum)
        return hist
    fam = _FAMILY[metric.kind](metric.name, metric.help, labels=list(metric.labels))
    if isinstance(value, Mapping):
        for labels, n in sorted(value.items()):
            fam.add_metric(list(labels), n)
    else:
        fam.add_metric([], value)
    return fam


class PyflowCollector(Collector):
    def __init__(self, snapshot: Callable[[], Stats]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must say "down", not fail
            log.warning("metrics: no snapshot from the control loop: %s", exc)
            up = GaugeMetricFamily(UP.name, UP.help)
            up.add_metric([], 0)
            yield up
            return
        for metric in (UP, *METRICS):
            yield family(metric, stats)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def declared() -> dict[str, str]:
    """Every metric family the collector exposes -> its type (counter, gauge, histogram)
    (dashboards and tests check themselves against it)."""
    return {m.name: m.kind for m in (UP, *METRICS)}


def kept_snapshot(kept: Callable[[], tuple[float, Stats] | None],
                  period_s: Callable[[], float]) -> Callable[[], Stats]:
    """The collector's snapshot: the last one the loop kept, ``kept()`` -> (monotonic time,
    stats) or None, read without entering the loop. Raises (so the scrape says
    pyflow_up 0) when there is none or it is older than a keep-alive period plus
    STALE_AFTER_S."""

    def snapshot() -> Stats:
        got = kept()
        if got is None:
            raise LookupError("the control loop has kept no snapshot yet")
        at, stats = got
        age = time.monotonic() - at
        if age > period_s() + STALE_AFTER_S:
            raise TimeoutError(f"the control loop's last snapshot is {age:.0f} s old")
        return stats

    return snapshot


def registry_for(snapshot: Callable[[], Stats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PyflowCollector(snapshot))
    return registry


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus-client's server) at HOST:PORT."""

    def __init__(self, address: str, registry: CollectorRegistry):
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        try:
            self.server, self.thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise PyflowError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
