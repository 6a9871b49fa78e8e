"""Offload policy, install, keep-alive, expiry and teardown, with fake adapters (no root):
the topology of tests/support/fakes.py."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import (
    IPS_DYING,
    IPS_SEEN_REPLY,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    CtEvent,
    EventType,
    Tuple,
)
from pyflow.datapath.abi import FlowAction, FlowKey, key_bytes, value_bytes
from tests.support.fakes import (
    CLIENT_MAC,
    GW2_MAC,
    GW_MAC,
    LAN,
    LIVE,
    MAC,
    OTHER,
    SEC,
    TCP,
    UDP,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
    offer,
)

CONFIG = EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120, exclude_mark_mask=0x10)


@pytest.fixture
def rig():
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), FakeFlows(), Clock()
    eng = Engine(ct, paths, flows, FakeDevices(), CONFIG, clock=clock)
    return eng, ct, paths, flows, clock


def test_masqueraded_tcp_gets_both_directions_with_nat_from_the_tuple_pair(rig):
    eng, ct, paths, flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    assert conn.ident in eng.offloaded and conn.ident in ct.marked
    (ko, kr), (ao, ar) = eng.offloaded[conn.ident].keys, eng.offloaded[conn.ident].actions
    assert ko == FlowKey(LAN, TCP, "198.18.0.10", "198.19.0.50", 40000, 443)
    assert kr == FlowKey(WAN, TCP, "198.19.0.50", "198.19.0.1", 443, 61000)
    # original direction leaves masqueraded to the gateway, no DNAT
    assert (ao.nat_saddr, ao.nat_sport, ao.nat_daddr, ao.nat_dport) == ("198.19.0.1", 61000, None, None)
    assert (ao.out_ifindex, ao.tx_port, ao.dmac, ao.smac, ao.in_mac) == (WAN, 30, GW_MAC, MAC[WAN], MAC[LAN])
    # reply leaves de-masqueraded to the client
    assert (ar.nat_saddr, ar.nat_sport, ar.nat_daddr, ar.nat_dport) == (None, None, "198.18.0.10", 40000)
    assert (ar.out_ifindex, ar.tx_port, ar.dmac, ar.smac) == (LAN, 20, CLIENT_MAC, MAC[LAN])
    assert ar.in_mac == MAC[WAN]
    assert flows.entries == {key_bytes(ko): value_bytes(ao, ko), key_bytes(kr): value_bytes(ar, kr)}
    assert eng.stats.offloaded == 1


def test_dnat_is_copied_and_unnated_flows_get_no_rewrite(rig):
    eng, ct, _, _, _ = rig
    # port forward: outside 198.19.0.77:5000 -> router 198.19.0.1:8080, DNAT to 198.18.0.20:80
    dnat = Conn(socket.AF_INET, TCP, Tuple("198.19.0.77", "198.19.0.1", 5000, 8080),
                Tuple("198.18.0.20", "198.19.0.77", 80, 5000), status=LIVE,
                tcp_state=TCP_CONNTRACK_ESTABLISHED)
    offer(eng, ct, dnat)
    ao, ar = eng.offloaded[dnat.ident].actions
    assert (ao.nat_saddr, ao.nat_daddr, ao.nat_dport) == (None, "198.18.0.20", 80)
    assert (ar.nat_saddr, ar.nat_sport, ar.nat_daddr) == ("198.19.0.1", 8080, None)
    plain = Conn(socket.AF_INET, UDP, Tuple("198.18.0.10", "198.19.0.50", 5353, 53),
                 Tuple("198.19.0.50", "198.18.0.10", 53, 5353), status=LIVE)
    offer(eng, ct, plain)
    for a in eng.offloaded[plain.ident].actions:
        assert a.flags() == 0


@pytest.mark.parametrize("conn, reason", [
    (masq_conn(state=2), "tcp_not_established"),
    (masq_conn(status=0), "no_reply_yet"),
    (masq_conn(proto=UDP, status=0), "no_reply_yet"),
    (masq_conn(status=IPS_SEEN_REPLY | IPS_DYING), "dying"),
    (masq_conn(helper="ftp"), "helper"),
    (masq_conn(mark=0x11), "excluded_by_mark"),
    (replace(masq_conn(), proto=socket.IPPROTO_SCTP), "protocol"),
])
def test_policy_refusals(rig, conn, reason):
    eng, ct, _, flows, _ = rig
    offer(eng, ct, conn)
    assert not eng.offloaded and not flows.entries
    assert eng.stats.refused == {reason: 1}


def test_mark_outside_the_mask_does_not_exclude(rig):
    eng, ct, _, _, _ = rig
    offer(eng, ct, masq_conn(mark=0x01))
    assert len(eng.offloaded) == 1


def test_unmanaged_device_is_refused(rig):
    _eng, ct, paths, flows, clock = rig
    eng = Engine(ct, paths, flows, FakeDevices(managed=(LAN,)), CONFIG, clock=clock)
    offer(eng, ct, masq_conn())
    assert not flows.entries and eng.stats.refused == {"ingress_not_managed": 1}


def test_unresolved_neighbour_waits_then_offloads(rig):
    eng, ct, paths, flows, _ = rig
    paths.gw_mac = None
    conn = masq_conn()
    offer(eng, ct, conn)
    assert not flows.entries and conn.ident in eng.pending
    paths.gw_mac = GW_MAC
    eng.paths_changed()
    assert conn.ident in eng.offloaded and not eng.pending


def test_both_directions_or_neither(rig):
    eng, ct, _, flows, _ = rig
    flows.fail_inserts = 1
    offer(eng, ct, masq_conn())
    assert not flows.entries, "a half-installed connection must be removed"
    assert not eng.offloaded and eng.stats.install_errors == 1 and not ct.marked


def test_conntrack_is_told_before_the_entries_go_in(rig):
    """Mark and be-liberal first: from the first entry on conntrack misses what the fast
    path carries, and a kernel-path packet meeting stale windows would lose its NAT."""
    eng, ct, _, flows, _ = rig
    order: list[str] = []
    mark, insert = ct.mark_offloaded, flows.insert

    def marking(conn, on, **kw):
        order.append(f"mark {on}")
        return mark(conn, on, **kw)

    def inserting(items, **kw):
        order.append("insert")
        return insert(items, **kw)

    ct.mark_offloaded, flows.insert = marking, inserting
    offer(eng, ct, masq_conn())
    two = [masq_conn(sport=40001), masq_conn(sport=40002)]
    for conn in two:
        ct.table[conn.ident] = conn
    eng.handle([CtEvent(EventType.UPDATE, conn) for conn in two])  # one pass: one batched insert
    assert order == ["mark True", "insert", "mark True", "mark True", "insert"]
    assert len(eng.offloaded) == 3 and len(ct.marked) == 3


def test_a_connection_gone_before_install_gets_no_entries(rig):
    eng, ct, _, flows, _ = rig
    conn = masq_conn()
    eng.handle([CtEvent(EventType.UPDATE, conn)])  # conntrack no longer has it
    assert not flows.entries and not eng.offloaded and eng.stats.refused == {"gone": 1}


def test_destroy_removes_both_directions(rig):
    eng, ct, _, flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    eng.handle([CtEvent(EventType.DESTROY, conn)])
    assert not flows.entries and not eng.offloaded and eng.stats.removed == {"destroyed": 1}


def test_update_that_stops_qualifying_hands_back(rig):
    eng, ct, _, flows, _ = rig
    offer(eng, ct, masq_conn())
    offer(eng, ct, masq_conn(state=4))  # FIN_WAIT: the kernel saw a FIN on the slow path
    assert not flows.entries and not ct.marked
    assert eng.stats.removed == {"tcp_not_established": 1}


def test_keepalive_holds_moving_flows_without_conntrack_messages_and_expires_idle_ones(rig):
    """Conntrack gets the long timeout with the offload mark and again only when half of it
    is gone: a connection moving every second costs no message per tick. The idle one goes
    back with TCP's established timeout less the time it was idle."""
    eng, ct, _, flows, clock = rig
    busy, idle = masq_conn(sport=40001), masq_conn(sport=40002)
    offer(eng, ct, busy)
    offer(eng, ct, idle)
    assert ct.timeout == {busy.ident: 120, idle.ident: 120}  # written with the mark, no refresh
    for second in range(1, 131):
        clock.now += SEC
        flows.hit(eng.offloaded[busy.ident].keys[0], 10)
        eng.tick()
        if second == 30:
            assert idle.ident in eng.offloaded, "30 s is not yet idle"
        if second == 60:
            # written once more a second after the entries went in, then not while more
            # than half of the timeout is left
            assert ct.refreshed == [(busy.ident, 120), (idle.ident, 120)]
    assert busy.ident in eng.offloaded and idle.ident not in eng.offloaded
    assert eng.stats.removed == {"idle": 1}
    assert ct.refreshed == [(busy.ident, 120), (idle.ident, 120)] + [(busy.ident, 120)] * 2  # 63 s, 124 s
    assert ct.released == [(idle.ident, 432000 - 31)]
    assert idle.ident not in ct.marked and busy.ident in ct.marked


