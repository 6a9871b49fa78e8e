"""Prometheus metrics: every value read from the datapath and the engine at scrape time.

One custom collector turns a stats snapshot (:meth:`pyflow.daemon.manager.Manager.stats`, taken
inside the control loop) into metric families: prefix ``pyflow_``, base units, ``_total``
on counters, no per-flow labels. The registry is a parameter so tests and embedders can
use their own. The list of metrics is in the README ("Running pyflowd").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyflow import __version__
from pyflow.daemon.config import parse_address
from pyflow.errors import PyflowError

log = logging.getLogger(__name__)

# (stats, latency histogram snapshot: ([(upper bound, cumulative count)], sum, count))
Snapshot = tuple[dict[str, Any], tuple[list[tuple[float, int]], float, int]]


# Plain counters: (name without _total, help, stats section, key in it)
_COUNTERS = (
    ("pyflow_fastpath_packets", "Packets forwarded by the fast path", "fast_path", "packets"),
    ("pyflow_fastpath_bytes", "Bytes forwarded by the fast path", "fast_path", "bytes"),
    ("pyflow_conntrack_event_overruns", "Conntrack event socket overruns (ENOBUFS): events were lost",
     "conntrack", "lost_events"),
    ("pyflow_conntrack_discarded_events",
     "Queued conntrack events dropped after an overrun (older than the resync)",
     "conntrack", "discarded_events"),
    ("pyflow_resyncs", "Full conntrack dumps reconciled with the fast path", "conntrack", "resyncs"),
    ("pyflow_conntrack_refreshes", "Conntrack timeouts refreshed for connections the fast path carries",
     "conntrack", "refreshes"),
    ("pyflow_offloads", "Connections put on the fast path", "engine", "offloads"),
    ("pyflow_hw_offloads", "Connections placed in hardware", "engine", "hw_offloads"),
    ("pyflow_hw_offload_failures", "Hardware placements that failed (software fast path used)", "engine",
     "hw_failures"),
    ("pyflow_install_errors", "Flow-map writes that failed", "engine", "install_errors"),
)


class PyflowCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pyflow_up", "1 when the control loop answered this scrape, else 0")
        try:
            stats, (buckets, lat_sum, _lat_count) = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must say "down", not fail
            log.warning("metrics: no snapshot from the control loop: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        info = GaugeMetricFamily("pyflow_build_info", "pyflow version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        flows = GaugeMetricFamily("pyflow_offloaded_flows",
                                  "Connections on the fast path (each holds two flow-map entries)",
                                  labels=["family", "placement"])
        for family, by_place in sorted(stats["offloaded"].items()):
            for place, n in sorted(by_place.items()):
                flows.add_metric([family, place], n)
        yield flows

        fm = stats["flow_map"]
        yield GaugeMetricFamily("pyflow_flow_map_entries", "Entries in the flow map", value=fm["entries"])
        yield GaugeMetricFamily("pyflow_flow_map_capacity", "Size of the flow map in entries",
                                value=fm["capacity"])
        yield GaugeMetricFamily("pyflow_flow_map_pressure_ratio",
                                "Flow map fill level, entries / capacity (0..1)", value=fm["pressure"])

        for name, text, section, key in _COUNTERS:
            yield CounterMetricFamily(name, text, value=stats[section][key])
        sp_p = CounterMetricFamily("pyflow_slowpath_packets",
                                   "Packets the fast path handed to the kernel, by reason", labels=["reason"])
        sp_b = CounterMetricFamily("pyflow_slowpath_bytes",
                                   "Bytes the fast path handed to the kernel, by reason", labels=["reason"])
        for reason, c in sorted(stats["slow_path"].items()):
            sp_p.add_metric([reason], c["packets"])
            sp_b.add_metric([reason], c["bytes"])
        yield sp_p
        yield sp_b

        ct = stats["conntrack"]
        yield _by_label(CounterMetricFamily, "pyflow_conntrack_events", "Conntrack events received, by type",
                        "type", ct["events"])

        eng = stats["engine"]
        yield _by_label(CounterMetricFamily, "pyflow_offload_removals",
                        "Connections taken off the fast path, by cause", "cause", eng["removed"])
        yield _by_label(CounterMetricFamily, "pyflow_offload_refusals",
                        "Conntrack reports of connections not offloaded, by reason", "reason", eng["refused"])
        yield GaugeMetricFamily("pyflow_pending_flows", "Connections waiting for a neighbour to resolve",
                                value=eng["pending"])

        hist = HistogramMetricFamily("pyflow_offload_latency_seconds",
                                     "Time from reading a conntrack event to its flow entries being written")
        hist.add_metric([], [(_le(b), n) for b, n in buckets], lat_sum)
        yield hist

        yield _by_label(GaugeMetricFamily, "pyflow_managed_devices",
                        "Devices running the datapath, by attach mode", "mode", stats["devices"]["by_mode"])
        yield GaugeMetricFamily("pyflow_failed_devices", "Wanted devices that could not be attached",
                                value=stats["devices"]["failed"])


def _by_label(kind: Any, name: str, text: str, label: str, values: dict[str, int]) -> Metric:
    """A family with one sample per key of ``values``, the key as the label's value."""
    family = kind(name, text, labels=[label])
    for key, n in sorted(values.items()):
        family.add_metric([key], n)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def declared() -> dict[str, str]:
    """Every metric family the collector exposes -> its type (counter, gauge, histogram), as
    collected from an all-zero snapshot (dashboards and tests check themselves against it)."""
    zero = {"packets": 0, "bytes": 0}
    stats = {
        "offloaded": {}, "flow_map": {"entries": 0, "capacity": 0, "pressure": 0.0}, "fast_path": zero,
        "slow_path": {}, "conntrack": {"events": {}, "lost_events": 0, "discarded_events": 0, "resyncs": 0,
                                       "refreshes": 0},
        "engine": {"offloads": 0, "removed": {}, "refused": {}, "pending": 0, "install_errors": 0,
                   "hw_offloads": 0, "hw_failures": 0},
        "devices": {"by_mode": {}, "failed": 0},
    }
    collector = PyflowCollector(lambda: (stats, ([(float("inf"), 0)], 0.0, 0)))
    return {m.name: m.type for m in collector.collect()}


def registry_for(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
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
