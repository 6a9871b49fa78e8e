"""The control loop's collector pacing: survivors frozen at every tick, everything looked at
once every GC_FULL_EVERY_S (a cycle among old objects is reclaimed then)."""

from __future__ import annotations

import gc
import weakref

from pyflow.control import runner


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_ticks_freeze_survivors_and_a_full_pass_reclaims_old_cycles(monkeypatch):
    gc.unfreeze()
    try:
        pacer = runner._GcPacer()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, alive for now
        ref = weakref.ref(a)
        pacer.tick()
        assert gc.get_freeze_count() > 0
        del a, b  # garbage now, but frozen: the collector does not look at it
        gc.collect()
        assert ref() is not None
        clock = [pacer.next_full + 1.0]
        monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
        pacer.tick()  # the full pass: unfreeze, collect, freeze again
        assert ref() is None
        assert pacer.next_full == clock[0] + runner.GC_FULL_EVERY_S
    finally:
        gc.unfreeze()
