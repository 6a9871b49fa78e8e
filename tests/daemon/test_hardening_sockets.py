"""pyflowd against a hostile local user (uid 65534, a member of the socket group) in router
r1's namespace: idle /metrics connections and trickling control-socket clients must not
grow the daemon's threads without bound nor lock root out of the control socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.daemon.process import METRICS_PORT, Pyflowd, ctl, in_netns
from tests.support.topology import topology

HOSTILE = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# As uid 65534: 200 idle TCP connections to /metrics and 64 to the control socket, each of
# the latter trickling one byte of a request every 0.5 s; held until stdin closes (at most
# 60 s). Every loop is bounded in count and time.
ATTACK = textwrap.dedent("""
    import select, socket, sys, time
    path, port = sys.argv[1], int(sys.argv[2])
    tcp, unix = [], []
    for _ in range(200):
        try:
            tcp.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            pass
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(path)
            unix.append(s)
        except OSError:
            s.close()
    print(len(tcp), len(unix), flush=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if select.select([sys.stdin], [], [], 0.5)[0]:
            break
        for s in unix:
            try:
                s.send(b"{")
            except OSError:
                pass
""")


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


@pytest.fixture(scope="module")
def daemon():
    with topology(nat=True) as topo:
        work = Path(tempfile.mkdtemp(prefix="pft-hardening-"))
        os.chmod(work, 0o755)  # uid 65534 must reach the socket's directory
        d = Pyflowd(topo, work, group="nogroup")
        try:
            d.start()
            yield topo, d
        finally:
            d.cleanup()
            shutil.rmtree(work, ignore_errors=True)


def test_a_hostile_user_neither_multiplies_threads_nor_locks_root_out(daemon):
    topo, d = daemon
    assert d.proc is not None
    before = threads_of(d.proc.pid)
    attacker = subprocess.Popen([*in_netns(topo.r1), *HOSTILE, sys.executable, "-c", ATTACK, d.socket,
                                 str(METRICS_PORT)],
                                cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        tcp, unix = map(int, attacker.stdout.readline().split())
        assert tcp >= 100 and unix >= 8, (tcp, unix)  # the attack did connect
        time.sleep(1.0)  # let the daemon take what it takes
        during = threads_of(d.proc.pid)
        # a thread per connection made this 200 + 64 more; the bounds allow 8 clients of
        # one uid, 8 refusals being drained and the metrics server's one thread
        assert during - before <= 20, (before, during)
        # root still gets in while the attacker holds everything it could
        res = ctl(d.socket, "status")
        assert res.returncode == 0, res.stderr
    finally:
        if attacker.stdin is not None:
            attacker.stdin.close()
        attacker.wait(30)
    # after the attack: /metrics and the socket answer, the daemon's threads are back down
    assert d.scrape()["pyflow_up"] == 1
    deadline = time.monotonic() + 20
    while threads_of(d.proc.pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threads_of(d.proc.pid) <= before + 2
    assert ctl(d.socket, "status").returncode == 0
