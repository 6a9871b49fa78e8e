"""Bridge FDB entries kept fresh while offloaded flows use them (bridge ports managed).

When pyflow manages a bridge's ports instead of the bridge, a client's frames go from
its port straight to the fast path: the bridge never sees them, so the FDB entry that
names the client's port is never refreshed and ages out after the bridge's ageing time
(300 s by default). Its deletion is an FDB change that takes the client's flows off the
fast path until the client's next frame reaches the bridge and teaches it again. The
keeper refreshes those entries as the bridge would if it saw the frames
(bridge.BridgePorts.refresh: a learned entry, checked to be still on the same port).

What it refreshes: the entries the bridge-port answers of offloaded paths came from
(BridgePorts.used) whose MAC is the next hop of a connection that carried packets since
the previous round (as the keep-alive scan last saw them: Slots.activity, or a flower
flow's last use). One round per a quarter of the shortest ageing time among those
bridges; an entry the bridge refreshed itself within that quarter (ARP, ND, traffic
that still passes through it) is only read. So an entry in use is at most about half
its ageing time old, whatever the tick. One read and at most one refresh per distinct
(bridge, MAC, VLAN), never one per connection.

Bounded per tick: a round walks at most SCAN_PER_TICK connections per tick (a large
table takes several ticks) and sends at most SEND_PER_TICK refreshes per tick; what is
left goes at the next ticks. Runs in the engine's tick (Engine.tick), so in the loop's
thread and namespace, where the path resolver made its BridgePorts; nothing happens
until a path has gone below a bridge.

Counted in ``counts`` by outcome (refreshed, fresh, moved, gone, not_learned, failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pyflow.control.model import NoPath, Offloaded

if TYPE_CHECKING:
    from pyflow.control.bridge import BridgePorts
    from pyflow.control.engine import Engine

log = logging.getLogger(__name__)

FRACTION = 4  # a round every ageing time / FRACTION
MIN_INTERVAL_S = 0.1  # however short the ageing time: rounds no closer than this
SCAN_PER_TICK = 50_000  # connections looked at per tick (about 15 ms)
SEND_PER_TICK = 256  # FDB entries read (and maybe refreshed) per tick

OUTCOMES = ("refreshed", "fresh", "moved", "gone", "not_learned", "failed")


class FdbKeeper:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic):
        self.monotonic = monotonic
        self.next_round = 0.0  # monotonic seconds
        self.interval_s = 0.0  # of the current round
        self.rounds = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._since_ns = 0  # the engine clock at the previous round's start: activity since counts
        self._round_ns = 0
        self._scan: Iterator[Offloaded] | None = None
        self._macs: set[bytes] = set()
        self._queue: list[tuple[tuple[int, bytes, int], int]] = []

    @staticmethod
    def bridge_ports(eng: Engine) -> BridgePorts | None:
        """The path resolver's bridge-port resolver (RtPaths.bridge_ports), None until a
        path went below a bridge or when the resolver has none (test fakes)."""
        return getattr(eng.planner.paths, "bridge_ports", None)

    def tick(self, eng: Engine) -> None:
        bp = self.bridge_ports(eng)
        if bp is None or not bp.used:
            return
        if self._scan is None and not self._queue:
            now = self.monotonic()
            if now < self.next_round or not self._start(eng, bp, now):
                return
        if self._scan is not None:
            self._walk(eng, bp)
        if self._queue:
            self._send(bp)

    def _start(self, eng: Engine, bp: BridgePorts, now: float) -> bool:
        ageing = []
        for br in {key[0] for key in bp.used}:
            try:
                ageing.append(bp.ageing_s(br))
            except NoPath:
                continue  # gone or no longer a bridge: its records are dropped at refresh
        ageing = [a for a in ageing if a > 0]  # ageing 0: the bridge keeps no learned entry
        if not ageing:
            self.next_round = now + 1.0
            return False
        self.interval_s = max(MIN_INTERVAL_S, min(ageing) / FRACTION)
        self.next_round = now + self.interval_s
        self.rounds += 1
        clock = eng.clock()
        # a connection's last-seen time is as of the keep-alive's last walk of the map,
        # which may lag by the pacer's interval: activity that recent counts too
        self._since_ns = self._round_ns - int(eng.pacer.interval_s * 1e9) if self._round_ns else 0
        self._round_ns = clock
        self._macs = set()
        self._scan = iter(list(eng.offloaded.values()))
        return True

    def _walk(self, eng: Engine, bp: BridgePorts) -> None:
        scan, macs, since = self._scan, self._macs, self._since_ns
        assert scan is not None
        last_seen = eng.last_seen_ns
        n = 0
        for off in scan:
            if last_seen(off) >= since:
                path = off.path
                macs.add(path[2].dmac)  # the original direction's next hop
                macs.add(path[3].dmac)  # the reply's: a LAN client's own MAC
            n += 1
            if n >= SCAN_PER_TICK:
                return
        self._scan = None
        self._queue = [(key, port) for key, port in bp.used.items() if key[1] in macs]
        self._macs = set()

    def _send(self, bp: BridgePorts) -> None:
        batch, self._queue = self._queue[:SEND_PER_TICK], self._queue[SEND_PER_TICK:]
        for (bridge, mac, vid), port in batch:
            try:
                outcome = bp.refresh(bridge, mac, vid, port, self.interval_s)
            except OSError as exc:  # the socket itself failed: counted, tried again next round
                log.debug("FDB refresh failed: %s", exc)
                outcome = "failed"
            self.counts[outcome] += 1
