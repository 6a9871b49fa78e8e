"""Hardware placement in the engine, with a fake flower adapter (no root): both directions
as rules or neither, refusals fall back to the XDP map (counted, never lost), rule counters
drive keep-alive and idle expiry, teardown and path changes remove or rewrite the rules."""

from __future__ import annotations

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import CtEvent, EventType
from pyflow.datapath.abi import key_bytes
from tests.support.fakes import (
    GW2_MAC,
    LAN,
    SEC,
    UDP,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakeHw,
    FakePaths,
    RuleStats,
    masq_conn,
    offer,
)


@pytest.fixture
def hwrig():
    ct, paths, flows, clock, hw = FakeConntrack(), FakePaths(), FakeFlows(), Clock(), FakeHw()
    eng = Engine(ct, paths, flows, FakeDevices(), EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120),
                 clock=clock, hw=hw)
    return eng, ct, paths, flows, clock, hw


def test_connection_between_hw_devices_becomes_two_rules_and_no_map_entries(hwrig):
    eng, ct, _paths, flows, _clock, hw = hwrig
    conn = masq_conn()
    offer(eng, ct, conn)
    off = eng.offloaded[conn.ident]
    assert off.hw and len(off.hw_rules) == 2
    assert flows.entries == {}
    (k_o, a_o), (k_r, a_r) = (hw.rules[i] for i in off.hw_rules)
    # the same entries the XDP path would have received
    assert (k_o, k_r) == off.keys and (a_o, a_r) == off.actions
    assert (k_o.ifindex, k_o.saddr, a_o.nat_saddr, a_o.nat_sport) == (LAN, "198.18.0.10", "198.19.0.1", 61000)
    assert (k_r.ifindex, k_r.daddr, a_r.nat_daddr) == (WAN, "198.19.0.1", "198.18.0.10")
    assert conn.ident in ct.marked
    assert (eng.stats.offloaded, eng.stats.hw_offloaded, eng.stats.hw_failures) == (1, 1, 0)


def test_conntrack_is_liberal_before_the_first_rule(hwrig):
    """The two rules go in one after the other: while only one is in, the other direction
    still takes the kernel path, where conntrack must already track windows liberally."""
    eng, ct, _paths, _flows, _clock, hw = hwrig
    conn = masq_conn()
    marked_at_place = []
    place = hw.place

    def placing(keys, actions):
        marked_at_place.append(conn.ident in ct.marked)
        return place(keys, actions)

    hw.place = placing
    offer(eng, ct, conn)
    assert marked_at_place == [True] and eng.offloaded[conn.ident].hw


@pytest.mark.parametrize("refuse_second", [False, True])
def test_refused_placement_falls_back_to_the_map_counted(hwrig, refuse_second):
    eng, ct, _paths, flows, _clock, hw = hwrig
    if refuse_second:
        hw.refuse_second = True
    else:
        hw.refuse = "eopnotsupp"
    conns = [masq_conn(sport=40000 + i) for i in range(3)]
    for c in conns:
        ct.table[c.ident] = c
    eng.handle([CtEvent(EventType.UPDATE, c) for c in conns])  # one batch
    assert all(not eng.offloaded[c.ident].hw for c in conns)
    assert len(flows.entries) == 6
    assert hw.rules == {}  # a half-placed pair was taken back
    assert eng.stats.hw_failures == 3 and eng.stats.hw_offloaded == 0 and eng.stats.offloaded == 3
    assert eng.stats.hw_refused == {"enospc" if refuse_second else "eopnotsupp": 3}


def test_one_side_not_hw_goes_to_the_map_without_asking(hwrig):
    eng, ct, _paths, flows, _clock, hw = hwrig
    hw.devices = {LAN}
    conn = masq_conn()
    offer(eng, ct, conn)
    assert not eng.offloaded[conn.ident].hw and len(flows.entries) == 2
    assert eng.stats.hw_failures == 0


