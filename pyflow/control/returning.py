"""Connections a path change took off the fast path, waiting for a path to come back.

A connection whose path stops resolving (a device down, a neighbour lost, a client's
MAC between two bridge ports, a route withdrawn) goes back to the kernel path. It
may never send another conntrack event (an established TCP flow changes no state),
so the engine cannot wait for one to offload it again: it keeps the connection here
and offers it again at each later path change, as soon as its path resolves.

Bounded in time (``window_ns``: a connection whose path has not come back by then is
left to the kernel path, counted ``expired``) and in number (``max_entries``: past it
the oldest is let go, counted ``overflow``). Kept grouped by what its path depends on
(family, original source, reply source, mark: the planner's memo key), so a path
change costs one resolution per group, not one per connection; kept current by the
conntrack events that do arrive (a state change, a DESTROY).
"""

from __future__ import annotations

from collections.abc import Container, Iterator

from pyflow.control.model import Conn


def path_key(conn: Conn) -> tuple:
    """What a connection's path is a function of (the planner's memo key)."""
    return (conn.family, conn.orig.src, conn.reply.src, conn.mark)


class Returning:
    def __init__(self, window_ns: int, max_entries: int) -> None:
        self.window_ns = window_ns
        self.max_entries = max_entries
        self.groups: dict[tuple, dict[tuple, Conn]] = {}  # path key -> ident -> latest conn
        # ident -> (deadline, path key); insertion order is deadline order (one window for all)
        self._deadline: dict[tuple, tuple[int, tuple]] = {}
        self.expired = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, ident: object) -> bool:
        return ident in self._deadline

    def add(self, ident: tuple, conn: Conn, now_ns: int) -> None:
        if self.max_entries <= 0 or self.window_ns <= 0:
            return
        self.discard(ident)  # again: a fresh deadline, at the end of the order
        while len(self._deadline) >= self.max_entries:
            self.discard(next(iter(self._deadline)))
            self.overflow += 1
        key = path_key(conn)
        self._deadline[ident] = (now_ns + self.window_ns, key)
        self.groups.setdefault(key, {})[ident] = conn

    def update(self, ident: tuple, conn: Conn) -> None:
        """A conntrack event about a waiting connection: keep its latest state."""
        entry = self._deadline.get(ident)
        if entry is not None and path_key(conn) == entry[1]:
            self.groups[entry[1]][ident] = conn

    def discard(self, ident: tuple) -> bool:
        entry = self._deadline.pop(ident, None)
        if entry is None:
            return False
        group = self.groups.get(entry[1])
        if group is not None:
            group.pop(ident, None)
            if not group:
                del self.groups[entry[1]]
        return True

    def expire(self, now_ns: int) -> int:
        """Let go of the connections whose window has passed; how many."""
        n = 0
        order = self._deadline
        while order:
            ident, (deadline, _key) = next(iter(order.items()))
            if deadline > now_ns:
                break
            self.discard(ident)
            n += 1
        self.expired += n
        return n

    def retain(self, live: Container[tuple]) -> None:
        """Keep only the connections conntrack still has (a resync's dump)."""
        for ident in [i for i in self._deadline if i not in live]:
            self.discard(ident)

    def clear(self) -> None:
        self.groups.clear()
        self._deadline.clear()

    def take(self, key: tuple) -> Iterator[tuple[tuple, Conn]]:
        """Every waiting connection of one group, removed from here."""
        for ident, conn in list(self.groups.get(key, {}).items()):
            self.discard(ident)
            yield ident, conn
