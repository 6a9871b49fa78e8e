"""The entries the engine writes as bytes are the entries its records describe.

Bulk installs and rewrites pack each connection's entries straight from its fields
(abi.entry_bytes), and a record builds FlowKey/FlowAction objects only when asked for
them. Here the map left behind is held to the objects (abi.key_bytes/value_bytes of
every record's keys and actions) through resync, events, path changes (VLAN, QinQ and
PPPoE egress, an uplink that changes the reply key) and removals, for NAT of every kind,
IPv4 and IPv6, TCP and UDP; and an engine fed the same connections one at a time
(``consider``: objects, one insert each) must leave the same map and records. No root:
the map is tests.support.fakes.FakeFlows.
"""

from __future__ import annotations

import random
import socket
from dataclasses import replace

from pyflow.control.engine import BATCH, Engine, EngineConfig
from pyflow.control.model import (
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    CtEvent,
    Egress,
    EventType,
    Tuple,
)
from pyflow.datapath.abi import key_bytes, value_bytes
from tests.support.fakes import (
    CLIENT_MAC,
    GW2_MAC,
    LAN,
    LIVE,
    MAC,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
)

WAN2 = 4  # a second uplink: moving to it changes the reply direction's key (its ingress device)
MACS = {**MAC, WAN2: bytes.fromhex("020000000400")}


class EncapPaths(FakePaths):
    """FakePaths whose uplink can carry VLAN tags or PPPoE, and IPv6 on the same devices."""

    def __init__(self):
        super().__init__()
        self.encap: dict = {}

    def device_of(self, family, addr, *, mark):
        if family == socket.AF_INET6:
            return LAN if addr.startswith("2001:2:1:") else self.wan_dev
        return super().device_of(family, addr, mark=mark)

    def egress(self, family, src, dst, *, iif, mark):
        dev = self.device_of(family, dst, mark=mark)
        mac = self.client_mac if dev == LAN else self.gw_mac
        eg = Egress(ifindex=dev, ifname=f"if{dev}", smac=MACS[dev], dmac=mac, mtu=1500)
        return replace(eg, **self.encap) if dev != LAN else eg


def conns(n: int, seed: int) -> list[Conn]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        proto = rnd.choice([socket.IPPROTO_TCP, socket.IPPROTO_UDP])
        state = TCP_CONNTRACK_ESTABLISHED if proto == socket.IPPROTO_TCP else None
        kind = rnd.choice(["masq", "dnat", "plain", "v6", "masq_keep_port"])
        sport = 10000 + i
        if kind == "v6":
            o = Tuple("2001:2:1::10", "2001:2:9::50", sport, 443)
            r = Tuple("2001:2:9::50", "2001:2:1::10", 443, sport)
            family = socket.AF_INET6
        else:
            family = socket.AF_INET
            o = Tuple("198.18.0.10", "198.19.0.50", sport, 443)
            if kind == "masq":
                r = Tuple("198.19.0.50", "198.19.0.1", 443, 40000 + i)
            elif kind == "masq_keep_port":
                r = Tuple("198.19.0.50", "198.19.0.1", 443, sport)
            elif kind == "dnat":
                o = Tuple("198.19.0.77", "198.19.0.1", sport, 8080)
                r = Tuple("198.18.0.20", "198.19.0.77", 80, sport)
            else:
                r = Tuple("198.19.0.50", "198.18.0.10", 443, sport)
        out.append(Conn(family, proto, o, r, status=LIVE, tcp_state=state))
    return out


def described(eng: Engine) -> dict[bytes, bytes]:
    """The map eng's records describe, packed from FlowKey/FlowAction objects."""
    out = {}
    for off in eng.offloaded.values():
        keys, actions = off.entries()
        for k, a in zip(keys, actions, strict=True):
            out[key_bytes(k)] = value_bytes(a, k)
    return out


def rig(seed: int, n: int):
    ct, paths, flows = FakeConntrack(), EncapPaths(), FakeFlows()
    eng = Engine(ct, paths, flows, FakeDevices((LAN, WAN, WAN2), MACS), EngineConfig(), clock=Clock())
    for c in conns(n, seed):
        ct.table[c.ident] = c
    return eng, ct, paths, flows


def check(eng: Engine, flows: FakeFlows) -> None:
    assert flows.entries == described(eng)  # nothing stale, nothing missing, every byte
    for off in eng.offloaded.values():
        assert off.key_bytes == tuple(key_bytes(k) for k in off.keys)


def same(a: Engine, fa: FakeFlows, b: Engine, fb: FakeFlows) -> None:
    assert fa.entries == fb.entries
    assert set(a.offloaded) == set(b.offloaded)
    for ident, off in a.offloaded.items():
        assert off.entries() == b.offloaded[ident].entries()
        assert off.key_bytes == b.offloaded[ident].key_bytes
    assert a.stats == b.stats


def test_resync_path_changes_and_removals_write_what_the_records_say():
    eng, ct, paths, flows = rig(1, 2 * BATCH + 17)  # three batches, the last one short
    eng.resync()
    check(eng, flows)
    assert flows.inserts == 3  # one insert per batch
    qinq = {"vlan_outer_tci": 7, "vlan_outer_tpid": 0x88A8, "vlan_inner_tci": 9}
    steps = (({"vlan_outer_tci": 7}, WAN), (qinq, WAN2), ({"pppoe_sid": 0x1234}, WAN2), ({}, WAN))
    for encap, uplink in steps:
        paths.encap = encap
        paths.wan_dev = uplink
        paths.gw_mac = GW2_MAC if paths.gw_mac != GW2_MAC else CLIENT_MAC
        eng.paths_changed()
        check(eng, flows)
    assert eng.stats.rewritten == 4 * len(eng.offloaded)
    gone = list(ct.table)[::3]
    eng.handle([CtEvent(EventType.DESTROY, ct.table[i]) for i in gone])
    check(eng, flows)
    eng.flush()
    assert not flows.entries and not eng.offloaded


def test_bulk_installs_equal_one_by_one_installs():
    (a, _ct_a, _pa, fa), (b, ct_b, _pb, fb) = rig(3, 2 * BATCH + 5), rig(3, 2 * BATCH + 5)
    a.resync()
    for conn in ct_b.table.values():
        b.consider(conn)
    assert fb.inserts == len(ct_b.table) and fa.inserts == 3
    b.stats.resyncs = a.stats.resyncs  # the only count that differs: b never resynced
    same(a, fa, b, fb)
    check(a, fa)


def test_events_in_one_poll_equal_one_by_one_installs():
    (a, ct_a, _pa, fa), (b, _ct_b, _pb, fb) = rig(2, 40), rig(2, 40)
    events = [CtEvent(EventType.NEW, c) for c in ct_a.table.values()]
    events.insert(10, CtEvent(EventType.UPDATE, events[3].conn))  # a second event about a queued one
    a.handle(events)
    for ev in events:
        b.consider(ev.conn)
    same(a, fa, b, fb)
    check(a, fa)
