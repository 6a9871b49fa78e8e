"""A built wheel carries the datapath source: installed outside the source tree (as the
unit's /usr/local/bin/pyflowd is), pyflow compiles its datapath from the package's own
copy, with no PYFLOW_EBPF_DIR and no checkout to fall back on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: its site packages hold bcc (python3-bpfcc)

pytestmark = pytest.mark.root


def _clean_tree(dest: Path) -> Path:
    """The tracked files only: a build/ left in the checkout would leak into the wheel."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


def test_wheel_installs_a_datapath_that_compiles(tmp_path):
    src = _clean_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    str(src), "-w", str(wheels)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("pyflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted(p.relative_to(ROOT) for p in (ROOT / "ebpf").rglob("*") if p.is_file()):
        assert f"pyflow/{src}" in names, f"the wheel lacks {src}"

    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=120)
    assert (venv / "bin/pyflowd").exists() and (venv / "bin/pyflowctl").exists()
    code = ("from pyflow.datapath import bpfsource\n"
            "print(bpfsource.EBPF_DIR)\n"
            "bpfsource.compile_datapath(defines={'PYFLOW_MAX_FLOWS': 16})\n"
            "print('compiled')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYFLOW_EBPF_DIR", "PYTHONPATH")}
    res = subprocess.run([str(venv / "bin/python"), "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    where, done = res.stdout.split()
    assert Path(where).is_relative_to(venv) and done == "compiled", res.stdout
