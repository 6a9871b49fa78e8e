"""A request answered as failed because the control loop did not answer in time must not
run later: a call still queued when its caller gives up is cancelled; one the loop had
already started is answered "still running" (and completes)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from pyflow.control.runner import ControlPlane
from pyflow.daemon import main as pyflowd
from pyflow.errors import RequestError


class StuckLoop:
    """A control plane whose loop runs queued calls only while ``gate`` is open (as the
    real loop does while the conntrack lock or a long resync holds it)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.cp = ControlPlane(datapath=None)  # type: ignore[arg-type]
        self.turns = 0

        def run() -> None:
            self.cp._ready.set()
            while not self.cp._stop.is_set():
                if self.gate.wait(0.02):
                    self.cp._run_calls()
                    self.turns += 1

        self.cp.run = run  # type: ignore[method-assign]
        self.cp.start()

    def settle(self) -> None:
        """Open the gate and wait (bounded) until the loop has gone round a few times."""
        self.gate.set()
        start = self.turns
        for _ in range(500):
            if self.turns >= start + 3:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the loop did not turn")

    def stop(self) -> None:
        self.gate.set()
        self.cp.stop(hand_back=False)


@pytest.fixture
def stuck():
    loop = StuckLoop()
    yield loop
    loop.stop()


def _daemon(cp: ControlPlane, **handlers) -> pyflowd.Daemon:
    d = pyflowd.Daemon(config=SimpleNamespace(), config_arg=None, overrides={},  # type: ignore[arg-type]
                       notifier=pyflowd.Notifier(env={}))
    d.ops = SimpleNamespace(cp=cp, handlers=lambda: handlers)
    return d


def test_add_device_answered_busy_never_runs_later(stuck, monkeypatch):
    monkeypatch.setattr(pyflowd, "REQUEST_TIMEOUT_S", 0.3)
    attached = []
    d = _daemon(stuck.cp, **{"add-device": lambda a: attached.append(a["name"]) or {}})
    with pytest.raises(RequestError) as info:
        d._request("add-device", {"name": "eth1"})
    stuck.settle()  # the lock is released: the loop goes round again
    assert attached == []
    assert info.value.code == "busy" and "not run" in str(info.value)


def test_add_device_that_started_is_answered_still_running_and_completes(stuck, monkeypatch):
    monkeypatch.setattr(pyflowd, "REQUEST_TIMEOUT_S", 0.3)
    release, attached = threading.Event(), []

    def slow_attach(args):
        release.wait(30)
        attached.append(args["name"])
        return {}

    d = _daemon(stuck.cp, **{"add-device": slow_attach})
    stuck.gate.set()
    with pytest.raises(RequestError) as info:
        d._request("add-device", {"name": "eth1"})
    assert info.value.code == "still_running" and "still running" in str(info.value)
    release.set()
    stuck.settle()
    assert attached == ["eth1"]


def test_reload_that_timed_out_is_not_applied_later(stuck, monkeypatch, caplog):
    monkeypatch.setattr(pyflowd, "REQUEST_TIMEOUT_S", 0.3)
    monkeypatch.setattr(pyflowd, "_set_log_level", lambda name: None)
    reloads = []
    d = _daemon(stuck.cp)
    d.ops.reload = reloads.append
    d.ops.config = "new"
    d.reload()
    stuck.settle()
    assert reloads == [] and d.config != "new"
    assert any("reload failed" in r.getMessage() and "not run" in r.getMessage() for r in caplog.records)


def test_a_call_that_finishes_in_time_answers_normally(stuck):
    stuck.gate.set()
    assert stuck.cp.call(lambda: 42, 5.0) == 42
    with pytest.raises(ZeroDivisionError):
        stuck.cp.call(lambda: 1 / 0, 5.0)
