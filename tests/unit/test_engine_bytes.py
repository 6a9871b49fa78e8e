"""Bulk installs written as bytes (the real flow table's path) equal those written as objects.

Against the real FlowTable the engine packs a pass's entries straight from each
connection's fields (abi.entry_bytes) and builds FlowKey/FlowAction objects only when
someone asks an Offloaded record for them; against a map that takes objects (the fakes
of test_engine.py) it hands over objects. Two engines, one of each kind, are fed the same
connections (NAT of every kind, IPv4 and IPv6, TCP and UDP, VLAN and PPPoE egress) and
must leave byte-identical maps and equal records, through resync, events, path changes
and removals. No root: the bytes-taking map is a dict filled through flowtable.pack.
"""

from __future__ import annotations

import random
import socket
from dataclasses import replace

from pyflow._native import ffi
from pyflow.control.engine import BATCH, Engine, EngineConfig, ManagedDevice
from pyflow.control.model import (
    IPS_SEEN_REPLY,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    CtEvent,
    Egress,
    EventType,
    Tuple,
)
from pyflow.datapath.abi import FLOW_SIZE, KEY_SIZE, key_bytes, value_bytes
from pyflow.datapath.flowtable import pack, pack_keys
from tests.unit.test_engine import (
    CLIENT_MAC,
    GW2_MAC,
    LAN,
    MAC,
    WAN,
    Clock,
    Devices,
    FakeConntrack,
    FakeFlows,
    FakePaths,
)


class BytesFlows:
    """A flow map that, like FlowTable, takes (key bytes, value bytes) pairs of whole structs."""

    RAW_INSERT = True

    def __init__(self):
        self.entries: dict[bytes, bytes] = {}
        self.calls = 0

    def insert(self, items, *, mode="any"):
        self.calls += 1
        b = pack(items)
        keys = ffi.buffer(b.keys, b.n * KEY_SIZE)[:]
        values = ffi.buffer(b.values, b.n * FLOW_SIZE)[:]
        for i in range(b.n):
            self.entries[keys[i * KEY_SIZE:(i + 1) * KEY_SIZE]] = values[i * FLOW_SIZE:(i + 1) * FLOW_SIZE]
        return b.n

    def delete(self, keys, *, missing_ok=True):
        b = pack_keys(keys)
        raw = ffi.buffer(b.keys, b.n * KEY_SIZE)[:]
        for i in range(b.n):
            self.entries.pop(raw[i * KEY_SIZE:(i + 1) * KEY_SIZE], None)
        return []

    def read_counters(self):
        entries = self.entries

        class _C:
            def as_dict(self):
                return {kb: (0, 0, 0, 0) for kb in entries}
        return _C()


WAN2 = 4  # a second uplink: moving to it changes the reply direction's key (its ingress device)
MACS = {**MAC, WAN2: bytes.fromhex("020000000400")}


class ThreeDevices(Devices):
    def __init__(self):
        self.managed = {i: ManagedDevice(i, tx_port=i * 10, mac=MACS[i]) for i in (LAN, WAN, WAN2)}


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
        out.append(Conn(family, proto, o, r, status=IPS_SEEN_REPLY, tcp_state=state))
    return out


def as_bytes(flows: FakeFlows) -> dict[bytes, bytes]:
    return {key_bytes(k): value_bytes(a, k) for k, a in flows.entries.values()}


def pair(seed: int, n: int):
    rigs = []
    for flows in (BytesFlows(), FakeFlows()):
        ct, paths = FakeConntrack(), EncapPaths()
        eng = Engine(ct, paths, flows, ThreeDevices(), EngineConfig(), clock=Clock())
        for c in conns(n, seed):
            ct.table[c.ident] = c
        rigs.append((eng, ct, paths, flows))
    return rigs


def same(rigs) -> None:
    (a, _, _, fa), (b, _, _, fb) = rigs
    assert fa.entries == as_bytes(fb)
    assert set(a.offloaded) == set(b.offloaded)
    assert set(fa.entries) == {kb for off in a.offloaded.values() for kb in off.key_bytes}  # nothing stale
    for ident, off in a.offloaded.items():
        other = b.offloaded[ident]
        assert off.entries() == other.entries()
        assert off.key_bytes == other.key_bytes == tuple(key_bytes(k) for k in off.keys)
    assert a.stats == b.stats


def test_resync_path_changes_and_removals_agree():
    rigs = pair(1, 2 * BATCH + 17)  # three batches, the last one short
    for eng, *_ in rigs:
        eng.resync()
    same(rigs)
    assert rigs[0][3].calls == 3  # one insert per batch
    qinq = {"vlan_outer_tci": 7, "vlan_outer_tpid": 0x88A8, "vlan_inner_tci": 9}
    steps = (({"vlan_outer_tci": 7}, WAN), (qinq, WAN2), ({"pppoe_sid": 0x1234}, WAN2), ({}, WAN))
    for encap, uplink in steps:
        for eng, _ct, paths, _f in rigs:
            paths.encap = encap
            paths.wan_dev = uplink
            paths.gw_mac = GW2_MAC if paths.gw_mac != GW2_MAC else CLIENT_MAC
            eng.paths_changed()
        same(rigs)
    assert rigs[0][0].stats.rewritten == 4 * len(rigs[0][0].offloaded)
    for eng, ct, _p, _f in rigs:
        gone = list(ct.table)[::3]  # same insertion order in both
        eng.handle([CtEvent(EventType.DESTROY, ct.table[i]) for i in gone])
    same(rigs)
    for eng, *_ in rigs:
        eng.flush()
    same(rigs)
    assert not rigs[0][3].entries


def test_events_in_one_poll_agree():
    rigs = pair(2, 40)
    for eng, ct, _p, _f in rigs:
        events = [CtEvent(EventType.NEW, c) for c in ct.table.values()]
        events.insert(10, CtEvent(EventType.UPDATE, events[3].conn))  # a second event about a queued one
        eng.handle(events)
    same(rigs)
