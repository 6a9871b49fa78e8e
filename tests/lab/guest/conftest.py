"""Guest tests run inside the kernel lab (tests/lab/run.py boots Debian's stock kernel).

On any other kernel they skip, naming what is missing: the lab's environment variable (set
by the runner) or the cls_flower classifier the lab kernel is there for. Helpers for guest
tests (module checks, progress lines) are in lab.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab.guest.lab import lab_missing, module_loaded, require_modules  # noqa: F401 (also offered here)
from tests.support.flower import flower_missing


def pytest_configure(config):
    config.addinivalue_line("markers", "lab_full: only in the full lab run (make lab-parity)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYFLOW_LAB_FULL") != "1":
        # the longer cases of a guest test run in `make lab-parity`; `make lab` keeps its budget
        full = [item for item in items if item.get_closest_marker("lab_full")]
        if full:
            config.hook.pytest_deselected(items=full)
            items[:] = [item for item in items if not item.get_closest_marker("lab_full")]
    reason = lab_missing()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """Where guest tests write figures for the host: the repository's bench-results/."""
    path = Path(os.environ.get("PYFLOW_LAB_RESULTS", "bench-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def flower_kernel():
    """Skips the module's tests unless the flower classifier and its actions load."""
    why = flower_missing()
    if why is not None:
        pytest.skip(f"this kernel has no TC flower and its actions ({why}); run through the kernel lab")

