"""ControlPlane.stop() waits for the loop thread however long the hand-back takes: the
caller closes the maps next, and a thread still deleting from them would hit closed
descriptors and leave connections on the fast path with nobody keeping them alive."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

from pyflow.control import runner
from pyflow.control.runner import ControlPlane


def test_stop_waits_for_a_long_hand_back(monkeypatch, caplog):
    monkeypatch.setattr(runner, "STOP_REPORT_INTERVAL_S", 0.05)
    cp = ControlPlane(datapath=None)  # type: ignore[arg-type]
    handed_back = threading.Event()

    def fake_run() -> None:  # the loop: turn until stopped, then a slow hand-back
        cp._ready.set()
        while not cp._stop.is_set():
            time.sleep(0.01)
        time.sleep(0.4)
        cp.engine.offloaded.clear()
        handed_back.set()

    cp.run = fake_run  # type: ignore[method-assign]
    cp.engine = SimpleNamespace(offloaded={("c", i): None for i in range(3)})  # type: ignore[assignment]
    cp.start()
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        cp.stop()
    assert handed_back.is_set() and not cp.running
    assert any("3 connections left to hand back" in r.getMessage() for r in caplog.records)