def test_rule_counters_keep_alive_and_idle_rules_expire(hwrig):
    eng, ct, _paths, _flows, clock, hw = hwrig
    conn = masq_conn()
    offer(eng, ct, conn)
    off = eng.offloaded[conn.ident]
    ro, rr = off.hw_rules
    clock.now += 10 * SEC
    hw.counters[ro] = RuleStats(5, 2 * SEC // 10)
    hw.counters[rr] = RuleStats(3, 1 * SEC // 10)
    eng.tick()
    # the long timeout written once more after the rules went in; moving rules cost nothing
    assert ct.refreshed == [(conn.ident, 120)]
    assert off.packets == 8 and off.last_seen_ns == clock.now - SEC // 10
    assert off.hw_counters == ((5, 0), (3, 0))
    clock.now += 20 * SEC
    eng.tick()  # no movement, 20 s idle: kept
    assert conn.ident in eng.offloaded and len(ct.refreshed) == 1
    clock.now += 11 * SEC
    eng.tick()
    assert conn.ident not in eng.offloaded and hw.rules == {}
    assert eng.stats.removed == {"idle": 1} and conn.ident not in ct.marked
    assert hw.stats_calls == 3  # one read per tick


def test_rule_gone_behind_our_back_removes_the_pair(hwrig):
    eng, ct, _paths, _flows, _clock, hw = hwrig
    conn = masq_conn()
    offer(eng, ct, conn)
    hw.remove((eng.offloaded[conn.ident].hw_rules[1],))
    eng.tick()
    assert conn.ident not in eng.offloaded and hw.rules == {}
    assert eng.stats.removed == {"entry_missing": 1}


def test_hw_and_xdp_flows_tick_side_by_side(hwrig):
    eng, ct, _paths, flows, clock, hw = hwrig
    hw_conn = masq_conn(sport=40001)
    offer(eng, ct, hw_conn)
    hw.refuse = "enospc"
    sw_conn = masq_conn(sport=40002)
    offer(eng, ct, sw_conn)
    clock.now += 61 * SEC  # less than half of conntrack's timeout left for both
    flows.hit(eng.offloaded[sw_conn.ident].keys[0], 4)
    hw.counters[eng.offloaded[hw_conn.ident].hw_rules[0]] = RuleStats(7, 0)
    eng.tick()
    assert {i for i, _t in ct.refreshed} == {hw_conn.ident, sw_conn.ident}
    clock.now += SEC
    eng.tick()  # held for another 120 s: nothing to write
    assert len(ct.refreshed) == 2
    assert eng.offloaded[hw_conn.ident].hw and not eng.offloaded[sw_conn.ident].hw


def test_destroy_and_flush_remove_rules(hwrig):
    eng, ct, _paths, _flows, _clock, hw = hwrig
    a, b = masq_conn(sport=40001), masq_conn(proto=UDP, sport=40002)
    offer(eng, ct, a)
    offer(eng, ct, b)
    assert len(hw.rules) == 4
    eng.handle([CtEvent(EventType.DESTROY, a)])
    assert len(hw.rules) == 2 and a.ident not in eng.rules.flows
    eng.flush()
    assert hw.rules == {} and eng.offloaded == {} and eng.rules.flows == {}
    assert b.ident not in ct.marked


def test_path_change_rewrites_rules_or_falls_back(hwrig):
    eng, ct, paths, flows, _clock, hw = hwrig
    conn = masq_conn()
    offer(eng, ct, conn)
    old = eng.offloaded[conn.ident].hw_rules
    paths.gw_mac = GW2_MAC
    eng.paths_changed()
    off = eng.offloaded[conn.ident]
    assert off.hw and off.hw_rules != old and set(hw.rules) == set(off.hw_rules)
    assert hw.rules[off.hw_rules[0]][1].dmac == GW2_MAC
    # the new gateway's rules are refused: the flow moves to the map, nothing lost
    hw.refuse = "enospc"
    paths.gw_mac = bytes.fromhex("020000000097")
    eng.paths_changed()
    off = eng.offloaded[conn.ident]
    assert not off.hw and hw.rules == {} and conn.ident not in eng.rules.flows
    assert {key_bytes(k) for k in off.keys} == set(flows.entries)
    assert eng.stats.rewritten == 2 and eng.stats.hw_failures == 1
    # and ticks then read its counters from the map
    eng.tick()
    assert conn.ident in eng.offloaded


def test_no_adapter_means_todays_behaviour(hwrig):
    _eng, ct, paths, flows, clock, _hw = hwrig
    eng = Engine(ct, paths, flows, FakeDevices(), EngineConfig(), clock=clock)
    conn = masq_conn()
    offer(eng, ct, conn)
    assert not eng.offloaded[conn.ident].hw and len(flows.entries) == 2
    assert eng.stats.hw_offloaded == 0
