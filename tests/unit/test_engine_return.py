"""A connection a path change took off the fast path comes back at the first later path
change that resolves its path, without a conntrack event; bounded in time and number.
Fake adapters (tests/support/fakes.py), no root."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import TCP_CONNTRACK_ESTABLISHED, CtEvent, EventType
from tests.support.fakes import (
    GW_MAC,
    OTHER,
    SEC,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
    offer,
)

CONFIG = EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120, return_window_s=60, return_max=3)


class CountingPaths(FakePaths):
    """FakePaths counting the egress lookups per destination."""

    def __init__(self):
        super().__init__()
        self.asked: list[str] = []

    def egress(self, family, src, dst, *, iif, mark):
        self.asked.append(dst)
        return super().egress(family, src, dst, iif=iif, mark=mark)


@pytest.fixture
def rig():
    ct, paths, flows, clock = FakeConntrack(), CountingPaths(), FakeFlows(), Clock()
    eng = Engine(ct, paths, flows, FakeDevices(), CONFIG, clock=clock)
    return eng, ct, paths, flows, clock


def test_lost_path_comes_back_at_the_next_change_without_an_event(rig):
    eng, ct, paths, flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    paths.wan_dev = OTHER  # the route leaves through a device pyflow does not manage
    eng.paths_changed()
    assert not eng.offloaded and not flows.entries and eng.stats.removed == {"path_lost": 1}
    assert conn.ident in eng.returning and conn.ident not in ct.marked

    eng.paths_changed()  # another change, path still gone: it keeps waiting
    assert not eng.offloaded and conn.ident in eng.returning

    paths.wan_dev = WAN
    eng.paths_changed()  # no conntrack event at all
    assert conn.ident in eng.offloaded and len(flows.entries) == 2 and conn.ident in ct.marked
    assert conn.ident not in eng.returning and eng.stats.reoffloaded == 1 and eng.stats.offloaded == 2


def test_unresolved_neighbour_after_a_change_also_comes_back(rig):
    eng, ct, paths, flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    paths.gw_mac = None  # neighbour lost (FAILED): NotYet
    eng.paths_changed()
    assert not eng.offloaded and conn.ident in eng.returning
    paths.gw_mac = GW_MAC
    eng.paths_changed()
    assert conn.ident in eng.offloaded and eng.stats.reoffloaded == 1


def test_one_resolution_per_host_pair_however_many_connections_wait(rig):
    eng, ct, paths, _flows, _ = rig
    conns = [masq_conn(sport=40000 + i) for i in range(3)]
    for c in conns:
        offer(eng, ct, c)
    paths.wan_dev = OTHER
    eng.paths_changed()
    assert len(eng.returning) == 3 and len(eng.returning.groups) == 1
    paths.asked.clear()
    eng.paths_changed()  # nothing to offload: one try for the group, not three
    assert paths.asked == ["198.19.0.50"]
    paths.wan_dev = WAN
    eng.paths_changed()
    assert all(c.ident in eng.offloaded for c in conns) and eng.stats.reoffloaded == 3


def test_the_wait_ends_after_the_window(rig):
    eng, ct, paths, flows, clock = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    paths.wan_dev = OTHER
    eng.paths_changed()
    clock.now += 61 * SEC
    eng.tick()
    assert conn.ident not in eng.returning and eng.returning.expired == 1
    paths.wan_dev = WAN
    eng.paths_changed()
    assert not eng.offloaded and eng.stats.reoffloaded == 0


def test_at_most_return_max_wait_and_the_oldest_goes_first(rig):
    eng, ct, paths, _flows, clock = rig
    conns = [masq_conn(sport=41000 + i) for i in range(4)]
    for c in conns:
        offer(eng, ct, c)
    paths.wan_dev = OTHER
    eng.paths_changed()
    assert len(eng.returning) == 3 and eng.returning.overflow == 1
    assert conns[0].ident not in eng.returning  # dict order of the offloaded: the oldest first


def test_destroy_or_a_state_change_ends_the_wait(rig):
    eng, ct, paths, _flows, _ = rig
    gone, closing = masq_conn(sport=42000), masq_conn(sport=42001)
    for c in (gone, closing):
        offer(eng, ct, c)
    paths.wan_dev = OTHER
    eng.paths_changed()
    del ct.table[gone.ident]
    eng.handle([CtEvent(EventType.DESTROY, gone)])
    fin = replace(closing, tcp_state=TCP_CONNTRACK_ESTABLISHED + 1)  # FIN_WAIT on the kernel path
    offer(eng, ct, fin)
    assert not eng.returning
    paths.wan_dev = WAN
    eng.paths_changed()
    assert not eng.offloaded and eng.stats.reoffloaded == 0


def test_a_resync_drops_what_conntrack_lost_and_flush_forgets_all(rig):
    eng, ct, paths, _flows, _ = rig
    a, b = masq_conn(sport=43000), masq_conn(sport=43001)
    for c in (a, b):
        offer(eng, ct, c)
    paths.wan_dev = OTHER
    eng.paths_changed()
    del ct.table[a.ident]  # its DESTROY was lost in an overrun
    eng.resync()
    assert a.ident not in eng.returning and b.ident in eng.returning
    eng.flush()
    assert not eng.returning


def test_a_path_that_only_changes_is_rewritten_not_taken_off(rig):
    """A rewrite keeps the connection on the fast path: nothing waits."""
    eng, ct, paths, _flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    paths.gw_mac = bytes.fromhex("02000000aa01")
    eng.paths_changed()
    assert conn.ident in eng.offloaded and not eng.returning and eng.stats.rewritten == 1
