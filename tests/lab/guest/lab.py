"""Helpers for guest tests: what the lab kernel offers, and progress for the host to show."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

IN_LAB = os.environ.get("PYFLOW_LAB") == "1"
_STARTED = time.monotonic()


def module_loaded(name: str) -> bool:
    """True if kernel module ``name`` is loaded or built in (both show under /sys/module)."""
    return Path("/sys/module", name).is_dir()


def lab_missing() -> str | None:
    """Why this is not the kernel lab, or None if it is."""
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


def lab_log(message: str) -> None:
    """A progress line the lab runner shows while the guest runs (pytest's output of a test
    appears only when it ends; a module fixture may work for minutes before that)."""
    out = os.environ.get("PYFLOW_LAB_OUT")
    if out:
        with open(Path(out) / "progress.log", "a") as f:
            f.write(f"[{time.monotonic() - _STARTED:5.0f} s] {message}\n")
