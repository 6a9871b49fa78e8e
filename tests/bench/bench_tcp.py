"""TCP through the NAT router with iperf3: kernel path vs pyflow in each attach mode.

Run as root: ``python tests/bench/bench_tcp.py [--quick]``. Prints a table and writes
bench-results/tcp.json.

Setup (tests/bench/benchnet.py): iperf3 client in the sender's namespace, iperf3 server
in the receiver's, the router between them masquerading (nftables, conntrack). Veths
with GRO on and transmit checksum offload off (so no TSO: the sender's stack hands the
router MSS-sized segments, as a NIC would, and the router's GRO rebuilds super-packets).
NAPI is threaded on every veth; the router's two NAPI threads are pinned to CPU 1 and
their run time (/proc/<pid>/schedstat) is the router's CPU: every packet the router
handles, in every mode, is handled in those threads (the kernel's forwarding, TC ingress
and XDP all run in the receiving port's NAPI poll). Senders, receivers and the control
plane go where the scheduler puts them.

Paths: ``slow`` (no pyflow: routing, conntrack, NAT in the kernel), pyflow with the
datapath attached in ``native`` XDP, in ``tc`` (TC ingress) and in ``auto`` (what pyflow
picks for a veth; the mode it chose is recorded). pyflow's control plane runs during the
test; iperf3 omits the first second (-O 1), by which time the connections are offloaded.
Per repetition every path and stream count runs once, in turn, so drifting machine load
hits them alike: Gbit/s received (iperf3's own figure over the measured seconds), router
CPU in cores (NAPI thread run time / wall time over the same seconds), router CPU
seconds per GB moved, and the fast path's share of the bytes the router sent (pyflow's
forwarded bytes / the router ports' tx bytes, whole run including the omitted second;
approximate, as the two count headers alike but not at the same layer).
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

from tests import netns  # noqa: E402
from tests.bench import benchnet  # noqa: E402
from tests.bench.benchnet import LAN, UP, V4  # noqa: E402

ROUTER_CPU = 1
PORT = 5201
PATHS = ("slow", "native", "tc", "auto")


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


class Router:
    """pyflow on the router, attached and started per run, in the mode asked for."""

    def __init__(self, net: benchnet.Net):
        from pyflow.datapath.loader import Datapath

        self.net = net
        self.pin = f"/sys/fs/bpf/pft-bench-tcp-{os.getpid()}"
        with netns.inside(net.rt):
            self.dp = Datapath(pin_dir=self.pin, state_file=f"/run/pft-bench-tcp-{os.getpid()}.json")
        self.cp = None

    def start(self, mode: str) -> str:
        from pyflow.control.engine import EngineConfig
        from pyflow.control.runner import ControlConfig, ControlPlane

        with netns.inside(self.net.rt):
            chosen = {dev: self.dp.attach(dev, mode).mode for dev in (LAN, UP)}
            self.cp = ControlPlane(self.dp, ControlConfig(engine=EngineConfig(), keepalive_period_s=1.0))
            self.cp.start()
        return "/".join(sorted(set(chosen.values())))

    def stop(self) -> None:
        with netns.inside(self.net.rt):
            if self.cp is not None:
                self.cp.stop(hand_back=True)
                self.cp = None
            for dev in (LAN, UP):
                self.dp.detach(dev)

    def forwarded_bytes(self) -> int:
        return self.dp.reason_counts().get("forwarded", (0, 0))[1]

    def close(self) -> None:
        with netns.inside(self.net.rt):
            self.dp.destroy()


def iperf_run(net: benchnet.Net, streams: int, seconds: int, attempts: int = 3) -> dict:
    """One iperf3 run; router CPU sampled over the measured (not omitted) seconds. The server
    takes one test at a time and may still be finishing the last one: busy is retried."""
    cmd = ["ip", "netns", "exec", net.gen, "iperf3", "-c", V4["snk"], "-p", str(PORT), "-t", str(seconds),
           "-O", "1", "-P", str(streams), "-J"]
    for attempt in range(attempts):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.1)  # connect + the omitted second
        c0, t0 = net.router_cpu_ns(), time.monotonic()
        out, err = proc.communicate(timeout=seconds + 30)
        c1, t1 = net.router_cpu_ns(), time.monotonic()
        try:
            doc = json.loads(out)
        except json.JSONDecodeError:
            doc = {"error": err.strip() or out[-300:]}
        if "error" not in doc and proc.returncode == 0:
            break
        if attempt == attempts - 1:
            raise RuntimeError(f"iperf3 failed ({proc.returncode}): {doc.get('error')}")
        time.sleep(1.0)
    end = doc["end"]["sum_received"]
    cores = (c1 - c0) / 1e9 / (t1 - t0)
    gbit = end["bits_per_second"] / 1e9
    return {"gbit_s": gbit, "router_cores": cores,
            "router_cpu_s_per_gb": cores / (gbit / 8) if gbit else None,
            "bytes": end["bytes"], "seconds": end["seconds"]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition of 2 s runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "tcp.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_tcp: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    if args.quick:
        args.reps, args.seconds = 1, 2
    streams_list = [int(x) for x in args.streams.split(",")]
    t_start = time.monotonic()
    samples: dict[str, list[dict]] = {}
    chosen: dict[str, str] = {}
    fast_share: dict[str, list[float]] = {}
    with benchnet.network(threaded=True) as net:
        net.pin(ROUTER_CPU, None)
        server = subprocess.Popen(["ip", "netns", "exec", net.snk, "iperf3", "-s", "-p", str(PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        router = Router(net)
        try:
            time.sleep(0.5)
            for rep in range(args.reps):
                for path in PATHS:
                    for streams in streams_list:
                        key = f"{path}/{streams}"
                        if path != "slow":
                            chosen[path] = router.start(path)
                        try:
                            f0 = router.forwarded_bytes()
                            links0 = net.router_links()
                            res = iperf_run(net, streams, args.seconds)
                            links1 = net.router_links()
                            if path != "slow":
                                moved = sum(links1[d]["tx_bytes"] - links0[d]["tx_bytes"] for d in (LAN, UP))
                                share = (router.forwarded_bytes() - f0) / max(moved, 1)
                                fast_share.setdefault(key, []).append(share)
                        finally:
                            if path != "slow":
                                router.stop()
                        samples.setdefault(key, []).append(res)
                        print(f"rep {rep + 1} {key:9} {res['gbit_s']:6.2f} Gbit/s, "
                              f"router {res['router_cores']:.2f} cores", flush=True)
        finally:
            router.close()
            server.terminate()
            server.wait(10)
    rows = {}
    for key, runs in samples.items():
        rows[key] = {"gbit_s": summarize([r["gbit_s"] for r in runs]),
                     "router_cores": summarize([r["router_cores"] for r in runs]),
                     "router_cpu_s_per_gb": summarize([r["router_cpu_s_per_gb"] or 0.0 for r in runs])}
        if key in fast_share:
            rows[key]["fast_path_share"] = summarize(fast_share[key])
    results = {"method": {"reps": args.reps, "seconds": args.seconds, "omit_s": 1, "router_cpu": ROUTER_CPU,
                          "kernel": os.uname().release, "cpus": os.cpu_count()},
               "auto_chose": chosen.get("auto"), "rows": rows, "wall_s": time.monotonic() - t_start}
    report(results, streams_list)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


def report(results: dict, streams_list: list[int]) -> None:
    rows = results["rows"]
    print(f"\nTCP through the NAT router, iperf3, median of {results['method']['reps']} runs of "
          f"{results['method']['seconds']} s; auto chose {results['auto_chose']}")
    print(f"{'path':14} {'Gbit/s':>8} {'router cores':>13} {'CPU s/GB':>9} {'vs slow':>8} {'fast share':>10}")
    for streams in streams_list:
        slow = rows[f"slow/{streams}"]["gbit_s"]["median"]
        for path in PATHS:
            r = rows[f"{path}/{streams}"]
            share = r.get("fast_path_share", {}).get("median")
            print(f"{path + '/' + str(streams):14} {r['gbit_s']['median']:8.2f} "
                  f"{r['router_cores']['median']:13.2f} {r['router_cpu_s_per_gb']['median']:9.3f} "
                  f"{r['gbit_s']['median'] / slow:7.2f}x "
                  f"{'' if share is None else f'{share:10.0%}'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
