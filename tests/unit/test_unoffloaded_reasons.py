"""Every connection that qualifies and is not on the fast path has a counted reason.

A benchmark under heavy load once offloaded nothing and counted no refusal: a connection
that waits for its next hop's address (an unresolved neighbour, or a neighbour lookup that
failed under load: NotYet) went to the pending table and no counter said so. Within one
pass the planner shares one path answer between every connection of the same two hosts,
so one unresolved neighbour holds back a whole resync at once. Now the wait is counted
(refused["neighbour_pending"], once per wait) and the connection is offloaded when the
neighbour resolves. No root: fakes.
"""

from __future__ import annotations

from dataclasses import replace

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import CtEvent, EventType, NotYet, Tuple
from tests.support.fakes import (
    SEC,
    UDP,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
)


def rig():
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), FakeFlows(), Clock()
    return Engine(ct, paths, flows, FakeDevices(), EngineConfig(), clock=clock), ct, paths, flows, clock


def unaccounted(eng: Engine, qualifying: int) -> int:
    """Qualifying connections neither offloaded nor counted under a reason."""
    counted = sum(eng.stats.refused.values()) + eng.stats.install_errors
    return qualifying - len(eng.offloaded) - counted


def test_a_resync_held_back_by_one_neighbour_is_counted_and_offloaded_when_it_resolves():
    eng, ct, paths, _flows, clock = rig()
    conns = [masq_conn(proto=UDP, sport=20000 + i) for i in range(500)]
    for conn in conns:
        ct.table[conn.ident] = conn
    paths.gw_mac = None  # the uplink's gateway is not resolved (or its lookup failed)
    eng.resync()
    assert not eng.offloaded and len(eng.pending) == 500
    assert eng.stats.refused == {"neighbour_pending": 500}
    for _ in range(3):  # retried at every tick: counted once per wait, not once per retry
        clock.now += SEC
        eng.tick()
    assert eng.stats.refused == {"neighbour_pending": 500} and unaccounted(eng, 500) == 0
    paths.gw_mac = b"\x02\x00\x00\x00\x00\x99"
    clock.now += SEC
    eng.tick()
    assert len(eng.offloaded) == 500 and not eng.pending


class OneUnresolved(FakePaths):
    """198.19.0.77's path waits for a neighbour; everything else resolves."""

    def egress(self, family, src, dst, *, iif, mark):
        if "198.19.0.77" in (src, dst):
            raise NotYet("neighbour 198.19.0.77 is INCOMPLETE")
        return super().egress(family, src, dst, iif=iif, mark=mark)


def test_each_way_of_not_being_offloaded_is_counted():
    """One pass: one connection waits for its neighbour, one vanished from conntrack before
    its claim, the map refuses the batch and then the first connection on its own; the rest
    go in. Every one of them is offloaded or counted."""
    ct, flows = FakeConntrack(), FakeFlows()
    eng = Engine(ct, OneUnresolved(), flows, FakeDevices(), EngineConfig(), clock=Clock())
    base = masq_conn(sport=30001)
    waiting = replace(base, orig=Tuple("198.18.0.10", "198.19.0.77", 30001, 443),
                      reply=Tuple("198.19.0.77", "198.19.0.1", 443, 61001))
    gone = masq_conn(sport=30002)  # never in conntrack's table: its claim fails
    rest = [masq_conn(sport=30100 + i) for i in range(20)]
    for conn in (waiting, *rest):
        ct.table[conn.ident] = conn
    flows.fail_inserts = 2  # the batch fails, then the first connection one by one
    eng.handle([CtEvent(EventType.UPDATE, c) for c in (waiting, gone, *rest)])
    assert eng.stats.refused == {"neighbour_pending": 1, "gone": 1}
    assert eng.stats.install_errors == 1 and len(eng.offloaded) == 19
    assert unaccounted(eng, 22) == 0
