"""pyflowd.service run by a real systemd (tests/packaging/sdns.py): it starts under the
unit's sandbox and capabilities, pings the watchdog, reloads, is restarted after a crash
(adopting its pins by path, with the unit's capabilities), and stops cleanly.

The unit is used as written except for three things this systemd needs: ExecStart names
this checkout's pyflowd and a config under /run (the unit's /usr/local/bin and /etc/pyflow
are not there); and a drop-in with DefaultDependencies=no (this systemd has no
sysinit.target), output to a file (no journald), and WatchdogSec=4 so that pings come
within seconds. With the checkout in a home directory, ProtectHome= becomes read-only;
with it in /tmp, PrivateTmp= is off and /tmp writable (a private /tmp would hide it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyflow.datapath.abi import MAP_FLOWS
from tests import netns
from tests.packaging.sdns import SystemdNamespace
from tests.packaging.unitfile import REPO, UNIT, capabilities
from tests.pins import remove_pin_dir

pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent
DEV = "pft-u0"
CT_EVENTS = "/proc/sys/net/netfilter/nf_conntrack_events"
CT_RULES = ("table inet pft {\n chain forward {\n  type filter hook forward priority 0;\n"
            "  ct state new counter\n }\n}\n")
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def unit_for_this_checkout() -> str:
    text = UNIT.read_text()
    exec_line = re.search(r"^ExecStart=.*$", text, re.M)
    assert exec_line and "--config /etc/pyflow/pyflowd.toml" in exec_line.group(0)
    return text.replace(exec_line.group(0), f"ExecStart={BIN / 'pyflowd'} --config /run/pft-sd/pyflowd.toml")


def drop_in() -> str:
    text = ("[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=append:/run/pft-sd/pyflowd.log\n"
            "StandardError=inherit\nWatchdogSec=4\n")
    if str(REPO).startswith(("/home/", "/root/", "/run/user/")):
        text += "ProtectHome=read-only\n"
    if str(REPO).startswith(("/tmp/", "/var/tmp/")):  # PrivateTmp= would hide the checkout
        text += "PrivateTmp=no\nReadWritePaths=/tmp\n"
    return text


@pytest.fixture
def systemd(tmp_path):
    ns = netns.create(netns.unique("sd"))
    pin_dir = f"/sys/fs/bpf/{ns}"
    try:
        netns.run(ns, ["ip", "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p"])
        netns.run(ns, ["ip", "link", "set", DEV, "up"])
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=CT_RULES, text=True, check=True,
                       capture_output=True)
        netns.run(ns, ["sysctl", "-qw", "net.netfilter.nf_conntrack_events=2"])
        # the config's other values are the defaults the unit's directories are made for
        config = f'[daemon]\nbpffs_dir = "{pin_dir}"\n[[device]]\nname = "{DEV}"\nmode = "tc"\n'
        units = {"pyflowd.service": unit_for_this_checkout(), "pyflowd.service.d/test.conf": drop_in()}
        with SystemdNamespace(ns, tmp_path, units, {"pyflowd.toml": config}) as sd:
            yield sd, ns, pin_dir
    finally:
        netns.remove(ns)
        remove_pin_dir(pin_dir)


def daemon_log(sd: SystemdNamespace) -> str:
    return sd.enter("cat", "/run/pft-sd/pyflowd.log", check=False).stdout[-3000:]


def devices(sd: SystemdNamespace) -> dict[str, str]:
    """{device: state, or state and error}."""
    out = sd.enter(str(BIN / "pyflowctl"), "--json", "devices").stdout
    return {d["name"]: d["state"] + (f": {d['error']}" if d.get("error") else "")
            for d in json.loads(out)["devices"]}


def map_id(pin: str) -> int:
    return int(json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", pin], check=True,
                                         capture_output=True, text=True).stdout)["id"])


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_the_unit_runs_pyflowd_under_systemd(systemd):
    sd, ns, pin_dir = systemd
    res = sd.systemctl("start", "pyflowd.service", check=False)  # returns once READY=1 arrived
    assert res.returncode == 0, res.stderr + daemon_log(sd) + sd.log()
    props = sd.show("pyflowd.service", "ActiveState", "MainPID", "StatusText")
    assert props["ActiveState"] == "active", props
    assert devices(sd) == {DEV: "attached"}

    # the sandbox as the kernel sees it on the running daemon
    status = sd.enter("cat", f"/proc/{props['MainPID']}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    want = sum(1 << CAP_BITS[c] for c in capabilities())
    assert int(fields["CapBnd"], 16) == want and int(fields["CapEff"], 16) == want, fields["CapBnd"]
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    # it wrote the conntrack events sysctl through ReadWritePaths=, and serves /metrics
    assert netns.run(ns, ["cat", CT_EVENTS]).stdout.strip() == "1"
    metrics = netns.run(ns, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:9469/metrics"]).stdout
    assert "pyflow_up 1.0" in metrics
    assert wait_for(lambda: sd.show("pyflowd.service", "WatchdogTimestampMonotonic")
                    ["WatchdogTimestampMonotonic"] not in ("", "0"), 10), "no WATCHDOG=1 seen"

    sd.systemctl("reload", "pyflowd.service")
    assert wait_for(lambda: "reloaded" in daemon_log(sd), 10), daemon_log(sd)
    assert sd.show("pyflowd.service", "ActiveState")["ActiveState"] == "active"

    # a crash: Restart=on-failure brings it back, and the new process adopts the pinned maps
    flows_map = map_id(f"{pin_dir}/{MAP_FLOWS}")
    sd.systemctl("kill", "--signal=SIGKILL", "pyflowd.service")
    assert wait_for(lambda: sd.show("pyflowd.service", "NRestarts", "ActiveState")
                    == {"NRestarts": "1", "ActiveState": "active"}, 120), daemon_log(sd)
    assert devices(sd) == {DEV: "attached"}
    assert map_id(f"{pin_dir}/{MAP_FLOWS}") == flows_map

    sd.systemctl("stop", "pyflowd.service")
    props = sd.show("pyflowd.service", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    assert "devices detached" in daemon_log(sd)
    assert not os.path.isdir(pin_dir) or os.listdir(pin_dir) == []
