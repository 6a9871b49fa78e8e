"""A walk whose map read was made in another thread is scanned by the control loop in parts
(keepalive.begin_walk, Engine.scan), so that events are handled between them: the parts
together decide what one scan of the whole read decides, and what happens between two
parts (a connection offloaded or handed back) is judged as if it had happened during the
read. No root: fakes, with real counter arrays."""

from __future__ import annotations

import random

import pytest

from pyflow.control import keepalive
from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import CtEvent, EventType
from tests.support.fakes import (
    SEC,
    UDP,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
    offer,
)
from tests.unit.test_keepalive_scan import HOLD_S, disturb, rig, tracked


def walk_in_parts(eng: Engine, counters, part: int) -> int:
    """What the control loop does with a read made elsewhere; returns the number of parts."""
    keepalive.begin_walk(eng, counters, keepalive.index_of(counters), 0.0)
    parts = 1
    while not eng.scan(part):
        parts += 1
    assert eng.pacer.walk is None
    return parts


@pytest.mark.parametrize("seed", range(4))
def test_a_walk_in_parts_decides_what_a_whole_walk_decides(seed):
    whole, _, flows_w, clock_w = rig(300, seed)
    parts, _, flows_p, clock_p = rig(300, seed)
    rnd_w, rnd_p = random.Random(seed), random.Random(seed)
    for _ in range(12):
        disturb(rnd_w, whole, flows_w, clock_w)
        disturb(rnd_p, parts, flows_p, clock_p)
        keepalive.begin_read(whole)
        whole.tick(flows_w.read_counters())
        keepalive.begin_read(parts)
        assert walk_in_parts(parts, flows_p.read_counters(), 37) >= 300 // 37
        assert set(parts.offloaded) == set(whole.offloaded)
        assert parts.stats.removed == whole.stats.removed
        assert tracked(parts) == tracked(whole)
        assert parts.stats.refreshes == whole.stats.refreshes
        assert parts.pacer.walks == whole.pacer.walks
    assert sum(whole.stats.removed.values()) > 0 and whole.stats.refreshes > 0


def test_what_happens_between_two_parts_is_judged_as_during_the_read():
    ct, flows, clock = FakeConntrack(), FakeFlows(), Clock()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(idle_timeout_s=30), clock=clock)
    first = [masq_conn(proto=UDP, sport=30000 + i) for i in range(10)]
    for conn in first:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in first])
    keepalive.begin_read(eng)
    read = flows.read_counters()
    clock.now += SEC
    keepalive.begin_walk(eng, read, keepalive.index_of(read), 0.0)
    assert not eng.scan(4)
    late = masq_conn(proto=UDP, sport=31000)
    offer(eng, ct, late)  # offloaded between two parts: not in the read
    eng.remove(first[7].ident, "destroyed", tell_conntrack=False)  # gone between two parts
    while not eng.scan(4):
        pass
    assert late.ident in eng.offloaded and "entry_missing" not in eng.stats.removed
    assert set(eng.offloaded) == {c.ident for c in first if c is not first[7]} | {late.ident}
    assert eng.pacer.walks == 1


def test_the_timeouts_one_walk_writes_are_bounded_across_its_parts(monkeypatch):
    monkeypatch.setattr(keepalive, "MAX_EXTENDS_PER_TICK", 5)
    ct, flows, clock = FakeConntrack(), FakeFlows(), Clock()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(conntrack_timeout_s=HOLD_S), clock=clock)
    conns = [masq_conn(proto=UDP, sport=32000 + i) for i in range(12)]
    for conn in conns:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in conns])
    clock.now += (HOLD_S // 2 + 1) * SEC
    for off in eng.offloaded.values():
        flows.hit(off.keys[0], 1)
    eng.pacer.defer_writes = True  # as the control loop sets it
    keepalive.begin_read(eng)
    walk_in_parts(eng, flows.read_counters(), 3)
    assert len(eng.pacer.queue) == 5 and eng.slots.extend_over == 7
    assert eng.pacer.walk_when_drained  # the rest comes with the next walk, once these are written
