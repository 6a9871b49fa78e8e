"""Guest tests run inside the kernel lab (tests/lab/run.py boots Debian's stock kernel).

On any other kernel they skip, naming what is missing: the lab's environment variable (set
by the runner) or the cls_flower classifier the lab kernel is there for. Inside the lab a
test that needs a module the runner could not load skips naming that module.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

IN_LAB = os.environ.get("PYFLOW_LAB") == "1"


def module_loaded(name: str) -> bool:
    """True if kernel module ``name`` is loaded or built in (both show under /sys/module)."""
    return Path("/sys/module", name).is_dir()


def lab_missing() -> str | None:
    if not IN_LAB:
        return "needs the kernel lab (make lab): PYFLOW_LAB is not set, this is not the lab kernel"
    if not module_loaded("cls_flower"):
        return f"kernel {platform.release()} has no cls_flower: not the lab kernel"
    return None


def require_modules(*names: str) -> None:
    """Skip the calling test unless every module in ``names`` is available."""
    missing = [n for n in names if not module_loaded(n)]
    if missing:
        pytest.skip(f"kernel {platform.release()} lacks module(s): {', '.join(missing)}")


def pytest_collection_modifyitems(config, items):
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
