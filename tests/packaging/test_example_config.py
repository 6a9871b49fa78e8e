"""packaging/pyflowd.toml is valid for pyflowd and shows every key with its default."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from pyflow.daemon.config import DaemonConfig, DeviceConfig, OffloadConfig, load
from tests.packaging.unitfile import REPO

EXAMPLE = REPO / "packaging" / "pyflowd.toml"


def test_check_config_accepts_the_example():
    pyflowd = Path(sys.executable).parent / "pyflowd"
    res = subprocess.run([str(pyflowd), "check-config", str(EXAMPLE)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "valid (2 device(s))" in res.stdout


@pytest.mark.parametrize(("section", "cls"), [("daemon", DaemonConfig), ("offload", OffloadConfig)])
def test_example_shows_every_key_with_its_default(section, cls):
    written = tomllib.loads(EXAMPLE.read_text())[section]
    assert set(written) == {f.name for f in fields(cls)}
    assert getattr(load(str(EXAMPLE)), section) == cls()


def test_example_devices_use_the_default_mode():
    assert {d.mode for d in load(str(EXAMPLE)).devices} == {DeviceConfig("x").mode}
