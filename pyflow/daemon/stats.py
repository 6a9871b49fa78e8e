"""pyflowd's stats snapshot: the one typed value that ``pyflowctl stats`` (its JSON) and
/metrics (pyflow.daemon.metrics) are both read from, so the two cannot disagree."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pyflow.control.stats import LoopStats
from pyflow.daemon.tracking import TrackingState


@dataclass(frozen=True)
class ShapedDevice:
    """One shaped part of a wanted device and how pyflow treats it."""

    device: str
    shaping: str    # egress (a rate-limiting qdisc) | ingress_redirect (to an IFB or other device)
    treatment: str  # tc_only: forwarded into it by TC redirects only | kernel_path: no hook, not offloaded


@dataclass(frozen=True)
class DeviceCounts:
    managed: int = 0  # attached
    failed: int = 0  # wanted but not attached
    by_mode: dict[str, int] = field(default_factory=dict)  # attached, by attach mode
    shaped: tuple[ShapedDevice, ...] = ()  # wanted devices with traffic shaping


@dataclass(frozen=True)
class Stats(LoopStats):
    """The control loop's counters with the daemon's device counts."""

    devices: DeviceCounts = field(default_factory=DeviceCounts)
    tracking: TrackingState = field(default_factory=TrackingState)  # conntrack's tracking here

    @classmethod
    def of(cls, loop: LoopStats, devices: DeviceCounts, tracking: TrackingState | None = None) -> Stats:
        return cls(**{f.name: getattr(loop, f.name) for f in fields(loop)}, devices=devices,
                   tracking=tracking if tracking is not None else TrackingState())

    def to_json(self) -> dict[str, Any]:
        """The ``stats`` answer: every section but the latency histogram (a metric only)."""
        out = asdict(self)
        del out["latency"]
        return out
