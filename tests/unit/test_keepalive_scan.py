"""The keep-alive scan in C (csrc/keepalive.c) decides as its Python model does
(tests/support/keepalive_model.py).

The engine's tick matches the flow table's counter arrays against every connection on
the XDP path in C. Here the C scan and the model see the same random states (hits,
FIN/RST flags, vanished entries, idle time, last-seen times ahead of the clock,
duplicate keys in the walk) and must agree verdict for verdict and leave the same packet
counts and last-seen times; then whole keep-alive sessions of an engine are held to the
model tick by tick. No root: the map is tests.support.fakes.FakeFlows, whose counters
are real counter arrays.
"""

from __future__ import annotations

import random
import socket
from collections import Counter

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.keepalive import MOVED
from tests.support import keepalive_model as model
from tests.support.fakes import (
    SEC,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    counters_of,
    masq_conn,
)


def rig(n: int, seed: int):
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), FakeFlows(), Clock()
    eng = Engine(ct, paths, flows, FakeDevices(), EngineConfig(idle_timeout_s=5), clock=clock)
    rnd = random.Random(seed)
    for i in range(n):
        conn = masq_conn(proto=rnd.choice([socket.IPPROTO_TCP, socket.IPPROTO_UDP]), sport=20000 + i)
        ct.table[conn.ident] = conn
    eng.resync()
    return eng, ct, flows, clock


def disturb(rnd: random.Random, eng: Engine, flows: FakeFlows, clock: Clock) -> None:
    """Hits, closing flags and vanished entries on random connections; time moves on."""
    clock.now += rnd.choice([0, SEC // 2, SEC, 3 * SEC, 6 * SEC])
    for off in list(eng.offloaded.values()):
        r = rnd.random()
        kb = off.key_bytes[rnd.randrange(2)]
        if kb not in flows.entries:
            continue
        p, b, seen, closing = flows.counters(kb)
        if r < 0.3:
            seen = clock.now - rnd.randrange(0, SEC)
            flows.set_counters(kb, p + rnd.randrange(1, 50), b + 100, seen, closing)
        elif r < 0.33:
            flows.set_counters(kb, p, b, seen, 1)
        elif r < 0.35:
            flows.delete([kb])
        elif r < 0.37:
            flows.set_counters(kb, p, b, clock.now + SEC, closing)  # last_seen ahead of our clock


def tracked(eng: Engine) -> dict[tuple, model.Tracked]:
    return {ident: model.Tracked(off.key_bytes, off.packets, off.last_seen_ns)
            for ident, off in eng.offloaded.items() if not off.hw}


@pytest.mark.parametrize("seed", range(6))
def test_c_scan_and_model_agree(seed):
    rnd = random.Random(seed)
    eng, _ct, flows, clock = rig(300, seed)
    idle_ns = int(eng.config.idle_timeout_s * 1e9)
    for _ in range(25):
        disturb(rnd, eng, flows, clock)
        rows = list(flows.read_counters().rows())
        if rows and rnd.random() < 0.5:
            rows.insert(rnd.randrange(len(rows)), (rows[0][0], (999, 0, 0, 0)))  # a duplicate, earlier
        before = tracked(eng)
        want = model.scan(before, rows, clock.now, idle_ns)
        got = eng.slots.scan(counters_of(rows), clock.now, idle_ns)
        assert {ident: what for ident, _off, what in got} == {ident: w for ident, (w, _t) in want.items()}
        after = {ident: want[ident][1] if ident in want else t for ident, t in before.items()}
        assert tracked(eng) == after
        # act on the verdicts as a tick would, so that the next round starts from a new state
        for ident, _off, what in got:
            if what != MOVED:
                eng.remove(ident, "test", tell_conntrack=True)


def test_whole_sessions_follow_the_model():
    """An engine ticks through random traffic; before every tick the model says what the
    tick must do: remove the MISSING, CLOSING and IDLE ones, refresh the MOVED ones."""
    eng, ct, flows, clock = rig(200, 1)
    rnd = random.Random(7)
    idle_ns = int(eng.config.idle_timeout_s * 1e9)
    for _ in range(40):
        disturb(rnd, eng, flows, clock)
        before = tracked(eng)
        want = model.scan(before, flows.read_counters().rows(), clock.now, idle_ns)
        refreshed = len(ct.refreshed)
        eng.tick()
        moved = {ident for ident, (what, _t) in want.items() if what == MOVED}
        assert set(eng.offloaded) == set(before) - (set(want) - moved)
        assert Counter(i for i, _t in ct.refreshed[refreshed:]) == Counter(moved)
        assert all(tracked(eng)[ident] == want[ident][1] for ident in moved)
        assert ct.marked == set(eng.offloaded)
    assert set(eng.stats.removed) == {"entry_missing", "fin_rst", "idle"}  # every kind happened
    assert eng.stats.refreshes


def test_slots_are_reused_and_grow():
    eng, ct, flows, clock = rig(600, 3)  # past the first 256 slots: the arrays grew
    assert eng.slots.top == 600 and eng.slots.cap >= 600
    for off in list(eng.offloaded.values())[:100]:
        del ct.table[off.conn.ident]
    eng.resync()
    assert len(eng.slots.free) == 100
    for i in range(50):
        conn = masq_conn(sport=30000 + i)
        ct.table[conn.ident] = conn
    eng.resync()
    assert eng.slots.top == 600 and len(eng.slots.free) == 50
    clock.now += 10 * SEC  # everything idle now
    eng.tick()
    assert not eng.offloaded and eng.stats.removed.get("idle") == 550
