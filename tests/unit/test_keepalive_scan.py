"""The keep-alive scan in C (csrc/keepalive.c) decides as its Python model does
(tests/support/keepalive_model.py).

The engine's tick matches the flow table's counter arrays against every connection on
the XDP path in C. Here the C scan and the model see the same random states (hits,
FIN/RST flags, vanished entries, idle time, last-seen times ahead of the clock,
duplicate keys in the walk, conntrack deadlines running low) and must agree verdict for
verdict and leave the same packet counts, last-seen times and deadlines; then whole
keep-alive sessions of an engine are held to the model tick by tick. No root: the map
is tests.support.fakes.FakeFlows, whose counters are real counter arrays.
"""

from __future__ import annotations

import random
import socket
from collections import Counter

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.keepalive import EXTEND, extend_ns
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

HOLD_S = 20  # conntrack timeout while offloaded: extended when less than 10 s are left


def rig(n: int, seed: int):
    ct, paths, flows, clock = FakeConntrack(), FakePaths(), FakeFlows(), Clock()
    eng = Engine(ct, paths, flows, FakeDevices(), EngineConfig(idle_timeout_s=5, conntrack_timeout_s=HOLD_S),
                 clock=clock)
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
        p, b, closing = flows.counters(kb)
        if r < 0.5:
            flows.set_counters(kb, p + rnd.randrange(1, 50), b + 100, closing)
        elif r < 0.52:
            flows.set_counters(kb, p, b, 1)
        elif r < 0.54:
            flows.delete([kb])


def tracked(eng: Engine) -> dict[tuple, model.Tracked]:
    return {ident: model.Tracked(off.key_bytes, *eng.slots.activity(off))
            for ident, off in eng.offloaded.items() if not off.hw}


@pytest.mark.parametrize("seed", range(6))
def test_c_scan_and_model_agree(seed):
    rnd = random.Random(seed)
    eng, _ct, flows, clock = rig(300, seed)
    idle_ns, ext_ns = int(eng.config.idle_timeout_s * 1e9), extend_ns(HOLD_S)
    seen = Counter()
    for _ in range(25):
        disturb(rnd, eng, flows, clock)
        rows = list(flows.read_counters().rows())
        if rows and rnd.random() < 0.5:
            rows.insert(rnd.randrange(len(rows)), (rows[0][0], (999, 0, 0)))  # a duplicate, earlier
        before = tracked(eng)
        want, after = model.scan(before, rows, clock.now, idle_ns, ext_ns)
        got = eng.slots.scan(counters_of(rows), clock.now, idle_ns, ext_ns)
        assert {ident: what for ident, _off, what in got} == want
        assert tracked(eng) == after
        seen.update(want.values())
        # act on the verdicts as a tick would, so that the next round starts from a new state
        for ident, off, what in got:
            if what == EXTEND:
                eng.held(off, clock.now + HOLD_S * SEC)
            else:
                eng.remove(ident, "test", tell_conntrack=True)
    assert len(seen) == 4  # every verdict came up


def test_whole_sessions_follow_the_model():
    """An engine ticks through random traffic; before every tick the model says what the
    tick must do: remove the MISSING, CLOSING and IDLE ones, write conntrack's timeout of
    the EXTEND ones again, and nothing else: moving packets cost no conntrack message."""
    eng, ct, flows, clock = rig(200, 1)
    rnd = random.Random(7)
    idle_ns, ext_ns = int(eng.config.idle_timeout_s * 1e9), extend_ns(HOLD_S)
    for _ in range(40):
        disturb(rnd, eng, flows, clock)
        before = tracked(eng)
        want, after = model.scan(before, flows.read_counters().rows(), clock.now, idle_ns, ext_ns)
        refreshed = len(ct.refreshed)
        eng.tick()
        extended = {ident for ident, what in want.items() if what == EXTEND}
        assert set(eng.offloaded) == set(before) - (set(want) - extended)
        assert Counter(ct.refreshed[refreshed:]) == Counter((i, HOLD_S) for i in extended)
        now = tracked(eng)
        for ident in set(eng.offloaded):
            deadline = clock.now + HOLD_S * SEC if ident in extended else after[ident].ct_deadline_ns
            a = after[ident]
            assert now[ident] == model.Tracked(a.keys, a.packets, a.last_seen_ns, deadline)
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
