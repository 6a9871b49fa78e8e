"""A link change whose device refresh meets a locked datapath state does not end the loop:
the registry stays as it was, the refresh is retried at the next tick, and the engine still
re-resolves paths."""

from __future__ import annotations

from pyflow.control.runner import ControlPlane
from pyflow.errors import DatapathError


class Registry:
    def __init__(self, failures: int):
        self.failures = failures
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1
        if self.failures:
            self.failures -= 1
            raise DatapathError("/run/pyflow/datapath.json is locked by another process")


class Watcher:
    def poll(self, _timeout: float) -> list[tuple]:
        return [("link", 7)]


class Engine:
    path_passes = 0

    def paths_changed(self) -> None:
        self.path_passes += 1


def _loop_parts(failures: int) -> ControlPlane:
    cp = ControlPlane.__new__(ControlPlane)  # only the parts a path change touches
    cp.devices, cp.watcher, cp.engine = Registry(failures), Watcher(), Engine()
    cp._devices_stale = False
    return cp


def test_locked_state_during_a_link_change_is_retried_not_fatal(caplog):
    cp = _loop_parts(failures=2)
    cp._paths_changed()
    assert cp._devices_stale and cp.engine.path_passes == 1
    cp._refresh_devices_or_later()  # the next tick: still locked
    assert cp._devices_stale
    cp._refresh_devices_or_later()  # the tick after: the lock is gone
    assert not cp._devices_stale and cp.devices.refreshes == 3
    warnings = [r for r in caplog.records if "not refreshed" in r.getMessage()]
    assert len(warnings) == 1  # said once, not at every retry


def test_a_refresh_that_works_leaves_nothing_pending():
    cp = _loop_parts(failures=0)
    cp._paths_changed()
    assert not cp._devices_stale and cp.devices.refreshes == 1 and cp.engine.path_passes == 1
