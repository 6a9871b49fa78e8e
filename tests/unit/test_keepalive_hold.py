"""Conntrack's timeout while a connection is offloaded and when it comes back.

The engine writes a long timeout with the offload mark (one message), writes it again
only when less than half is left (at most keepalive.MAX_EXTENDS_PER_TICK a tick), and
hands a connection back with its protocol's own timeout (the namespace's TCP established
or UDP stream timeout, less the time it was idle), except where conntrack set it itself
(the FIN/RST went through it, or its state moved on). A resync hands back what an
earlier process left holding the long timeout. No root: fakes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyflow.control import keepalive
from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import CtEvent, EventType
from tests.support.fakes import (
    OTHER,
    SEC,
    TCP,
    UDP,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
    offer,
)

DAY = 86400


@pytest.fixture
def rig():
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), FakeFlows(), Clock()
    eng = Engine(ct, paths, flows, FakeDevices(), EngineConfig(idle_timeout_s=30), clock=clock)
    return eng, ct, paths, flows, clock


def test_offload_writes_a_day_with_the_mark_and_nothing_while_packets_move(rig):
    """The day goes in with the mark, once more a second after the entries (what packets
    still on the kernel path meanwhile set is overwritten), then nothing for ten minutes
    of packets every second."""
    eng, ct, _paths, flows, clock = rig
    conn = masq_conn(proto=UDP)
    offer(eng, ct, conn)
    assert ct.timeout[conn.ident] == DAY and ct.marked == {conn.ident}
    clock.now += SEC // 2
    eng.tick()
    assert ct.refreshed == []
    for _ in range(600):  # ten minutes of traffic, one tick a second
        clock.now += SEC
        flows.hit(eng.offloaded[conn.ident].keys[0], 100)
        eng.tick()
    assert ct.refreshed == [(conn.ident, DAY)] and eng.stats.refreshes == 1
    assert eng.slots.activity(eng.offloaded[conn.ident])[0] == 60000


@pytest.mark.parametrize(("proto", "cause", "want"), [
    (UDP, "idle", 120 - 31),  # the stream timeout less the 31 s it was idle
    (TCP, "idle", 432000 - 31),
    (TCP, "fin_rst", None),  # the FIN went through conntrack: its state set the timeout
    (UDP, "path_lost", 120),
    (TCP, "flushed", 432000),
])
def test_hand_back_gives_the_protocols_own_timeout(rig, proto, cause, want):
    eng, ct, paths, flows, clock = rig
    conn = masq_conn(proto=proto)
    offer(eng, ct, conn)
    off = eng.offloaded[conn.ident]
    if cause == "idle":
        clock.now += 31 * SEC
        eng.tick()
    elif cause == "fin_rst":
        clock.now += SEC
        flows.hit(off.keys[0], 1, closing=1)
        eng.tick()
    elif cause == "path_lost":
        paths.wan_dev = OTHER
        eng.paths_changed()
    else:
        eng.flush()
    assert not eng.offloaded and eng.stats.removed == {cause: 1}
    assert ct.released == [(conn.ident, want)] and not ct.marked


def test_a_state_change_from_conntrack_keeps_its_timeout(rig):
    eng, ct, _paths, _flows, _clock = rig
    offer(eng, ct, masq_conn())
    offer(eng, ct, masq_conn(state=4))  # FIN_WAIT: conntrack set the state's timeout itself
    assert ct.released == [(masq_conn().ident, None)]


def test_the_sysctls_of_the_namespace_decide(rig):
    eng, ct, _paths, _flows, _clock = rig
    ct.kernel_timeouts = {TCP: 3600, UDP: 180}
    a, b = masq_conn(sport=40001), masq_conn(proto=UDP, sport=40002)
    offer(eng, ct, a)
    offer(eng, ct, b)
    eng.flush()
    assert sorted(ct.released, key=lambda r: r[1]) == [(b.ident, 180), (a.ident, 3600)]


def test_extensions_are_spread_over_ticks(rig):
    """Connections offloaded together run low together: at most MAX_EXTENDS_PER_TICK
    messages a tick, the rest at the next ticks, none twice."""
    eng, ct, _paths, flows, clock = rig
    n = keepalive.MAX_EXTENDS_PER_TICK + 500
    conns = [masq_conn(proto=UDP, sport=20000 + i) for i in range(n)]
    for conn in conns:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in conns])
    assert len(eng.offloaded) == n
    clock.now += (DAY // 2 + 1) * SEC
    for off in eng.offloaded.values():
        flows.hit(off.keys[0], 1)
    eng.tick()
    assert len(ct.refreshed) == keepalive.MAX_EXTENDS_PER_TICK
    clock.now += SEC
    eng.tick()
    assert len(ct.refreshed) == n and len({i for i, _t in ct.refreshed}) == n
    clock.now += SEC
    eng.tick()
    assert len(ct.refreshed) == n and len(eng.offloaded) == n


def test_resync_releases_what_an_earlier_process_left_holding_a_day(rig):
    """After a crash: a marked connection this process does not offload (now excluded by
    mark), and an unmarked UDP one holding more than the stream timeout, go back with
    their protocol's timeout; one offloaded again is held again; others are left alone."""
    eng, ct, _paths, _flows, _clock = rig
    eng.config = replace(eng.config, exclude_mark_mask=0x10)
    ct.offload_mark = 0x100
    marked = masq_conn(sport=40001, mark=0x110)
    held_udp = replace(masq_conn(proto=UDP, sport=40002, mark=0x10), timeout=80000)
    fresh_udp = replace(masq_conn(proto=UDP, sport=40003, mark=0x10), timeout=100)
    again = masq_conn(sport=40004, mark=0x100)
    for conn in (marked, held_udp, fresh_udp, again):
        ct.table[conn.ident] = conn
    eng.resync()
    assert set(eng.offloaded) == {again.ident} and ct.timeout[again.ident] == DAY
    assert sorted(ct.released) == sorted([(marked.ident, 432000), (held_udp.ident, 120)])
    assert eng.stats.removed == {"released_at_resync": 2}


class BatchingConntrack(FakeConntrack):
    """An adapter that sends many refreshes together (as CtNetlink.refresh_many does)."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def refresh_many(self, conns, timeout_s):
        self.batches.append(len(conns))
        return [self.refresh(conn, timeout_s) for conn in conns]


def test_extensions_of_a_tick_go_out_together_and_a_gone_entry_is_removed():
    ct, flows, clock = BatchingConntrack(), FakeFlows(), Clock()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(idle_timeout_s=30), clock=clock)
    conns = [masq_conn(proto=UDP, sport=20000 + i) for i in range(50)]
    for conn in conns:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in conns])
    del ct.table[conns[7].ident]  # its DESTROY was lost
    clock.now += 2 * SEC  # the write once more after the entries went in is due
    eng.tick()
    assert ct.batches == [50] and len(ct.refreshed) == 49
    assert set(eng.offloaded) == {c.ident for c in conns} - {conns[7].ident}
    assert eng.stats.removed == {"destroyed": 1}
