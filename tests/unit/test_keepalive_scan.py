"""The keep-alive scan in C (csrc/keepalive.c) decides exactly as the engine's Python scan.

The engine's tick matches the flow table's counter arrays against every offloaded
connection in C when the map gives arrays (the real FlowTable), and in Python from a
dict otherwise (the fakes of test_engine.py). Here both run on the same random states
(hits, FIN/RST flags, vanished entries, idle time, duplicate keys in the dump) and must
agree verdict for verdict and leave the same packet counts and last-seen times; then
two engines, one per path, run whole keep-alive sessions side by side. No root needed:
the counter arrays are built in memory.
"""

from __future__ import annotations

import random
import socket
from collections import Counter

import pytest

from pyflow._native import ffi, lib
from pyflow.control.engine import Engine, EngineConfig
from pyflow.datapath.flowtable import COUNTERS_TYPE, Counters
from tests.unit.test_engine import SEC, Clock, Devices, FakeConntrack, FakeFlows, FakePaths, masq_conn

KEY_TYPE = "struct pyflow_flow_key"


def as_counters(rows: list[tuple[bytes, tuple[int, int, int, int]]]) -> Counters:
    """A Counters object (what FlowTable.read_counters returns) holding ``rows`` in order."""
    n = len(rows)
    keys = ffi.new(f"{KEY_TYPE}[]", max(n, 1))
    counters = ffi.new(f"{COUNTERS_TYPE}[]", max(n, 1))
    for i, (kb, (packets, nbytes, seen, closing)) in enumerate(rows):
        ffi.memmove(keys + i, kb, len(kb))
        c = counters[i]
        c.packets, c.bytes, c.last_seen_ns, c.closing = packets, nbytes, seen, closing
    return Counters(keys, counters, n)


class ArrayFlows(FakeFlows):
    """FakeFlows whose counters come as arrays, like the real table's (so the engine scans in C)."""

    def read_counters(self):
        return as_counters(list(self.counters.items()))


def rig(flows_cls, n: int, seed: int):
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), flows_cls(), Clock()
    eng = Engine(ct, paths, flows, Devices(), EngineConfig(idle_timeout_s=5), clock=clock)
    rnd = random.Random(seed)
    for i in range(n):
        conn = masq_conn(proto=rnd.choice([socket.IPPROTO_TCP, socket.IPPROTO_UDP]), sport=20000 + i)
        ct.table[conn.ident] = conn
    eng.resync()
    return eng, ct, flows, clock


def disturb(rnd: random.Random, eng, flows, clock) -> None:
    """Hits, closing flags and vanished entries on random connections; time moves on."""
    clock.now += rnd.choice([0, SEC // 2, SEC, 3 * SEC, 6 * SEC])
    for off in list(eng.offloaded.values()):
        r = rnd.random()
        kb = off.key_bytes[rnd.randrange(2)]
        if kb not in flows.counters:
            continue
        p, b, seen, closing = flows.counters[kb]
        if r < 0.3:
            seen = clock.now - rnd.randrange(0, SEC)
            flows.counters[kb] = (p + rnd.randrange(1, 50), b + 100, seen, closing)
        elif r < 0.33:
            flows.counters[kb] = (p, b, seen, 1)
        elif r < 0.35:
            del flows.counters[kb]
            flows.entries.pop(kb, None)
        elif r < 0.37:
            flows.counters[kb] = (p, b, clock.now + SEC, closing)  # last_seen ahead of our clock


@pytest.mark.parametrize("seed", range(6))
def test_native_and_python_scans_agree(seed):
    rnd = random.Random(seed)
    eng, _ct, flows, clock = rig(FakeFlows, 300, seed)
    idle_ns = int(eng.config.idle_timeout_s * 1e9)
    for _ in range(25):
        disturb(rnd, eng, flows, clock)
        rows = list(flows.counters.items())
        if rows and rnd.random() < 0.5:
            rows.insert(rnd.randrange(len(rows)), (rows[0][0], (999, 0, 0, 0)))  # a duplicate, earlier
        before = {i: (o.packets, o.last_seen_ns) for i, o in eng.offloaded.items()}
        native = eng._scan_native(as_counters(rows), clock.now, idle_ns)
        assert native is not None
        after_native = {i: (o.packets, o.last_seen_ns) for i, o in eng.offloaded.items()}
        for ident, off in eng.offloaded.items():  # back to where we were, in the slots too
            off.packets, off.last_seen_ns = before[ident]
            eng._slots.write(off.slot, off)
        python = eng._scan(dict(rows), clock.now, idle_ns)
        assert {i: w for i, _o, w in native} == {i: w for i, _o, w in python}
        assert {i: (o.packets, o.last_seen_ns) for i, o in eng.offloaded.items()} == after_native
        # act on the verdicts as a tick would, so that the next round starts from a new state
        for ident, _off, what in python:
            if what != lib.PYFLOW_KA_MOVED:
                eng._remove(ident, "test", tell_conntrack=True)


def test_whole_sessions_match():
    """Two engines, C scan and Python scan, see the same traffic: same outcome, every tick."""
    (a, ct_a, fa, clk_a), (b, ct_b, fb, clk_b) = rig(ArrayFlows, 200, 1), rig(FakeFlows, 200, 1)
    ra, rb = random.Random(7), random.Random(7)
    for _ in range(40):
        disturb(ra, a, fa, clk_a)
        disturb(rb, b, fb, clk_b)
        a.tick()
        b.tick()
        assert set(a.offloaded) == set(b.offloaded)
        assert a.stats == b.stats
        assert ct_a.marked == ct_b.marked and Counter(ct_a.refreshed) == Counter(ct_b.refreshed)
    assert set(a.stats.removed) == {"entry_missing", "fin_rst", "idle"} and a.stats.refreshes  # every kind


def test_slots_are_reused_and_grow():
    eng, ct, flows, clock = rig(ArrayFlows, 600, 3)  # past the first 256 slots: the arrays grew
    assert eng._slots.top == 600 and eng._slots.cap >= 600
    for off in list(eng.offloaded.values())[:100]:
        del ct.table[off.conn.ident]
    eng.resync()
    assert len(eng._slots.free) == 100
    for i in range(50):
        conn = masq_conn(sport=30000 + i)
        ct.table[conn.ident] = conn
    eng.resync()
    assert eng._slots.top == 600 and len(eng._slots.free) == 50
    clock.now += 10 * SEC  # everything idle now
    eng.tick()
    assert not eng.offloaded and eng.stats.removed.get("idle") == 550
