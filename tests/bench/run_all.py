"""`make bench`: run every benchmark, keep their output, then write BENCHMARKS.md and its plots.

Each bench_*.py prints its own table and writes JSON under bench-results/; this runner
sequences them (in SUITE order, with the arguments that keep the whole run within about
30 minutes on 2 CPUs), saves what each prints to bench-results/bench_<name>.txt (stderr
to bench_<name>.stderr.txt), records the run's conditions in bench-results/run.json, and
finally runs report.py, which turns the JSON into BENCHMARKS.md and docs/bench/*.png. A
script's old JSON is removed before it runs, so a failure shows as "not run" in the report
instead of stale figures. Exit status is non-zero if any script failed (the report is
still written).

    run_all.py                 everything, then the report
    run_all.py --quick         smoke run: every script in its quick mode
    run_all.py --only router   some scripts only (names without bench_), then the report
    run_all.py --report-only   the report from existing results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "bench-results"

# (name, arguments for the full run). The datapath micro-benchmark runs with fewer and
# shorter rounds than its own default (2M x 7) to fit the budget; its figures are
# medians of BPF_PROG_TEST_RUN means either way.
# The router at 1M flows (IPv4) and the control plane with 100k connections offloaded are
# the scale figures; IPv6 stops at 100k flows (1M takes minutes per family). The router runs
# pyflow and the floor at TC (what auto takes on veth) and, up to 100k flows, at native XDP.
SUITE: list[tuple[str, list[str]]] = [
    ("router", ["--flows", "1,1000,100000,1000000", "--max-flows6", "100000",
                "--extra-mode", "native", "--extra-max-flows", "100000", "--perf-flows", "1,100000"]),
    # 15 s of new connections spans a keep-alive walk of the 100k or two (paced about 10 s
    # apart); the client holds a socket per connection, and a process may hold 20,000 here
    ("control", ["--conns", "100000", "--latency-seconds", "15"]),
    ("keepalive", ["--sizes", "10000,100000,1000000", "--steady", "30"]),
    ("datapath", ["--repeat", "500000", "--rounds", "5"]),
    ("tcp", []),
    ("flowtable", []),
    ("daemon", []),  # figures in bench-results/daemon.json and its text output; not in the page yet
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_scripts(names: list[str], quick: bool) -> tuple[list[dict], bool]:
    OUT.mkdir(exist_ok=True)
    records, ok = [], True
    for name, full_args in SUITE:
        if name not in names:
            continue
        script = HERE / f"bench_{name}.py"
        (OUT / f"{name}.json").unlink(missing_ok=True)
        args = ["--quick"] if quick else full_args
        print(f"== {script.name} {' '.join(args)}", flush=True)
        t0 = time.monotonic()
        # stdout streams through as it comes (runs take minutes); stderr (bcc's warnings,
        # tracebacks) goes to a file of its own and, on failure, to the screen
        err_path = OUT / f"bench_{name}.stderr.txt"
        with open(OUT / f"bench_{name}.txt", "w") as log, open(err_path, "w") as err_file, \
                subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                                 stderr=err_file, text=True, cwd=ROOT) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            proc.wait()
        err = err_path.read_text()
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            sys.stdout.write(err[-4000:])
            ok = False
        print(f"== {script.name}: exit {proc.returncode}, {seconds:.0f} s\n", flush=True)
        records.append({"name": script.name, "seconds": seconds, "exit": proc.returncode})
    return records, ok


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every script in its quick mode (smoke run)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate BENCHMARKS.md and plots")
    ap.add_argument("--only", help="comma-separated script names: " + ",".join(n for n, _ in SUITE))
    args = ap.parse_args(argv)
    ok = True
    if not args.report_only:
        if os.geteuid() != 0:
            print("run_all: the benchmarks need root (BPF, network namespaces)", file=sys.stderr)
            return 2
        names = [n for n, _ in SUITE] if not args.only else args.only.split(",")
        unknown = set(names) - {n for n, _ in SUITE}
        if unknown:
            print(f"run_all: unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        started = datetime.datetime.now(datetime.UTC)
        before, t0 = loadavg(), time.monotonic()
        records, ok = run_scripts(names, args.quick)
        wall = time.monotonic() - t0
        run = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "kernel": os.uname().release,
               "cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_before": before,
               "loadavg_after": loadavg(), "quick": args.quick, "scripts": records}
        if args.only and (OUT / "run.json").exists():
            # a partial rerun: the other scripts' records stay, marked with their own run
            old = json.loads((OUT / "run.json").read_text())
            rerun = {r["name"] for r in records}
            kept = [dict(r, started=r.get("started", old.get("started"))) for r in old.get("scripts", [])
                    if r["name"] not in rerun]
            run["scripts"] = kept + [dict(r, started=run["started"]) for r in records]
        run["wall_s"] = sum(r["seconds"] for r in run["scripts"])
        (OUT / "run.json").write_text(json.dumps(run, indent=2))
        print(f"benchmarks took {wall / 60:.1f} min", flush=True)
    sys.path.insert(0, str(ROOT))
    from tests.bench import report

    rc = report.main([])
    if not ok:
        print("some benchmarks failed: see bench-results/*.txt", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
