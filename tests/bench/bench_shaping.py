"""What traffic shaping costs the router per packet, on the kernel path and with pyflow.

Run as root: ``python tests/bench/bench_shaping.py [--flows 1000] [--reps 5] [--window 1.0]``.
Prints a table and writes bench-results/shaping.json.

The router benchmark's network and load (tests/bench/bench_router.py: sender -- router --
receiver on veth pairs with threaded NAPI, the router's two NAPI threads pinned to a CPU of
their own, 64-byte UDP frames over ``--flows`` flows, the router masquerading), measured in
five configurations of the router, one after the other in one run:

1. ``kernel``: no pyflow, the uplink's default qdisc (none: veth is noqueue);
2. ``kernel+htb``: an htb shaper on the uplink's egress (one class, a pfifo under it);
3. ``pyflow tc``: pyflow's TC hook on both ports (what ``auto`` picks while a device is shaped);
4. ``pyflow tc+htb``: the same with the shaper: every forwarded packet goes through htb;
5. ``pyflow native``: pyflow in native XDP, without the shaper (XDP would skip it; this is
   what shaping rules out).

The shaper's rate (``--rate``, 10 Gbit/s) is above what the sender can offer, so htb
enqueues and dequeues every packet but never holds one back: the figure is the per-packet
cost of passing through a shaper, all of it in the NAPI thread that forwards the packet
(with the rate below the load, htb would also drop the excess and dequeue from its watchdog
timer in softirq context, work that no thread's CPU time shows). Router CPU per packet: the
NAPI threads' run time over a window divided by the packets the router sent out of its
uplink; medians of ``--reps`` windows; ratios only within the run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402
from tests.bench import benchnet  # noqa: E402
from tests.bench.bench_router import HOST_CPU, ROUTER_CPU, Bench  # noqa: E402
from tests.bench.benchnet import GEN_IF, LAN, UP, V4, V6  # noqa: E402

CASES = ("kernel", "kernel+htb", "pyflow tc", "pyflow tc+htb", "pyflow native")


def shape(net: benchnet.Net, rate: str) -> None:
    netns.run(net.rt, f"tc qdisc replace dev {UP} root handle 1: htb default 10")
    netns.run(net.rt, f"tc class add dev {UP} parent 1: classid 1:10 htb rate {rate} ceil {rate}")
    netns.run(net.rt, f"tc qdisc add dev {UP} parent 1:10 pfifo limit 1000")


def unshape(net: benchnet.Net) -> None:
    netns.run(net.rt, f"tc qdisc del dev {UP} root", check=False)


def htb_counts(net: benchnet.Net) -> tuple[int, int]:
    """(packets sent, packets dropped) by the uplink's root qdisc."""
    out = netns.run(net.rt, f"tc -s qdisc show dev {UP}").stdout
    m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--family", type=int, default=4, choices=(4, 6))
    ap.add_argument("--rate", default="10gbit", help="the htb class's rate (above the offered load)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--offload-timeout", type=float, default=60.0)
    ap.add_argument("--setup-rate", type=float, default=25_000.0)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "shaping.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_shaping: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench_shaping: needs two CPUs (router on one, generator on the other)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    results: dict = {"method": {"flows": args.flows, "family": args.family, "htb_rate": args.rate,
                                "reps": args.reps, "window_s": args.window, "kernel": os.uname().release,
                                "router_cpu": ROUTER_CPU, "host_cpu": HOST_CPU}, "cases": {}}
    with benchnet.network(threaded=True) as net:
        net.pin(ROUTER_CPU, HOST_CPU, realtime_hosts=True)
        # the router benchmark's own options: its floor program at the TC hook (unused here)
        # and the flow counts as it takes them
        bench = Bench(net, argparse.Namespace(**{**vars(args), "mode": "tc", "flows": str(args.flows)}))
        try:
            net.flush_conntrack()
            bench.gen.configure(src_mac=net.mac[GEN_IF], dst_mac=net.mac[LAN], src4=V4["gen"], dst4=V4["snk"],
                                src6=V6["gen"], dst6=V6["snk"], flows=args.flows)
            est = bench.establish(args.family, args.flows)
            print(f"IPv{args.family} {args.flows} flows established in {est['seconds']:.1f} s "
                  f"({est['unreplied']} unreplied)", flush=True)
            for case in CASES:
                shaped = case.endswith("+htb")
                if shaped:
                    shape(net, args.rate)
                q0 = htb_counts(net) if shaped else (0, 0)
                try:
                    if case.startswith("kernel"):
                        r = bench.kernel(args.family)
                    else:
                        mode = "native" if case.endswith("native") else "tc"
                        r = bench.pyflow(args.family, args.flows, mode)
                    q1 = htb_counts(net) if shaped else (0, 0)
                    # packets the shaper sent and dropped over the whole case (warm-up included):
                    # a drop costs router CPU that no forwarded packet accounts for
                    r["through_htb_packets"], r["htb_dropped"] = q1[0] - q0[0], q1[1] - q0[1]
                finally:
                    if shaped:
                        unshape(net)
                results["cases"][case] = r
                nsp = r["ns_per_packet"]
                print(f"  {case:14} {r['pps']['median'] / 1e3:7.0f} kpps, {nsp['median']:6.0f} router ns/pkt "
                      f"(windows {nsp['min']:.0f}..{nsp['max']:.0f})"
                      + (f", {r['through_htb_packets']} packets through htb, {r['htb_dropped']} dropped there"
                         if shaped else ""), flush=True)
        finally:
            bench.close()
    results["wall_s"] = time.monotonic() - t_start
    c = results["cases"]

    def ns(case: str) -> float:
        return float(c[case]["ns_per_packet"]["median"])

    print(f"\nrouter CPU per forwarded packet, 64-byte UDP, {args.flows} flows, IPv{args.family} "
          f"(median of {args.reps} windows of {args.window} s)")
    print(f"{'':16} {'no shaping':>12} {'htb':>12} {'htb cost':>10}")
    for base, label in (("kernel", "kernel path"), ("pyflow tc", "pyflow tc")):
        a, b = ns(base), ns(f"{base}+htb")
        print(f"{label:16} {a:9.0f} ns {b:9.0f} ns {b - a:+7.0f} ns")
    print(f"{'pyflow native':16} {ns('pyflow native'):9.0f} ns {'(refused)':>12}")
    print(f"pyflow tc+htb / kernel+htb: {ns('pyflow tc+htb') / ns('kernel+htb'):.2f}; "
          f"pyflow tc / pyflow native: {ns('pyflow tc') / ns('pyflow native'):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
