"""A pass's claims (mark, be-liberal, long timeout) go to conntrack in one batch when the
adapter can send one (CtNetlink.mark_offloaded_many): the same answers as one by one, before
any entry is written; a connection whose claim finds it gone is counted 'gone' and gets no
entries, the others go in, both directions each."""

from __future__ import annotations

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import CtEvent, EventType
from tests.support.fakes import Clock, FakeConntrack, FakeDevices, FakeFlows, FakePaths, masq_conn

CONFIG = EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120)


class BatchingConntrack(FakeConntrack):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple]] = []
        self.log: list[str] = []

    def mark_offloaded(self, conn, offloaded, *, timeout_s=None):
        self.log.append("mark")
        return super().mark_offloaded(conn, offloaded, timeout_s=timeout_s)

    def mark_offloaded_many(self, conns, offloaded, *, timeout_s=None):
        self.log.append(f"batch {len(conns)}")
        self.batches.append([c.ident for c in conns])
        return [FakeConntrack.mark_offloaded(self, c, offloaded, timeout_s=timeout_s) for c in conns]


def rig():
    ct, flows = BatchingConntrack(), FakeFlows()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(), CONFIG, clock=Clock())
    insert = flows.insert

    def inserting(items, **kw):
        ct.log.append("insert")
        return insert(items, **kw)

    flows.insert = inserting
    return eng, ct, flows


def test_a_pass_claims_its_connections_in_one_batch_and_counts_the_gone():
    eng, ct, flows = rig()
    conns = [masq_conn(sport=41000 + i) for i in range(5)]
    for c in conns:
        ct.table[c.ident] = c
    gone = conns[2]
    del ct.table[gone.ident]  # conntrack dropped it between the event and the claim
    eng.handle([CtEvent(EventType.UPDATE, c) for c in conns])
    assert ct.batches == [[c.ident for c in conns]]
    assert ct.log[:2] == ["batch 5", "insert"]  # claimed before any entry exists
    assert "mark" not in ct.log
    assert set(eng.offloaded) == {c.ident for c in conns if c is not gone}
    assert eng.stats.refused == {"gone": 1}
    assert len(flows.entries) == 8  # both directions of each of the four
    assert all(ct.timeout[c.ident] == 120 for c in conns if c is not gone)


def test_a_single_connection_and_an_adapter_without_batches_claim_one_by_one():
    eng, ct, flows = rig()
    c = masq_conn(sport=42000)
    ct.table[c.ident] = c
    eng.handle([CtEvent(EventType.UPDATE, c)])
    assert ct.batches == [] and ct.log[0] == "mark" and c.ident in eng.offloaded

    plain, flows2 = FakeConntrack(), FakeFlows()
    eng2 = Engine(plain, FakePaths(), flows2, FakeDevices(), CONFIG, clock=Clock())
    conns = [masq_conn(sport=43000 + i) for i in range(3)]
    for x in conns[1:]:
        plain.table[x.ident] = x
    eng2.handle([CtEvent(EventType.UPDATE, x) for x in conns])
    assert len(eng2.offloaded) == 2 and eng2.stats.refused == {"gone": 1} and len(flows2.entries) == 4
