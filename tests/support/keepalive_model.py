"""The keep-alive scan of csrc/keepalive.c, written plainly in Python: the oracle the C
scan is held to (tests/unit/test_keepalive_scan.py).

Per connection, in this order: an entry missing -> MISSING; else FIN/RST seen on
either entry -> CLOSING; else the packets of both directions differ from the count
recorded at the last tick -> MOVED (count and last-seen time updated: the latest of
the recorded one and both entries'); else idle for longer than idle_ns -> IDLE.
A key the counter walk gave twice counts with its later row.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from pyflow.control.keepalive import CLOSING, IDLE, MISSING, MOVED


@dataclass(frozen=True)
class Tracked:
    """What the engine recorded of a connection at the last tick."""

    keys: tuple[bytes, bytes]  # original direction, reply direction
    packets: int
    last_seen_ns: int


def scan(conns: Mapping[Hashable, Tracked], rows: Iterable[tuple[bytes, tuple[int, ...]]], now: int,
         idle_ns: int) -> dict[Hashable, tuple[int, Tracked]]:
    """The connections that need something done: ident -> (verdict, what is recorded after
    the scan). rows: (key bytes, (packets, bytes, last_seen_ns, closing)) as the walk gave them."""
    counters = dict(rows)
    out: dict[Hashable, tuple[int, Tracked]] = {}
    for ident, c in conns.items():
        co, cr = counters.get(c.keys[0]), counters.get(c.keys[1])
        if co is None or cr is None:
            out[ident] = (MISSING, c)
        elif co[3] or cr[3]:
            out[ident] = (CLOSING, c)
        elif (packets := co[0] + cr[0]) != c.packets:
            out[ident] = (MOVED, Tracked(c.keys, packets, max(c.last_seen_ns, co[2], cr[2])))
        elif now - c.last_seen_ns > idle_ns:
            out[ident] = (IDLE, c)
    return out
