"""The keep-alive scan of csrc/keepalive.c, written plainly in Python: the oracle the C
scan is held to (tests/unit/test_keepalive_scan.py).

Per connection, in this order: an entry missing -> MISSING; else FIN/RST seen on
either entry -> CLOSING; else (when the packets of both directions differ from the
count recorded at the last tick, the count is updated and the last-seen time becomes
the scan's time, with no verdict) idle for longer than idle_ns -> IDLE; else
conntrack's timeout has less than extend_ns left -> EXTEND.
A key the counter walk gave twice counts with its later row.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from pyflow.control.keepalive import CLOSING, EXTEND, IDLE, MISSING


@dataclass(frozen=True)
class Tracked:
    """What the engine recorded of a connection at the last tick."""

    keys: tuple[bytes, bytes]  # original direction, reply direction
    packets: int
    last_seen_ns: int
    ct_deadline_ns: int


def scan(conns: Mapping[Hashable, Tracked], rows: Iterable[tuple[bytes, tuple[int, ...]]], now: int,
         idle_ns: int, extend_ns: int) -> tuple[dict[Hashable, int], dict[Hashable, Tracked]]:
    """(verdicts of the connections that need something done, what is recorded of every
    connection after the scan). rows: (key bytes, (packets, bytes, closing))
    as the walk gave them."""
    counters = dict(rows)
    verdicts: dict[Hashable, int] = {}
    after: dict[Hashable, Tracked] = {}
    for ident, c in conns.items():
        after[ident] = c
        co, cr = counters.get(c.keys[0]), counters.get(c.keys[1])
        if co is None or cr is None:
            verdicts[ident] = MISSING
            continue
        if co[2] or cr[2]:
            verdicts[ident] = CLOSING
            continue
        if (packets := co[0] + cr[0]) != c.packets:
            c = after[ident] = Tracked(c.keys, packets, now, c.ct_deadline_ns)
        if now - c.last_seen_ns > idle_ns:
            verdicts[ident] = IDLE
        elif c.ct_deadline_ns - now < extend_ns:
            verdicts[ident] = EXTEND
    return verdicts, after