def test_closing_flag_tears_down(rig):
    eng, ct, _, flows, clock = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    clock.now += SEC
    flows.hit(eng.offloaded[conn.ident].keys[1], 1, closing=1)
    eng.tick()
    assert not flows.entries and eng.stats.removed == {"fin_rst": 1} and not ct.marked


def test_refresh_of_a_vanished_entry_removes_the_flow(rig):
    eng, ct, _, flows, clock = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    del ct.table[conn.ident]  # DESTROY event lost
    clock.now += 61 * SEC  # less than half of conntrack's 120 s left: extended at this tick
    flows.hit(eng.offloaded[conn.ident].keys[0], 3)
    eng.tick()
    assert not flows.entries and eng.stats.removed == {"destroyed": 1}


def test_resync_adds_missing_and_drops_stale(rig):
    eng, ct, _, flows, _ = rig
    stale, fresh = masq_conn(sport=40001), masq_conn(sport=40002)
    offer(eng, ct, stale)
    del ct.table[stale.ident]  # its DESTROY was among the lost events
    ct.table[fresh.ident] = fresh  # its NEW/UPDATE too
    eng.handle([None])
    assert set(eng.offloaded) == {fresh.ident}
    assert len(flows.entries) == 2 and eng.stats.resyncs == 1
    assert eng.stats.removed == {"gone_at_resync": 1}


