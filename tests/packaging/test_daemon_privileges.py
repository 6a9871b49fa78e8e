"""The real pyflowd under the unit's capabilities (no CAP_SYS_ADMIN): the default build
restarts and adopts its pins; the bcc build's restart fails, as bcc reopens pinned maps by id.

Every start runs as the unit runs pyflowd (uid 0, the unit's CapabilityBoundingSet=,
NoNewPrivileges=), in a test namespace with one veth. The unit itself is run under
systemd in test_unit_systemd.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import netns
from tests.packaging.unitfile import capabilities, setpriv_argv
from tests.pins import remove_pin_dir

pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent
DEV = "pft-r0"


@pytest.fixture
def router(tmp_path):
    ns = netns.create(netns.unique("capd"))
    pin_dir = f"/sys/fs/bpf/{ns}"
    netns.run(ns, ["ip", "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p"])
    netns.run(ns, ["ip", "link", "set", DEV, "up"])
    config = tmp_path / "pyflowd.toml"
    # keep: a stop leaves the datapath running, so that the next start must adopt it
    config.write_text(f'[daemon]\non_stop = "keep"\n[[device]]\nname = "{DEV}"\nmode = "tc"\n')
    try:
        yield ns, pin_dir, config, tmp_path
    finally:
        netns.remove(ns)
        remove_pin_dir(pin_dir)


def start(ns: str, pin_dir: str, config: Path, tmp: Path, caps: list[str]) -> subprocess.Popen:
    argv = ["nsenter", f"--net=/run/netns/{ns}", *setpriv_argv(caps), str(BIN / "pyflowd"),
            "--config", str(config), "--socket", str(tmp / "sock"), "--state-dir", str(tmp / "state"),
            "--bpffs-dir", pin_dir, "--metrics-address", ""]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def devices_when_up(proc: subprocess.Popen, tmp: Path, timeout: float = 180) -> dict[str, str]:
    """{device: state} once pyflowd answers; fails with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"pyflowd exited with {proc.returncode}: {proc.stderr.read()}")
        res = subprocess.run([str(BIN / "pyflowctl"), "--socket", str(tmp / "sock"), "--json", "devices"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            return {d["name"]: d["state"] for d in json.loads(res.stdout)["devices"]}
        time.sleep(0.3)
    pytest.fail("pyflowd did not answer in time")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def run_attached(ns: str, pin_dir: str, config: Path, tmp: Path) -> None:
    """Start under the unit's capabilities, see the device attached, stop (status 0)."""
    proc = start(ns, pin_dir, config, tmp, capabilities())
    try:
        assert devices_when_up(proc, tmp) == {DEV: "attached"}
    finally:
        status, err = stop(proc)
    assert status == 0, err


def test_unit_capabilities_restart_and_adopt(router):
    run_attached(*router)
    run_attached(*router)  # on_stop = "keep": this start adopts the pins by path


def test_bcc_build_without_sys_admin_a_restart_fails(router):
    ns, pin_dir, config, tmp = router
    config.write_text(config.read_text().replace("[daemon]\n", '[daemon]\ndatapath_build = "bcc"\n'))
    run_attached(*router)
    again = start(ns, pin_dir, config, tmp, capabilities())
    status, err = stop(again) if again.wait(timeout=180) is not None else (None, "")
    assert status == 1, err
    assert "could not open bpf map" in err and "Operation not permitted" in err, err
