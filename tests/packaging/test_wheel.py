"""A built wheel carries the datapath twice, and each works installed outside the source
tree (as the unit's /usr/local/bin/pyflowd is), with no checkout to fall back on: the
prebuilt object, loaded with libbpf in a plain virtualenv (no system site packages, so no
bcc) with no compiler on PATH; and the C source, which bcc compiles from the package's own
copy with no PYFLOW_EBPF_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.daemon.process import METRICS_PORT, Pyflowd, in_netns
from tests.support.topology import LAN, UP, V4, topology
from tests.support.traffic import payload, tcp_transfer, wait_for

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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _clean_tree(tmp / "src")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    str(src), "-w", str(wheels)], check=True, capture_output=True, text=True, timeout=300)
    (built,) = wheels.glob("pyflow-*.whl")
    return built


@pytest.fixture(scope="module")
def plain_venv(wheel, tmp_path_factory) -> Path:
    """The wheel in a virtualenv without system site packages (so no bcc)."""
    assert "pyflow/datapath/pyflow_xdp.bpf.o" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    # the dependencies from the package index (pip's cache, warm after `make setup`)
    res = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return venv


def test_wheel_in_a_plain_venv_loads_the_prebuilt_datapath_without_a_compiler(plain_venv, tmp_path):
    venv = plain_venv
    pin_dir = f"/sys/fs/bpf/pft-wheel-{os.getpid()}"
    code = ("import importlib.util, shutil\n"
            "assert importlib.util.find_spec('bcc') is None, 'bcc is importable'\n"
            "assert shutil.which('clang') is None, 'clang on PATH'\n"
            "from pyflow.datapath import bpfobject\n"
            "from pyflow.datapath.loader import Datapath\n"
            "print(bpfobject.object_path())\n"
            f"dp = Datapath({pin_dir!r}, state_file={str(tmp_path / 'state.json')!r})\n"
            "assert dp.build == 'prebuilt' and dp.xdp_prog_id and dp.tc_prog_id\n"
            "dp.destroy()\n"
            "print('loaded')\n")
    env = {"PATH": str(venv / "bin")}  # no clang, no llvm, nothing but the venv's scripts
    res = subprocess.run([str(venv / "bin/python"), "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    where, done = res.stdout.split()
    assert Path(where).is_relative_to(venv) and done == "loaded", res.stdout
    assert (venv / "bin/pyflowd").exists() and (venv / "bin/pyflowctl").exists()


def test_wheel_installs_a_datapath_that_compiles(wheel, tmp_path):
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


class WheelPyflowd(Pyflowd):
    """pyflowd as the plain venv installed it, with nothing but the venv's bin on PATH:
    no compiler, no source tree to import from."""

    def __init__(self, topo, workdir: Path, venv: Path) -> None:
        super().__init__(topo, workdir, devices=())
        self.venv = venv

    def argv(self) -> list[str]:
        nsenter, *rest = in_netns(self.topo.r1)  # by full path: the daemon's PATH has only the venv
        return [shutil.which(nsenter) or nsenter, *rest, str(self.venv / "bin/pyflowd"),
                "--config", str(self.config), "--socket", self.socket, "--state-dir", str(self.state_dir),
                "--bpffs-dir", self.bpffs, "--metrics-address", f"127.0.0.1:{METRICS_PORT}"]

    def environment(self) -> dict[str, str]:
        return {"PATH": str(self.venv / "bin")}


def test_wheel_pyflowd_offloads_a_transfer_through_a_masquerading_router(plain_venv, tmp_path):
    """The issue's end-to-end check: the wheel's pyflowd (plain venv, no clang, no bcc) starts,
    the venv's pyflowctl adds both router ports, and a TCP transfer through the masquerading
    router is byte-exact with most bytes on the fast path."""
    with topology(nat=True) as topo:
        d = WheelPyflowd(topo, tmp_path, plain_venv)
        try:
            t0 = time.monotonic()
            d.start()
            started = time.monotonic() - t0
            ctl = [str(plain_venv / "bin/pyflowctl"), "--socket", d.socket, "add-device"]
            for dev in (LAN, UP):
                res = subprocess.run([*ctl, dev], env={"PATH": str(plain_venv / "bin")}, capture_output=True,
                                     text=True, timeout=60)
                assert res.returncode == 0, res.stderr
            before = d.scrape()["pyflow_fastpath_bytes_total"]
            size = 8 << 20
            res = tcp_transfer(topo.sv, V4["sv"], 5471, topo.cl, V4["sv"], 5471, payload(size, 5471),
                               gate=lambda: wait_for(lambda: d.flow_on(5471), 10))
            assert res.received == size and res.received_sha == res.sent_sha
            def fast_bytes() -> float:
                return d.scrape()["pyflow_fastpath_bytes_total"] - before

            assert wait_for(lambda: fast_bytes() > size * 0.9, 10), f"fast path: {fast_bytes()} bytes"
            print(f"wheel pyflowd answered on its socket {started:.2f} s after start")
        finally:
            d.cleanup()
