"""make demo runs end to end, and leaves nothing behind, also when interrupted midway."""

from __future__ import annotations

import glob
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "tests.demo.demo", "--seconds", "4"]


def leftovers(pid: int) -> list[str]:
    """Namespaces, pins and temporary files of the demo run with process id ``pid``."""
    tag = f"pft-demo-{pid}"
    return sorted(glob.glob(f"/run/netns/{tag}-*") + glob.glob(f"/sys/fs/bpf/{tag}")
                  + glob.glob(f"/tmp/{tag}-*"))


def net_namespace_inodes(pid: int) -> set[int]:
    return {os.stat(p).st_ino for p in glob.glob(f"/run/netns/pft-demo-{pid}-*")}


def processes_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes``."""
    found = []
    for ns_link in glob.glob("/proc/[0-9]*/ns/net"):
        try:
            if os.stat(ns_link).st_ino in inodes:
                found.append(int(ns_link.split("/")[2]))
        except OSError:
            continue  # the process ended meanwhile
    return found


def test_demo_shows_offloaded_flows_and_cleans_up():
    proc = subprocess.Popen(DEMO, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + err[-2000:]
    flows = out.split("$ pyflowctl flows", 1)[1].split("==", 1)[0]
    assert "[OFFLOAD]" in flows, out
    # the fast path carried the transfer: its byte counter, read while iperf3 ran
    fast_bytes = int(re.search(r"^fast_path\.bytes\s+(\d+)$", out, re.M).group(1))
    assert fast_bytes > 10 << 20, out
    assert re.search(r"^pyflow_fastpath_bytes_total \S+$", out, re.M), out
    assert "iperf3 IPv4, 2 streams:" in out and "iperf3 IPv6, 1 stream:" in out
    assert "pyflowd exited with status 0" in out
    assert re.search(r"READY=1, [1-9]\d* x WATCHDOG=1, STOPPING=1", out), out
    assert leftovers(proc.pid) == []


def test_demo_interrupted_midway_removes_everything():
    proc = subprocess.Popen(DEMO, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, inodes, daemon_pid = [], set(), None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 300
        # interrupt once the traffic runs through the offloaded router
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if m := re.search(r"ready after .* pid (\d+)", line):
                daemon_pid = int(m.group(1))
            if line.startswith("$ iperf3 -c 2001"):
                inodes = net_namespace_inodes(proc.pid)
                time.sleep(1.0)
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail("the demo did not reach its traffic phase:\n" + "".join(seen))
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out + err
    assert "interrupted (SIGINT)" in err
    assert "== cleanup" in out
    assert len(inodes) == 3 and daemon_pid is not None, out
    assert leftovers(proc.pid) == []
    assert processes_in(inodes) == []  # pyflowd, iperf3 servers and clients all gone
    assert not os.path.exists(f"/proc/{daemon_pid}")  # reaped, not only killed
