"""What the control loop reports, as typed values: its counters (:class:`LoopStats`) and
the connections it has on the fast path (:class:`FlowRecord`).

Both are built inside the loop thread (:meth:`ControlPlane.snapshot`,
:meth:`ControlPlane.offloaded`) and are immutable copies afterwards, so the control
socket and the metrics server can read them from their own threads.
"""

from __future__ import annotations

import bisect
import socket
from dataclasses import dataclass, field

from pyflow.control.model import Tuple

# the names families go by in every report (JSON keys, metric labels)
FAMILY_NAMES: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}

# Buckets of the event-to-offload latency histogram, in seconds: one loop turn is
# sub-millisecond when idle, a batch of connections a few milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Latency:
    """A histogram's state: ``buckets`` are (upper bound, cumulative count), the last
    bound +Inf."""

    buckets: tuple[tuple[float, int], ...] = ((float("inf"), 0),)
    sum: float = 0.0
    count: int = 0


class LatencyHistogram:
    """Cumulative-bucket histogram written by the loop thread, read through snapshot()."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += times
        self.sum += seconds * times

    def snapshot(self) -> Latency:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return Latency(tuple(out), self.sum, total)


@dataclass(frozen=True)
class Traffic:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class FlowMapStats:
    entries: int = 0
    capacity: int = 0
    pressure: float = 0.0  # entries / capacity, rounded to 6 places (0 for no capacity)
    # kernel memory of the map: all of capacity is preallocated, whatever the entries
    memory_bytes: int = 0

    @classmethod
    def of(cls, entries: int, capacity: int, memory_bytes: int = 0) -> FlowMapStats:
        return cls(entries, capacity, round(entries / capacity, 6) if capacity else 0.0, memory_bytes)


@dataclass(frozen=True)
class ConntrackStats:
    events: dict[str, int] = field(default_factory=dict)  # by type: new, update, destroy
    lost_events: int = 0  # socket overruns (ENOBUFS)
    discarded_events: int = 0  # queued events dropped after an overrun
    resyncs: int = 0
    refreshes: int = 0
    malformed_messages: int = 0  # ctnetlink messages not decoded: a tuple missing or broken, truncated
    rcvbuf_grown: int = 0  # times an overrun doubled the event socket's buffer


@dataclass(frozen=True)
class EngineCounters:
    offloads: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # by cause
    refused: dict[str, int] = field(default_factory=dict)  # by reason
    pending: int = 0  # connections waiting for a neighbour, now
    install_errors: int = 0
    rewritten: int = 0
    hw_offloads: int = 0
    hw_failures: int = 0
    returning: int = 0  # connections a path change took off, waiting for a path, now
    reoffloaded: int = 0  # of those, offloaded again when their path came back
    returns_abandoned: dict[str, int] = field(default_factory=dict)  # waits ended: expired, overflow
    # bridge FDB entries of offloaded flows (bridge ports managed) the FDB keep-alive checked,
    # by outcome (fdbkeep.OUTCOMES: refreshed, fresh, moved, gone, not_learned, failed), and its rounds
    fdb_keepalive: dict[str, int] = field(default_factory=dict)
    fdb_keepalive_rounds: int = 0


@dataclass(frozen=True)
class LoopStats:
    """The control loop's counters at one moment (taken inside the loop)."""

    offloaded: dict[str, dict[str, int]] = field(default_factory=dict)  # family -> placement -> n
    flow_map: FlowMapStats = field(default_factory=FlowMapStats)
    fast_path: Traffic = field(default_factory=Traffic)
    slow_path: dict[str, Traffic] = field(default_factory=dict)  # by the datapath's verdict reason
    conntrack: ConntrackStats = field(default_factory=ConntrackStats)
    engine: EngineCounters = field(default_factory=EngineCounters)
    latency: Latency = field(default_factory=Latency)


@dataclass(frozen=True)
class Direction:
    """One direction of an offloaded connection: its tuple as conntrack shows it, the
    devices it enters and leaves by, and its fast-path counters (None: no flow-map entry,
    as for a hardware flow, whose counters are in its rules)."""

    tuple: Tuple
    in_ifindex: int
    out_ifindex: int
    counters: Traffic | None


@dataclass(frozen=True)
class FlowRecord:
    family: int  # socket.AF_INET / AF_INET6
    proto: int  # socket.IPPROTO_TCP / IPPROTO_UDP
    hardware: bool  # placed as flower rules
    original: Direction
    reply: Direction
    mark: int
    zone: int
    age_ns: int  # since it was put on the fast path
    idle_ns: int  # since a packet of it was last seen
