"""The unit's capability set is enough for pyflowd's work, and each capability in it is needed.

Each case runs tests/packaging/privprobe.py (the daemon's privileged steps, one by one)
in a fresh test namespace as uid 0 under ``setpriv`` with a given bounding set, as
systemd runs the unit: uid 0, CapabilityBoundingSet=, NoNewPrivileges=. The capability
set is read from packaging/systemd/pyflowd.service itself, so the unit and this test
cannot drift apart.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests import netns
from tests.packaging.unitfile import REPO, capabilities, setpriv_argv
from tests.pins import remove_pin_dir

pytestmark = pytest.mark.root

STEPS = ["datapath-load-and-pin", "attach-tc", "attach-xdp-native", "adopt-pins", "detach-and-unpin",
         "conntrack-netlink", "so-rcvbufforce", "conntrack-events-sysctl", "rtnetlink-watch"]
# conntrack (and so its per-namespace sysctls) exists once a ruleset uses it
CT_RULES = ("table inet pft {\n chain forward {\n  type filter hook forward priority 0;\n"
            "  ct state new counter\n }\n}\n")


def run_probe(caps: list[str], *extra: str) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """Run the probe under ``caps``; returns {step: "ok" or the failure text} and the process."""
    ns = netns.create(netns.unique("cap"))
    pin_dir = f"/sys/fs/bpf/{ns}"
    state_dir = f"/tmp/{ns}"
    try:
        for dev in ("pft-c0", "pft-c1"):
            netns.run(ns, ["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"])
            netns.run(ns, ["ip", "link", "set", dev, "up"])
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=CT_RULES, text=True,
                       check=True, capture_output=True)
        os.makedirs(state_dir)
        # nsenter, not "ip netns exec": the latter remounts /sys, which hides /sys/fs/bpf
        argv = ["nsenter", f"--net=/run/netns/{ns}",
                *setpriv_argv(caps),
                sys.executable, "-m", "tests.packaging.privprobe", "--pin-dir", pin_dir,
                "--state-dir", state_dir, "--tc-dev", "pft-c0", "--xdp-dev", "pft-c1", *extra]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        netns.remove(ns)  # the veths go with it, and the programs on them
        remove_pin_dir(pin_dir)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(state_dir):
                os.unlink(os.path.join(state_dir, entry))
            os.rmdir(state_dir)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("ok "):
            results[line[3:]] = "ok"
        elif line.startswith("FAIL "):
            step, _, why = line[5:].partition(": ")
            results[step] = why
    return results, proc


def test_unit_names_the_capabilities_found_needed():
    assert sorted(capabilities()) == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]


def test_unit_capabilities_suffice():
    """The default (prebuilt) datapath: load, attach, adopt the pins by path, detach."""
    results, proc = run_probe(capabilities(), "--deny-write-execute")
    assert results == dict.fromkeys(STEPS, "ok"), proc.stdout + proc.stderr
    assert proc.returncode == 0


def test_bcc_build_needs_sys_admin_to_adopt_the_pins():
    """daemon.datapath_build = "bcc" is why the unit once kept CAP_SYS_ADMIN: under the
    unit's set a first start works, a restart cannot reopen the pinned maps (bcc opens
    them by id, BPF_MAP_GET_FD_BY_ID); with CAP_SYS_ADMIN added it can."""
    results, proc = run_probe(capabilities(), "--build", "bcc")
    out = proc.stdout + proc.stderr
    assert results["datapath-load-and-pin"] == "ok", out
    assert results["attach-tc"] == "ok" and results["attach-xdp-native"] == "ok", out
    assert "could not open bpf map" in results["adopt-pins"], out
    assert "Operation not permitted" in results["adopt-pins"], out
    results, proc = run_probe([*capabilities(), "CAP_SYS_ADMIN"], "--build", "bcc")
    assert results == dict.fromkeys(STEPS, "ok"), proc.stdout + proc.stderr


def test_without_perfmon_the_verifier_refuses_the_datapath():
    caps = [c for c in capabilities() if c != "CAP_PERFMON"]
    results, proc = run_probe(caps)
    assert "prohibited" in results["datapath-load-and-pin"], proc.stdout + proc.stderr


def test_without_bpf_no_map_is_made():
    caps = [c for c in capabilities() if c != "CAP_BPF"]
    results, proc = run_probe(caps)
    out = proc.stdout + proc.stderr
    assert "Operation not permitted" in results["datapath-load-and-pin"], out
    assert "attach-tc" not in results, out


def test_without_net_admin_no_program_loads_nothing_attaches_and_conntrack_is_closed():
    caps = [c for c in capabilities() if c != "CAP_NET_ADMIN"]
    results, proc = run_probe(caps)
    out = proc.stdout + proc.stderr
    # XDP and SCHED_CLS programs are networking programs: CAP_NET_ADMIN loads them
    assert "Operation not permitted" in results["datapath-load-and-pin"], out
    assert "Operation not permitted" in results["conntrack-netlink"], out
    assert "Operation not permitted" in results["so-rcvbufforce"], out
