"""The /metrics endpoint stays bounded whatever a local user does to it: idle connections
get no thread each and are cut at a deadline, their number is capped, and a process out of
descriptors does not spin on accept(); scrapes still get the registry's output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from pyflow.control.stats import LoopStats
from pyflow.daemon import metrics
from pyflow.daemon.metrics import MetricsServer, registry_for
from pyflow.daemon.stats import Stats

ROOT = Path(__file__).resolve().parents[2]
STATS = Stats.of(LoopStats(), Stats().devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served():
    registry = registry_for(lambda: STATS)
    port = free_port()
    srv = MetricsServer(f"127.0.0.1:{port}", registry)
    yield srv, registry, port
    srv.stop()


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_scrape_gets_the_registry_output(served):
    _srv, registry, port = served
    status, body = get(port)
    assert status == 200 and body == generate_latest(registry)
    assert b"pyflow_up 1.0" in body
    assert get(port, "/")[0] == 200
    assert get(port, "/favicon.ico")[0] == 404
    assert get(port, method="HEAD") == (200, b"")
    assert get(port, method="POST")[0] == 405


def test_idle_connections_get_no_thread_each_are_capped_and_cut(served, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 1.0, raising=False)
    _srv, _registry, port = served
    threads, fds = threading.active_count(), open_fds()
    idle = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(s)
        time.sleep(0.5)  # let the server take them all
        # 60 of the test's own descriptors; the server holds at most its cap on top
        assert threading.active_count() - threads <= 1, threading.active_count() - threads
        assert open_fds() - fds <= 60 + metrics.MAX_CONNECTIONS + 2
        # each one is cut at the deadline (it never sent a request): bounded wait
        deadline = time.monotonic() + 20
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in idle:
            s.close()
    assert get(port)[0] == 200


def test_a_trickling_request_is_cut_at_its_deadline(served, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 1.0, raising=False)
    _srv, _registry, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(0.2)
        closed = False
        for i in range(100):  # one header byte every 0.1 s for at most 10 s
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nX-Slow: " if i == 0 else b"a")
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed


CHILD = textwrap.dedent("""
    import resource, sys, time
    from pyflow.control.stats import LoopStats
    from pyflow.daemon.metrics import MetricsServer, registry_for
    from pyflow.daemon.stats import Stats

    stats = Stats.of(LoopStats(), Stats().devices)
    srv = MetricsServer(sys.argv[1], registry_for(lambda: stats))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    held = []
    try:
        while len(held) < 100:
            held.append(open("/dev/null"))
    except OSError:
        pass  # EMFILE: every descriptor taken
    print("full", flush=True)
    sys.stdin.readline()  # the parent has connected its clients: they wait in the backlog
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(2.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"cpu {cpu:.3f}", flush=True)
""")


def test_out_of_descriptors_does_not_spin_on_accept():
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"127.0.0.1:{port}"], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    clients = []
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "full"
        for _ in range(5):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline().strip()
        child.wait(30)
    finally:
        for s in clients:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert line.startswith("cpu "), line
    # two seconds of wall time: a loop retrying accept() burns nearly all of it
    assert float(line.split()[1]) < 0.8, line
