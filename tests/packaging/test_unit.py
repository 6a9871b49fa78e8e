"""packaging/systemd/pyflowd.service: systemd accepts it, and it agrees with the example config.

``systemd-analyze verify`` works without systemd as PID 1, but it checks that ExecStart's
binary exists: the unit names the system-wide install path (/usr/local/bin/pyflowd),
which a development checkout does not have, so a copy whose ExecStart points at this
environment's pyflowd is verified instead; every other line is the unit's own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.packaging.unitfile import REPO, UNIT, settings

EXAMPLE = REPO / "packaging" / "pyflowd.toml"
INSTALLED_PYFLOWD = "/usr/local/bin/pyflowd"
# systemd-analyze security scores exposure from 0 (locked down) to 10; the unit scores
# about 2.7 (it must load BPF, administer the network and keep root's uid)
MAX_EXPOSURE = 3.5


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's pyflowd."""
    pyflowd = Path(sys.executable).parent / "pyflowd"
    assert pyflowd.is_file(), f"{pyflowd} missing: run `make native`"
    text = UNIT.read_text() if text is None else text
    assert f"ExecStart={INSTALLED_PYFLOWD} " in text
    copy = tmp_path / "pyflowd.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED_PYFLOWD} ", f"ExecStart={pyflowd} "))
    return copy


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing (Debian package systemd; `make setup` installs it)"
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_unit_verifies_cleanly(tmp_path):
    res = analyze("verify", "--man=no", local_copy(tmp_path))
    # verify exits 0 on mere warnings (an unknown key, say): any output is a finding
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHomme=yes")
    res = analyze("verify", "--man=no", local_copy(tmp_path, broken))
    assert "Unknown key 'ProtectHomme'" in res.stdout + res.stderr


def test_exposure_stays_low(tmp_path):
    res = analyze("security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", local_copy(tmp_path))
    assert res.returncode == 0, res.stdout[-800:] + res.stderr


def test_unit_runs_the_daemon_as_the_issue_asks():
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"] and s["TimeoutStopSec"]
    assert s["WatchdogSec"] and s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK AF_INET AF_INET6"]
    # bcc compiles against the headers under /lib/modules: ProtectKernelModules= would hide them
    assert "ProtectKernelModules" not in s
    # ProtectKernelTunables= keeps /sys/fs/bpf read-only whatever ReadWritePaths= says: its
    # read-only paths are spelled out instead (test_unit_systemd.py runs the unit)
    assert "ProtectKernelTunables" not in s
    assert {"/proc/sys", "/sys"} <= set(" ".join(s["ReadOnlyPaths"]).split())
    # systemd mounts bpffs itself and refuses a mount unit for /sys/fs/bpf
    assert s["RequiresMountsFor"] == ["/sys/fs/bpf"]
    assert not (REPO / "packaging" / "systemd" / "sys-fs-bpf.mount").exists()


def test_unit_gives_the_example_config_its_paths():
    s = settings()
    daemon = tomllib.loads(EXAMPLE.read_text())["daemon"]
    assert str(Path(daemon["socket"]).parent) == "/run/" + s["RuntimeDirectory"][0]
    assert daemon["state_dir"] == "/var/lib/" + s["StateDirectory"][0]
    writable = [p.lstrip("-") for p in s["ReadWritePaths"][0].split()]
    assert any(daemon["bpffs_dir"].startswith(p + "/") for p in writable), writable
    assert "/proc/sys/net/netfilter" in writable  # nf_conntrack_events
    assert "--config /etc/pyflow/pyflowd.toml" in s["ExecStart"][0]


@pytest.mark.parametrize("section", ["daemon", "offload"])
def test_example_config_shows_every_contract_key(section):
    # the keys the daemon's configuration contract names (BRIEF); the daemon's own
    # check-config test covers the values
    contract = {
        "daemon": {"socket", "socket_group", "metrics_address", "state_dir", "bpffs_dir", "log_level"},
        "offload": {"idle_timeout", "conntrack_timeout", "keepalive_interval", "exclude_mark_mask",
                    "offload_mark", "hw_skip_hw"},
    }[section]
    data = tomllib.loads(EXAMPLE.read_text())
    assert contract <= set(data[section]), contract - set(data[section])
    assert all(dev["mode"] == "auto" for dev in data["device"])
