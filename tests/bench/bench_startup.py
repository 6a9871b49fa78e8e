"""pyflowd's start-up and footprint, per datapath build: the prebuilt object loaded with
libbpf (the default) and bcc compiling ebpf/ at start.

For each build, pyflowd starts ``--runs`` times in router r1 of the integration topology
(tests/daemon/process.py) with both router ports configured, each time on a clean pin
dir (a first start), then ``--restarts`` times over the pins of a SIGKILLed run (an
adopting restart; the table says whether it reused the pinned programs). Measured from
the fork: READY=1 on a $NOTIFY_SOCKET of our own, and the
first answered status request on the control socket (polled every 5 ms with a raw
request, no pyflowctl); then VmRSS from /proc/PID/status after 3 s idle with no
connection. Prints a side-by-side table and writes bench-results/startup.json.

    .venv/bin/python tests/bench/bench_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.daemon.process import ROOT, Pyflowd  # noqa: E402 - after the path set-up above
from tests.support.topology import LAN, UP, topology  # noqa: E402

BUILDS = ("prebuilt", "bcc")
IDLE_S = 3.0


def _answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
            s.sendall(b'{"version": 1, "command": "status"}\n')
            return b'"ok":true' in s.makefile("rb").readline()
    except OSError:
        return False


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_start(d: Pyflowd, notify: socket.socket) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=notify.getsockname())
    t0 = time.monotonic()
    with open(d.log, "a") as log:
        d.proc = subprocess.Popen(d.argv(), cwd=ROOT, env=env, stdout=log, stderr=log)
    ready = answered = None
    deadline = t0 + 120
    while (ready is None or answered is None) and time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise RuntimeError(f"pyflowd exited {d.proc.returncode}:\n{d.log.read_text()}")
        try:
            while True:
                if b"READY=1" in notify.recv(4096, socket.MSG_DONTWAIT) and ready is None:
                    ready = time.monotonic() - t0
        except BlockingIOError:
            pass
        if answered is None and _answers(d.socket):
            answered = time.monotonic() - t0
        time.sleep(0.005)
    if ready is None or answered is None:
        raise RuntimeError(f"pyflowd not ready:\n{d.log.read_text()}")
    time.sleep(IDLE_S)
    return {"ready_s": ready, "socket_s": answered, "rss_mib": _rss_kib(d.proc.pid) / 1024}


def bench(build: str, runs: int, work: Path, topo, restart_runs: int = 1) -> dict[str, object]:
    (work / build).mkdir()
    d = Pyflowd(topo, work / build)
    d.write_config(devices=((LAN, "auto"), (UP, "auto")), extra=f'datapath_build = "{build}"\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / f"{build}.notify"))
    firsts = []
    try:
        for _ in range(runs):
            firsts.append(one_start(d, notify))
            d.signal(signal.SIGTERM)
            d.wait(30)
        firsts.append(one_start(d, notify))  # the run a SIGKILL leaves behind, to adopt
        restarts = []
        for _ in range(restart_runs):
            d.signal(signal.SIGKILL)
            d.wait(10)
            logged = len(d.log.read_text())
            restarts.append(one_start(d, notify))
            # whether the restart reused the pinned programs (prebuilt, same object) or loaded
            restarts[-1]["reused"] = "reusing the pinned datapath programs" in d.log.read_text()[logged:]
        d.signal(signal.SIGTERM)
        d.wait(30)
    finally:
        d.cleanup()
        notify.close()

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in firsts), 3)

    return {"runs": len(firsts), "ready_s": med("ready_s"), "socket_s": med("socket_s"),
            "rss_mib": round(statistics.median(r["rss_mib"] for r in firsts), 1),
            "restarts": len(restarts),
            "restart_ready_s": round(statistics.median(r["ready_s"] for r in restarts), 3),
            "restart_rss_mib": round(statistics.median(r["rss_mib"] for r in restarts), 1),
            "restart_reused": all(r["reused"] for r in restarts)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="first starts per build")
    ap.add_argument("--restarts", type=int, default=1, help="adopting restarts (after SIGKILL) per build")
    ap.add_argument("--out", default="bench-results/startup.json")
    ap.add_argument("--builds", default=",".join(BUILDS),
                    help="comma-separated datapath builds to measure (bcc compiles at every start: slow)")
    args = ap.parse_args(argv)
    builds = [b for b in args.builds.split(",") if b]
    if not builds or any(b not in BUILDS for b in builds):
        ap.error(f"--builds: each one of {', '.join(BUILDS)}")
    results = {}
    with topology(nat=True) as topo, tempfile.TemporaryDirectory(prefix="pft-bench-startup-") as work:
        for build in builds:
            results[build] = bench(build, args.runs, Path(work), topo, args.restarts)
    rows = [("READY=1 after start (median)", "ready_s", "s"), ("socket answers (median)", "socket_s", "s"),
            (f"VmRSS idle after {IDLE_S:g} s (median)", "rss_mib", "MiB"),
            ("adopting restart, READY=1 (median)", "restart_ready_s", "s"),
            ("VmRSS after restart (median)", "restart_rss_mib", "MiB"),
            ("restart reused the pinned programs", "restart_reused", "")]
    heads = {"prebuilt": "prebuilt (libbpf)", "bcc": "bcc"}
    print(f"{'':34}" + "".join(f" {heads[b]:>18}" for b in builds))
    for label, key, unit in rows:
        print(f"{label:34}" + "".join(f" {(str(results[b][key]) + ' ' + unit).strip():>18}" for b in builds))
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
