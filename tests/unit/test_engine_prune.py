"""The resync's prune deletes exactly the map entries no offloaded connection owns: the
map's keys are matched against the keep-alive slots in C, where a freed slot holds its
last keys still (it is not in use: they are not owned)."""

from __future__ import annotations

from pyflow.control.engine import Engine, EngineConfig
from pyflow.datapath.abi import FlowAction, FlowKey, key_bytes
from tests.support.fakes import (
    GW_MAC,
    LAN,
    MAC,
    UDP,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    counters_of,
    masq_conn,
    offer,
)


def test_prune_deletes_what_no_connection_owns_and_keeps_the_rest():
    ct, flows = FakeConntrack(), FakeFlows()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(), clock=Clock())
    conns = [masq_conn(proto=UDP, sport=33000 + i) for i in range(5)]
    for conn in conns:
        offer(eng, ct, conn)
    gone = eng.offloaded[conns[1].ident]
    left_behind = dict((kb, flows.entries[kb]) for kb in gone.key_bytes)
    eng.remove(conns[1].ident, "destroyed", tell_conntrack=False)  # its slot is free now
    eng.remove(conns[3].ident, "destroyed", tell_conntrack=False)
    flows.entries.update(left_behind)  # its entries back, as a crashed writer could leave them
    ghost = FlowKey(LAN, UDP, "198.18.0.99", "198.19.0.9", 1, 2)
    flows.insert([(ghost, FlowAction(WAN, 30, 1500, MAC[LAN], GW_MAC, MAC[WAN]))])
    again = masq_conn(proto=UDP, sport=33100)
    offer(eng, ct, again)  # takes a freed slot
    owned = {kb for off in eng.offloaded.values() for kb in off.key_bytes}
    assert eng.prune() == 3
    assert set(flows.entries) == owned and key_bytes(ghost) not in flows.entries
    assert eng.stats.removed["stray_entry"] == 3


def test_a_key_read_twice_is_stray_twice_or_owned_twice():
    ct, flows = FakeConntrack(), FakeFlows()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), EngineConfig(), clock=Clock())
    conn = masq_conn(proto=UDP, sport=34000)
    offer(eng, ct, conn)
    ko, kr = eng.offloaded[conn.ident].key_bytes
    ghost = key_bytes(FlowKey(LAN, UDP, "198.18.0.99", "198.19.0.9", 1, 2))
    row = (0, 0, 0)
    read = counters_of([(ko, row), (ghost, row), (kr, row), (ko, row), (ghost, row)])
    assert eng.slots.unowned(read) == [ghost, ghost]
    assert eng.slots.unowned(counters_of([])) == []
