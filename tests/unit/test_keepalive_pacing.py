"""Keep-alive walks paced by their cost: at most WALK_BUDGET of a core on average, never
further apart than MAX_WALK_INTERVAL_S (nor half the idle timeout), so that an idle
connection is handed back at most one interval and a tick late. No root: fakes, and a
fake CPU clock that makes every walk cost what the test says."""

from __future__ import annotations

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
    _kb,
    masq_conn,
    offer,
)


class FakeCpu:
    """Each call is `cost` CPU seconds after the one before: a walk (two calls) costs `cost`."""

    def __init__(self, cost: float):
        self.cost, self.t = cost, 0.0

    def __call__(self) -> float:
        self.t += self.cost
        return self.t


def rig(cost: float, idle_s: float = 30.0):
    ct, flows, clock = FakeConntrack(), FakeFlows(), Clock()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(idle_timeout_s=idle_s), clock=clock)
    eng.pacer = keepalive.Pacer(cpu=FakeCpu(cost))
    return eng, ct, flows, clock



def offloaded_half_a_day_ago(eng, ct, flows, clock, n: int, *, sport: int) -> list:
    """``n`` UDP connections offloaded, then half a day and a second on, all seen moving
    just now: each one's long conntrack timeout is running low."""
    conns = [masq_conn(proto=UDP, sport=sport + i) for i in range(n)]
    for conn in conns:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in conns])
    clock.now += (86400 // 2 + 1) * SEC
    for off in eng.offloaded.values():
        flows.hit(off.keys[0], 1)
    return conns

def test_pacer_interval_is_the_cost_over_the_budget_and_bounded():
    p = keepalive.Pacer(cpu=FakeCpu(0.0))
    p.walked(0, 0.05, keepalive.PACE_FROM, 30.0, backlog=False)
    assert p.interval_s == pytest.approx(0.05 / keepalive.WALK_BUDGET)
    assert not p.due(p.next_ns - 1) and p.due(p.next_ns)
    p.walked(0, 5.0, keepalive.PACE_FROM, 30.0, backlog=False)
    assert p.interval_s == keepalive.MAX_WALK_INTERVAL_S
    p.walked(0, 5.0, keepalive.PACE_FROM, 6.0, backlog=False)
    assert p.interval_s == 3.0  # half the idle timeout
    p.walked(0, 5.0, keepalive.PACE_FROM - 1, 30.0, backlog=False)
    assert p.interval_s == 0.0  # a small table walks at every tick
    p.walked(0, 5.0, keepalive.PACE_FROM, 30.0, backlog=True)
    assert p.due(0)  # extensions held back and none queued: the next tick walks
    p.queue.append(((), None))  # type: ignore[arg-type]
    assert not p.due(0)  # ... once what the walk found is written


def test_a_costly_walk_is_spaced_and_idle_hand_back_stays_within_the_bound(monkeypatch):
    monkeypatch.setattr(keepalive, "PACE_FROM", 1)
    eng, ct, flows, clock = rig(cost=0.05)  # 50 ms a walk: one every 5 s at a 1% budget
    conn = masq_conn(proto=UDP)
    offer(eng, ct, conn)
    key = eng.offloaded[conn.ident].keys[0]
    walks0 = eng.pacer.walks
    last_packet = None
    for t in range(1, 121):  # two minutes, a tick a second; packets for the first 20 s
        clock.now += SEC
        if t <= 20:
            flows.hit(key, 10)
            last_packet = clock.now
        eng.tick()
        if conn.ident not in eng.offloaded:
            break
    assert conn.ident not in eng.offloaded and eng.stats.removed.get("idle") == 1
    assert last_packet is not None
    late = (clock.now - last_packet) / SEC - 30
    interval = 0.05 / keepalive.WALK_BUDGET
    assert 0 < late <= interval + 1, late  # after the idle timeout, at most one interval and a tick late
    walks = eng.pacer.walks - walks0
    assert walks <= t / interval + 2 and eng.pacer.skipped >= t - walks


def test_a_walk_that_left_extensions_is_followed_at_the_next_tick(monkeypatch):
    monkeypatch.setattr(keepalive, "PACE_FROM", 1)
    monkeypatch.setattr(keepalive, "MAX_EXTENDS_PER_TICK", 3)
    eng, ct, flows, clock = rig(cost=1.0)  # a walk would otherwise wait 10 s
    offloaded_half_a_day_ago(eng, ct, flows, clock, 7, sport=20000)
    done, over = [], []
    for _ in range(3):
        eng.tick()
        done.append(len(ct.refreshed))
        over.append(eng.slots.extend_over)
        clock.now += SEC
    assert done == [3, 6, 7]
    assert over == [4, 1, 0]  # the scan handed out 3 and held the others back in C
    eng.tick()  # nothing left over: the 10 s interval holds
    assert eng.pacer.interval_s == keepalive.MAX_WALK_INTERVAL_S and eng.pacer.skipped == 1


def test_a_read_made_elsewhere_does_not_call_what_came_after_it_missing():
    """The loop reads the map in another thread and scans when the read is done: a
    connection offloaded meanwhile is not in that read and must not be removed as missing;
    one whose entries really went (flushed by hand) before the read is."""
    eng, ct, flows, clock = rig(cost=0.0)
    gone, early = masq_conn(proto=UDP, sport=30001), masq_conn(proto=UDP, sport=30002)
    offer(eng, ct, gone)
    offer(eng, ct, early)
    for key in eng.offloaded[gone.ident].keys:
        del flows.entries[_kb(key)]
    keepalive.begin_read(eng)
    read = flows.read_counters()  # what the other thread got
    late = masq_conn(proto=UDP, sport=30003)
    offer(eng, ct, late)  # offloaded while the read was under way
    clock.now += SEC
    eng.tick(read, read_cpu_s=0.01)
    assert gone.ident not in eng.offloaded and eng.stats.removed.get("entry_missing") == 1
    assert early.ident in eng.offloaded and late.ident in eng.offloaded
    clock.now += SEC
    eng.tick()  # an ordinary walk: the late one's entries are there
    assert late.ident in eng.offloaded and eng.stats.removed.get("entry_missing") == 1


def test_the_loop_writes_what_a_walk_found_in_small_batches():
    """With defer_writes a tick only queues the timeouts running low; drain writes
    them n at a time and skips a connection that left meanwhile."""
    eng, ct, flows, clock = rig(cost=0.0)
    conns = offloaded_half_a_day_ago(eng, ct, flows, clock, 5, sport=21000)
    eng.pacer.defer_writes = True  # as the control loop sets it
    eng.tick()
    assert ct.refreshed == [] and len(eng.pacer.queue) == 5
    eng.remove(conns[0].ident, "flushed", tell_conntrack=True)
    assert keepalive.drain(eng, 2) == 2 and len(ct.refreshed) == 2  # the first one is gone: skipped
    assert keepalive.drain(eng, 2) == 2 and keepalive.drain(eng, 2) == 0
    assert {i for i, _t in ct.refreshed} == {c.ident for c in conns[1:]}
