"""A bridged LAN through the router: the kernel path vs pyflow on the bridge vs pyflow on its ports.

Run as root: ``python tests/bench/bench_bridge.py [--reps N] [--seconds S]``. Prints a table
and writes bench-results/bridge.json.

Topology (tests/support/bridged.py): client behind the router's bridge pft-br (ports
pft-lan1, pft-lan2), server behind pft-wan, the router masquerading. iperf3 in both
directions: download (server -> client, ``-R``) and upload, one stream. NAPI is threaded
on the router's three ports and the threads are pinned to CPU 1; their run time is the
router's CPU (every packet the router forwards is handled in the receiving port's NAPI
poll: the bridge, routing, conntrack and NAT on the kernel path, the TC program and its
redirect with pyflow). Paths: ``kernel`` (no pyflow), ``bridge`` (pyflow on pft-br and
pft-wan: a redirect to the bridge, which looks its FDB up per packet) and ``ports`` (pyflow
on pft-lan1, pft-lan2 and pft-wan: straight to the port, bypassing the bridge). Per
repetition every path runs once per direction, in turn, so drifting load hits them alike;
the medians are printed. Figures: Gbit/s received (iperf3), router CPU cores over the
measured seconds, router CPU seconds per GB moved, and the share of the bytes the router
forwarded (both directions, the whole run) that the fast path carried rather than the
forward chain (its nftables counter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from pyflow.control.runner import ControlConfig  # noqa: E402
from tests.bench.benchnet import thread_cpu_ns  # noqa: E402
from tests.support.bridged import BRIDGE, LAN1, LAN2, V4, WAN, BridgedRouter, bridged_lan  # noqa: E402

PATHS = {"kernel": (), "bridge": (BRIDGE, WAN), "ports": (LAN1, LAN2, WAN)}
PORT = 5290


def iperf(lan, napi: list[int], seconds: int, reverse: bool, router: BridgedRouter | None) -> dict:
    server = subprocess.Popen(["ip", "netns", "exec", lan.sv, "iperf3", "-s", "-1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        cmd = ["ip", "netns", "exec", lan.cl, "iperf3", "-c", V4["sv"], "-p", str(PORT), "-t", str(seconds),
               "-O", "1", "-J", *(["-R"] if reverse else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        f0, k0 = (router.forwarded_bytes() if router else 0), lan.nft_bytes()
        time.sleep(1.1)  # connect + the omitted second
        c0, t0 = thread_cpu_ns(napi), time.monotonic()
        out, err = proc.communicate(timeout=seconds + 30)
        c1, t1 = thread_cpu_ns(napi), time.monotonic()
        fast, kernel = (router.forwarded_bytes() - f0 if router else 0), lan.nft_bytes() - k0
        doc = json.loads(out) if out.strip() else {"error": err}
        if "error" in doc or proc.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {doc.get('error')}")
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(10)
    end = doc["end"]["sum_received"]
    gbit = end["bits_per_second"] / 1e9
    cores = (c1 - c0) / 1e9 / (t1 - t0)
    return {"gbit_s": gbit, "router_cores": cores, "fast_path_bytes": fast, "forward_chain_bytes": kernel,
            "router_cpu_s_per_gb": cores / (gbit / 8) if gbit else None}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "bridge.json"))
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    with bridged_lan(threaded=True) as lan:
        if not lan.napi:
            raise SystemExit("no threaded NAPI threads appeared for the router's ports")
        for pid in lan.napi:
            os.sched_setaffinity(pid, {1})
        for _rep in range(args.reps):
            for name, devices in PATHS.items():
                config = ControlConfig(keepalive_period_s=0.5)
                router = BridgedRouter(lan, devices, config) if devices else None
                try:
                    for direction, reverse in (("download", True), ("upload", False)):
                        runs.setdefault(f"{name} {direction}", []).append(
                            iperf(lan, lan.napi, args.seconds, reverse, router))
                finally:
                    if router is not None:
                        router.close()
    table = {}
    print(f"{'path':<20} {'Gbit/s':>8} {'router cores':>13} {'CPU s/GB':>9} {'fast path':>10}"
          f"   ({args.reps} reps, median)")
    for key, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("gbit_s", "router_cores", "router_cpu_s_per_gb")}
        # of the bytes the router forwarded (both directions, whole run): the fast path's share
        share = statistics.median(r["fast_path_bytes"] / max(1, r["fast_path_bytes"]
                                                             + r["forward_chain_bytes"]) for r in rs)
        table[key] = {"median": med, "fast_path_share": share, "runs": rs}
        print(f"{key:<20} {med['gbit_s']:>8.2f} {med['router_cores']:>13.2f} "
              f"{med['router_cpu_s_per_gb']:>9.3f} {share:>10.0%}")
    Path(args.out).parent.mkdir(exist_ok=True)
    doc = {"seconds": args.seconds, "reps": args.reps, "results": table}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
