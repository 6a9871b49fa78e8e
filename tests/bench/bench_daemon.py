"""pyflowd as operators meet it: how long it takes to start, to restart (adopting), to answer
a request and a scrape, and to stop (handing every flow back).

Runs the daemon in router r1 of the integration topology (tests/daemon/process.py), as root.
Prints a table and writes bench-results/daemon.json. Figures depend on the machine's load:
Python's start-up (about 0.1 s) dominates every pyflowctl call; tests/bench/bench_startup.py
compares the start of the two datapath builds.

    .venv/bin/python tests/bench/bench_daemon.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import netns  # noqa: E402 - after the path set-up above
from tests.daemon.process import METRICS_PORT, Pyflowd, ctl  # noqa: E402
from tests.support.topology import topology  # noqa: E402


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 3),
            "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1e3, 3), "n": len(ordered)}


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _raw_status(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'{"version": 1, "command": "status"}\n')
        answer = s.makefile("rb").readline()
    if b'"ok":true' not in answer:
        raise RuntimeError(f"status failed: {answer!r}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="raw socket requests and scrapes to time")
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--out", default="bench-results/daemon.json")
    args = ap.parse_args(argv)
    n = 40 if args.quick else args.requests
    results: dict[str, object] = {}
    with topology(nat=True) as topo, tempfile.TemporaryDirectory(prefix="pft-bench-pyflowd-") as work:
        d = Pyflowd(topo, Path(work))
        try:
            t0 = time.monotonic()
            d.start()
            results["first_start_s"] = round(time.monotonic() - t0, 3)

            results["raw_status_request"] = _ms(_timed(lambda: _raw_status(d.socket), n))
            results["pyflowctl_status"] = _ms(_timed(lambda: ctl(d.socket, "status"), max(10, n // 10)))

            def scrape():
                with netns.inside(topo.r1):
                    conn = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
                with conn:
                    conn.read()

            results["metrics_scrape"] = _ms(_timed(scrape, n))

            d.signal(signal.SIGKILL)
            d.wait(10)
            t0 = time.monotonic()
            d.start()
            results["restart_adopting_s"] = round(time.monotonic() - t0, 3)

            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            rc = d.wait(30)
            results["stop_hand_back_s"] = round(time.monotonic() - t0, 3)
            if rc != 0:
                raise RuntimeError(f"pyflowd exited {rc} on SIGTERM")
        finally:
            d.cleanup()
    print(f"{'what':28} {'value':>12}")
    for key, value in results.items():
        text = (f"{value['median_ms']} ms median, {value['p90_ms']} ms p90 (n={value['n']})"
                if isinstance(value, dict) else f"{value} s")
        print(f"{key:28} {text}")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
