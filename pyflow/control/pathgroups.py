"""The offloaded connections grouped by what their path is a function of.

A connection's path depends on (family, original source, reply source, mark) only
(returning.path_key, the planner's memo key): every connection of one group resolves to
the same path. A path change (a neighbour, route or link notification) used to
re-resolve and compare all offloaded connections one by one, about 0.5-1 us each: 50-100
ms of one loop turn at 100,000 connections, during which no conntrack event was served,
even when the change moved none of them. With the groups, a change costs one resolution
per group, and only the connections of a group whose answer changed are looked at one
by one.

``Group.path`` is the path object every member's entries were written from, when they
all were written from that same (interned, Planner._intern) object, and None when the
members differ (offloaded at different times along paths that differed): then the next
path change compares the members one by one, as before, and sets it again.
"""

from __future__ import annotations

from pyflow.control.model import Offloaded, Path
from pyflow.control.returning import path_key


class Group:
    __slots__ = ("members", "path")

    def __init__(self, path: Path) -> None:
        self.members: dict[tuple, Offloaded] = {}  # ident -> record
        self.path: Path | None = path  # every member's off.path is this object; None: not known


class PathGroups:
    """Engine.offloaded again, by path key: kept in step by the engine wherever a record
    comes, goes, or changes its conn (whose mark is part of the key)."""

    def __init__(self) -> None:
        self.groups: dict[tuple, Group] = {}

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, ident: tuple, off: Offloaded) -> None:
        key = path_key(off.conn)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(off.path)
        elif group.path is not off.path:
            group.path = off.path if not group.members else None
        group.members[ident] = off

    def add_many(self, members: list[tuple[tuple, Offloaded]]) -> None:
        """add() for each (ident, record) in turn."""
        groups = self.groups
        for ident, off in members:
            conn = off.conn
            key = (conn.family, conn.orig.src, conn.reply.src, conn.mark)  # path_key(conn)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(off.path)
            elif group.path is not off.path:
                group.path = off.path if not group.members else None
            group.members[ident] = off

    def discard(self, ident: tuple, off: Offloaded) -> None:
        """off (under ident) leaves; its key is computed from off.conn as it is now."""
        key = path_key(off.conn)
        group = self.groups.get(key)
        if group is not None and group.members.pop(ident, None) is not None and not group.members:
            del self.groups[key]

    def clear(self) -> None:
        self.groups.clear()