def test_resync_prunes_entries_nobody_owns(rig):
    """After a crash the map holds entries of connections that ended meanwhile."""
    eng, ct, _, flows, _ = rig
    live = masq_conn(sport=40001)
    ct.table[live.ident] = live
    ghost = FlowKey(LAN, TCP, "198.18.0.99", "198.19.0.50", 1234, 443)
    flows.insert([(ghost, FlowAction(WAN, 30, 1500, MAC[LAN], GW_MAC, MAC[WAN]))])
    eng.resync()
    assert key_bytes(ghost) not in flows.entries and len(flows.entries) == 2
    assert eng.stats.removed == {"stray_entry": 1}


def test_route_change_rewrites_in_place_and_dead_path_removes(rig):
    eng, ct, paths, flows, _ = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    paths.gw_mac = GW2_MAC  # neighbour changed its MAC (or the route moved to another gateway)
    eng.paths_changed()
    ao, _ = eng.offloaded[conn.ident].actions
    assert ao.dmac == GW2_MAC and eng.stats.rewritten == 1
    assert bytes(flows.action(eng.offloaded[conn.ident].keys[0]).dmac) == GW2_MAC
    paths.wan_dev = OTHER  # route now leaves through a device pyflow does not manage
    eng.paths_changed()
    assert not eng.offloaded and not flows.entries and eng.stats.removed == {"path_lost": 1}


def test_flush_hands_everything_back(rig):
    eng, ct, _, flows, _ = rig
    for p in range(5):
        offer(eng, ct, masq_conn(sport=41000 + p))
    eng.flush()
    assert not flows.entries and not ct.marked and eng.stats.removed == {"flushed": 5}


def test_conntrack_events_are_switched_on(tmp_path):
    from pyflow.control.runner import ensure_conntrack_events

    sysctl = tmp_path / "nf_conntrack_events"
    sysctl.write_text("2\n")
    ensure_conntrack_events(str(sysctl))
    assert sysctl.read_text() == "1"
    ensure_conntrack_events(str(tmp_path / "missing"))  # logs, does not raise
