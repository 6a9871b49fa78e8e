"""Router packets per second: kernel NAT path vs pyflow vs a bare redirect, side by side.

Run as root: ``python tests/bench/bench_router.py [--quick] [--flows 1,1000,100000,1000000]
[--mode tc|generic|native] [--max-flows6 100000]``. Prints a table and writes
bench-results/router.json.

Setup (tests/bench/benchnet.py): sender -- router -- receiver, three namespaces on veth
pairs, the router masquerading (nftables, conntrack) what leaves its uplink. The sender is
a packet socket (tests/bench/trafficgen.py): 64-byte UDP frames (IPv4 60 bytes, IPv6 62
bytes before the FCS) arriving at the router as skbs from its veth peer, over 1, 1,000,
100,000 or 1,000,000 flows (port pairs; IPv6 up to --max-flows6). Above 200,000 flows the
flow map is sized for them and the machine's conntrack limit (nf_conntrack_max, which a
namespace may only lower) is raised for the run and put back after. The receiver is an
XDP program counting and dropping what arrives. NAPI is threaded on all four veths: the
router's two NAPI threads are pinned to CPU 1, the generator and the receiver's thread to
CPU 0, so the router has a core of its own (shared only with the rest of the machine) and
its CPU time is those two threads'.

Per (family, flow count), in one run and in this order:
1. flows are established: every flow sends one datagram (paced at --setup-rate, with the
   router's NAPI threads briefly SCHED_FIFO so that no frame is lost to a full ring), which
   the receiver's sink hands to a socket echo there, so that conntrack sees a reply for each
   flow (pyflow offloads UDP only once a reply was seen); repeated until no flow is left
   UNREPLIED (at most three passes); the router's UDP conntrack timeouts are 300 s, so no
   flow expires before its last measurement;
2. ``kernel``: no XDP on the router; routing, conntrack and masquerade in the kernel;
3. ``pyflow``: the datapath at ``--mode`` on both router ports (TC ingress by default, what
   ``auto`` takes on veth) and pyflow's control plane running (a keep-alive tick every
   second, as a daemon would); measured once every flow is offloaded and the keep-alive has
   written each one's long timeout once more (the start's work, timed as settle_s); the control plane's
   own thread is moved off the router's CPU and its CPU time per wall second is reported
   beside the NAPI threads' (``control_cpu_share``);
4. ``floor``: a program on the router's LAN port at the same hook as pyflow (TC ingress:
   bpf_redirect; generic or native XDP: a devmap redirect) sending every frame to the
   uplink (no parsing, no lookup, no rewrite): the most a forwarding program at that hook
   can do on this machine;
5. with ``--extra-mode`` (up to ``--extra-max-flows``): ``pyflow_MODE`` and ``floor_MODE``,
   the same two at another hook (native XDP on veth, say), in the same run.
With ``--perf-flows`` (IPv4 flow counts) every path of those rows is also profiled after
its windows, the generator still sending: 2 s of ``perf record`` on the router's CPU
(cpu-clock: no hardware counters here), the hottest kernel and BPF symbols in ``perf_top``.
Each is measured for ``--reps`` consecutive windows of ``--window`` seconds while the
generator sends without pause: packets per second delivered to the receiver, and router
CPU nanoseconds per forwarded packet (the router's NAPI threads' schedstat run time over
the window divided by the packets the router sent out of its uplink; the few the receiver
could not take are reported as receiver_loss). Medians and spread over the windows; ratios
are taken from the same run, because the machine is shared and absolute figures drift.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402
from tests.bench import benchnet, trafficgen  # noqa: E402
from tests.bench.benchnet import GEN_IF, LAN, SNK_IF, UP, V4, V6  # noqa: E402

ROUTER_CPU, HOST_CPU = 1, 0
FLOOR_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_DEVMAP(floor_tx, 1);
int floor_fwd(struct xdp_md *ctx) { return floor_tx.redirect_map(0, XDP_PASS); }
int floor_tc(struct __sk_buff *skb) { return bpf_redirect(FLOOR_IFINDEX, 0); }
"""
XDP_FLAGS_SKB_MODE = 1 << 1  # <linux/if_link.h>: generic XDP
MODES = ("tc", "generic", "native")  # pyflow's attach modes the floor can follow
BIG = 200_000  # flow counts above this need a larger flow map and conntrack table
CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


def thread_cpu_ns(tid: int) -> int:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        return 0


def perf_top(cpu: int, seconds: float, n: int = 12) -> list[tuple[str, float]]:
    """Where CPU `cpu` spends its time for `seconds` (perf record, the cpu-clock software
    event: this machine has no hardware counters): the n hottest symbols with their share
    of the samples (idle included, so shares add up to the CPU's busy share)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pft-perf-") as tmp:
        data = f"{tmp}/perf.data"
        try:
            rec = subprocess.run(["perf", "record", "-q", "-C", str(cpu), "-F", "2000", "-o", data, "--",
                                  "sleep", str(seconds)], capture_output=True, text=True,
                                 timeout=seconds + 30)
        except FileNotFoundError:
            return [("perf is not installed (Debian: linux-perf)", 0.0)]
        if rec.returncode:
            return [(f"perf record failed: {rec.stderr.strip()[:80]}", 0.0)]
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio",
                              "-g", "none"], capture_output=True, text=True, timeout=120)
    top = []
    for line in rep.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and not line.startswith("#"):
            try:
                top.append((" ".join(parts[2:]), float(parts[0][:-1]) / 100))
            except ValueError:
                continue
        if len(top) >= n:
            break
    return top


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


class Bench:
    def __init__(self, net: benchnet.Net, args: argparse.Namespace):
        from bcc import BPF

        self.net, self.args = net, args
        self.profiling = False  # perf record on the router's CPU after the windows (--perf-flows)
        self.gen = trafficgen.Generator()
        self.sink = trafficgen.Sink()   # on the receiver's port
        self.back = trafficgen.Sink()   # on the sender's port: replies while establishing
        self.sink.configure(mode=trafficgen.SINK_DROP, src4=V4["up"], dst4=V4["snk"], src6=V6["up"],
                            dst6=V6["snk"])
        self.back.configure(mode=trafficgen.SINK_DROP, src4=V4["snk"], dst4=V4["gen"], src6=V6["snk"],
                            dst6=V6["gen"])
        with netns.inside(net.snk):
            self.sink.attach(SNK_IF)
        with netns.inside(net.gen):
            self.back.attach(GEN_IF)
        # the floor: a program that only redirects every frame to the uplink, at the hook
        # pyflow runs on in this run (TC ingress, generic XDP or native XDP)
        self.floor = BPF(text=FLOOR_SRC, cflags=[f"-DFLOOR_IFINDEX={net.ifindex[UP]}"])
        self.floor_fns = {"tc": self.floor.load_func("floor_tc", BPF.SCHED_CLS),
                          "xdp": self.floor.load_func("floor_fwd", BPF.XDP)}
        with netns.inside(net.rt):
            # a devmap resolves ifindexes in the updating thread's namespace
            self.floor["floor_tx"][ct.c_int(0)] = ct.c_int(net.ifindex[UP])
        from pyflow.datapath.loader import Datapath

        self.pin = f"/sys/fs/bpf/pft-bench-router-{os.getpid()}"
        most = max(int(x) for x in args.flows.split(","))
        # two entries per flow, room to spare; the default map holds 131k connections
        defines = {"PYFLOW_MAX_FLOWS": 2 * most + 65536} if most > BIG // 2 else None
        with netns.inside(net.rt):
            self.dp = Datapath(pin_dir=self.pin, state_file=f"/run/pft-bench-router-{os.getpid()}.json",
                               defines=defines)

    def close(self) -> None:
        with netns.inside(self.net.rt):
            self.dp.destroy()

    # -- flows -------------------------------------------------------------------------

    def unreplied(self) -> int:
        out = netns.run(self.net.rt, "conntrack -L -p udp", check=False, timeout=120).stdout
        return sum(1 for line in out.splitlines() if "UNREPLIED" in line)

    def establish(self, family: int, flows: int) -> dict:
        """Every flow sends one datagram, answered by a socket echo on the receiver; passes
        are repeated while conntrack still holds flows without a reply."""
        self.sink.configure(mode=trafficgen.SINK_PASS, src4=V4["up"], dst4=V4["snk"], src6=V6["up"],
                            dst6=V6["snk"])
        ports = sorted({trafficgen.flow_ports(i)[1] for i in (0, flows - 1)})
        echo = trafficgen.Echo(self.net.snk, list(range(ports[0], ports[-1] + 1)))
        t0 = time.monotonic()
        passes, left, answered, diag = 0, flows, 0, []
        try:
            while passes < 3:
                self.gen.reset_sequence()
                passes += 1
                s0, b0 = self.sink.counts()["packets"], self.back.counts()["packets"]
                l0 = self.net.router_links()
                with self.net.router_realtime():
                    trafficgen.paced(self.gen, self.net.gen, self.net.ifindex[GEN_IF], family, frames=flows,
                                     rate=self.args.setup_rate, cpu=HOST_CPU)
                    self._wait_replies()
                l1 = self.net.router_links()
                left = self.unreplied()
                diag.append({"handed_to_echo": self.sink.counts()["packets"] - s0,
                             "replies_back": self.back.counts()["packets"] - b0,
                             "router_lan_rx_dropped": l1[LAN]["rx_dropped"] - l0[LAN]["rx_dropped"],
                             "router_up_rx_dropped": l1[UP]["rx_dropped"] - l0[UP]["rx_dropped"],
                             "unreplied": left})
                if left == 0:
                    break
        finally:
            answered = echo.stop()
            self.sink.configure(mode=trafficgen.SINK_DROP, src4=V4["up"], dst4=V4["snk"], src6=V6["up"],
                                dst6=V6["snk"])
        return {"seconds": time.monotonic() - t0, "passes": passes, "unreplied": left, "echoed": answered,
                "conntrack_entries": self.net.conntrack_count(), "per_pass": diag}

    def _wait_replies(self, limit: float = 30.0) -> None:
        """Until the echo has answered everything it was handed (replies counted where they
        arrive, at the sender), or answers stop coming for a second."""
        deadline, last, last_change = time.monotonic() + limit, -1, time.monotonic()
        while time.monotonic() < deadline:
            handed, back = self.sink.counts()["packets"], self.back.counts()["packets"]
            if back >= handed:
                return
            if back != last:
                last, last_change = back, time.monotonic()
            elif time.monotonic() - last_change > 1.0:
                return
            time.sleep(0.05)

    # -- measuring ---------------------------------------------------------------------

    @staticmethod
    def _cp_ns(tid: int | None, extra_cpu_s: Any) -> int:
        return (thread_cpu_ns(tid) if tid else 0) + (int(extra_cpu_s() * 1e9) if extra_cpu_s else 0)

    def blaster(self, family: int, seconds: float) -> trafficgen.Blaster:
        return trafficgen.Blaster(self.gen, self.net.gen, self.net.ifindex[GEN_IF], family,
                                  cpu=HOST_CPU, max_seconds=seconds).start()

    def measure(self, family: int, extra_tid: int | None = None, extra_cpu_s: Any = None,
                running: trafficgen.Blaster | None = None) -> dict:
        """Windows of steady sending: delivered pps, router ns/packet, CPU shares. ``running``:
        a generator already sending (kept sending while pyflow offloads: flows stay active)."""
        a = self.args
        blaster = running or self.blaster(family, a.warmup + a.reps * a.window + 20)
        pps, ns_pkt, router_share, cp_share, matched, sink_loss, fwd = [], [], [], [], [], [], []
        try:
            time.sleep(a.warmup)
            for _ in range(a.reps):
                c0, l0, r0, x0, t0 = (self.sink.counts(), self.net.router_links(), self.net.router_cpu_ns(),
                                      self._cp_ns(extra_tid, extra_cpu_s), time.monotonic())
                time.sleep(a.window)
                c1, l1, r1, x1, t1 = (self.sink.counts(), self.net.router_links(), self.net.router_cpu_ns(),
                                      self._cp_ns(extra_tid, extra_cpu_s), time.monotonic())
                n, dt = c1["packets"] - c0["packets"], t1 - t0
                # what the router sent out of its uplink, taken by the receiver or not
                sent = sum(l1[UP][k] - l0[UP][k] for k in ("tx", "tx_dropped"))
                pps.append(n / dt)
                fwd.append(sent / dt)
                ns_pkt.append((r1 - r0) / max(sent, 1))
                router_share.append((r1 - r0) / dt / 1e9)
                cp_share.append((x1 - x0) / dt / 1e9)
                matched.append((c1["matched"] - c0["matched"]) / max(n, 1))
                sink_loss.append((l1[UP]["tx_dropped"] - l0[UP]["tx_dropped"]) / max(sent, 1))
            profile = perf_top(ROUTER_CPU, 2.0) if self.profiling else None
        finally:
            st = blaster.stop()
        out = {"pps": summarize(pps), "router_forwarded_pps": summarize(fwd),
               "ns_per_packet": summarize(ns_pkt), "router_cpu_share": summarize(router_share),
               "offered_pps": st.frames / max(st.seconds, 1e-9),
               "matched_fraction": min(matched), "receiver_loss": summarize(sink_loss)}
        if extra_tid:
            out["control_cpu_share"] = summarize(cp_share)
        if profile is not None:
            out["perf_top"] = profile
        return out

    def kernel(self, family: int) -> dict:
        return self.measure(family)

    def floor_path(self, family: int, mode: str | None = None) -> dict:
        mode = mode or self.args.mode
        with netns.inside(self.net.rt):
            if mode == "tc":
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    idx = self.net.ifindex[LAN]
                    ipr.tc("add", "clsact", idx)
                    ipr.tc("add-filter", "bpf", idx, ":1", fd=self.floor_fns["tc"].fd, name="pft_floor",
                           parent="ffff:fff2", classid=1, direct_action=True)
            else:
                flags = XDP_FLAGS_SKB_MODE if mode == "generic" else 0
                self.floor.attach_xdp(LAN.encode(), self.floor_fns["xdp"], flags)
        try:
            return self.measure(family)
        finally:
            with netns.inside(self.net.rt):
                if mode == "tc":
                    from pyroute2 import IPRoute

                    with IPRoute() as ipr:
                        ipr.tc("del", "clsact", self.net.ifindex[LAN])
                else:
                    self.floor.remove_xdp(LAN.encode(), XDP_FLAGS_SKB_MODE if mode == "generic" else 0)

    def pyflow(self, family: int, flows: int, mode: str | None = None) -> dict:
        from pyflow.control.engine import EngineConfig
        from pyflow.control.runner import ControlConfig, ControlPlane
        from pyflow.datapath.abi import MAP_FLOWS
        from pyflow.datapath.flowtable import FlowTable

        mode = mode or self.args.mode
        with netns.inside(self.net.rt):
            for dev in (LAN, UP):
                self.dp.attach(dev, mode)
            cp = ControlPlane(self.dp, ControlConfig(engine=EngineConfig(), keepalive_period_s=1.0))
            # the flows keep moving while they are offloaded (a million take half a minute, and
            # a flow with no packet for idle_timeout_s is handed back)
            a = self.args
            blaster = self.blaster(family, a.offload_timeout + flows / 5000 + 30 + flows / 4000
                                   + a.warmup + a.reps * a.window + 20)
            t0 = time.monotonic()
            cp.start()
        try:
            # until every flow is offloaded, or the count stops growing (a flow whose reply was
            # lost while establishing is never offloaded: it is reported, not waited for)
            deadline = t0 + self.args.offload_timeout + flows / 5000  # 1M: about 3 min more
            last, last_change = -1, time.monotonic()
            while time.monotonic() < deadline:
                n = len(cp.engine.offloaded)
                if n >= flows or (n > 0 and time.monotonic() - last_change > 3.0):
                    break
                if n != last:
                    last, last_change = n, time.monotonic()
                time.sleep(0.05)
            offloaded, waited = len(cp.engine.offloaded), time.monotonic() - t0
            # the steady state: after the installs the keep-alive writes every connection's
            # long timeout once more (keepalive.SETTLE_NS, a share of the table per tick);
            # measured apart, not mixed into the windows
            t_settle = time.monotonic()
            settle_deadline = t_settle + 30 + flows / 4000
            while cp.engine.stats.refreshes < offloaded and time.monotonic() < settle_deadline:
                time.sleep(0.1)
            settled = time.monotonic() - t_settle
            tid = cp._thread.native_id if cp._thread is not None else None
            if tid is not None:
                # beside the generator, off the router's CPU: the control plane's time is
                # reported as its own share, not mixed into the router's per-packet figure
                os.sched_setaffinity(tid, {HOST_CPU})
            # the control plane = its loop thread and the keep-alive's map reads (a thread each)
            res = self.measure(family, extra_tid=tid, running=blaster,
                               extra_cpu_s=lambda: cp.reader.total_cpu_s if cp.reader else 0.0)
            st = cp.engine.stats
            res["engine"] = {"offloaded": st.offloaded, "refused": dict(st.refused),
                             "removed": dict(st.removed), "pending": st.pending,
                             "install_errors": st.install_errors, "resyncs": st.resyncs,
                             "lost_events": getattr(cp.ct, "lost_events", None)}
            res.update({"offloaded": offloaded, "offload_wait_s": waited, "mode": mode, "settle_s": settled,
                        "keepalive": {"walks": cp.engine.pacer.walks,
                                      "walk_cpu_s": cp.engine.pacer.last_cost_s,
                                      "interval_s": cp.engine.pacer.interval_s},
                        "forwarded_by_fast_path": self.dp.reason_counts().get("forwarded", (0, 0))[0]})
            return res
        finally:
            # No hand-back: it removes connections one by one (tens of seconds for 100,000),
            # and stop() stops waiting after 10 s. The loop is stopped and joined, the map
            # cleared here, and the next flow count starts from a flushed conntrack anyway.
            blaster._stop.set()  # stopped by measure() already, unless something failed before
            with netns.inside(self.net.rt):
                cp.stop(hand_back=False)
                if cp._thread is not None:
                    cp._thread.join(60)
                for dev in (LAN, UP):
                    self.dp.detach(dev)
                table = FlowTable(self.dp.map_fd(MAP_FLOWS))
                try:
                    table.clear()
                finally:
                    table.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 and 1,000 flows, IPv4 only, 3 short windows")
    ap.add_argument("--flows", default="1,1000,100000")
    ap.add_argument("--families", default="4,6")
    ap.add_argument("--max-flows6", type=int, default=100_000,
                    help="IPv6 runs only the flow counts up to this (1M flows take minutes per family)")
    ap.add_argument("--mode", choices=MODES, default="tc",
                    help="pyflow's hook on the router's ports and the floor's (tc: auto's choice on veth)")
    ap.add_argument("--extra-mode", choices=MODES, default=None,
                    help="also pyflow and the floor at this hook (paths pyflow_MODE, floor_MODE)")
    ap.add_argument("--extra-max-flows", type=int, default=100_000,
                    help="the extra mode only up to this many flows")
    ap.add_argument("--perf-flows", default="",
                    help="IPv4 flow counts whose paths are also profiled on the router CPU (perf, 2 s each)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--offload-timeout", type=float, default=60.0)
    ap.add_argument("--setup-rate", type=float, default=25_000.0,
                    help="frames per second while establishing flows (the kernel path takes new flows)")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "router.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_router: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    if args.quick:
        args.flows, args.families, args.reps, args.window = "1,1000", "4", 3, 0.5
    flow_counts = [int(x) for x in args.flows.split(",")]
    families = [int(x) for x in args.families.split(",")]
    if os.cpu_count() is None or os.cpu_count() < 2:
        print("bench_router: needs two CPUs (router on one, generator on the other)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    results: dict = {"method": {
        "frame_bytes": {"4": trafficgen.V4_FRAME, "6": trafficgen.V6_FRAME}, "reps": args.reps,
        "window_s": args.window, "router_cpu": ROUTER_CPU, "host_cpu": HOST_CPU,
        "kernel": os.uname().release, "cpus": os.cpu_count()}, "rows": []}
    results["method"]["mode"] = args.mode
    results["method"]["extra_mode"] = args.extra_mode
    ct_max_before = None
    if max(flow_counts) > BIG:
        # conntrack's limit is the machine's (a namespace may only lower it): raised for the
        # run, put back after
        ct_max_before = Path(CT_MAX).read_text().strip()
        Path(CT_MAX).write_text(str(max(flow_counts) + 100_000))
    try:
        return run(args, flow_counts, families, results, t_start)
    finally:
        if ct_max_before is not None:
            Path(CT_MAX).write_text(ct_max_before)


def run(args: argparse.Namespace, flow_counts: list[int], families: list[int], results: dict,
        t_start: float) -> int:
    perf_flows = {int(x) for x in args.perf_flows.split(",") if x} if args.perf_flows else set()
    with benchnet.network(threaded=True) as net:
        net.pin(ROUTER_CPU, HOST_CPU, realtime_hosts=True)
        if max(flow_counts) > BIG:
            netns.run(net.rt, f"sysctl -qw net.netfilter.nf_conntrack_max={max(flow_counts) + 100_000}")
        bench = Bench(net, args)
        try:
            for family in families:
                for flows in flow_counts:
                    if family == 6 and flows > args.max_flows6:
                        continue
                    net.flush_conntrack()
                    bench.gen.configure(src_mac=net.mac[GEN_IF], dst_mac=net.mac[LAN], src4=V4["gen"],
                                        dst4=V4["snk"], src6=V6["gen"], dst6=V6["snk"], flows=flows)
                    est = bench.establish(family, flows)
                    row = {"family": family, "flows": flows, "establish": est}
                    print(f"IPv{family} {flows:>7} flows: established in {est['seconds']:.1f} s "
                          f"({est['passes']} passes, {est['unreplied']} unreplied)", flush=True)
                    bench.profiling = family == 4 and flows in perf_flows
                    paths = ["kernel", "pyflow", "floor"]
                    if args.extra_mode and flows <= args.extra_max_flows:
                        paths += [f"pyflow_{args.extra_mode}", f"floor_{args.extra_mode}"]
                    for path in paths:
                        if path == "kernel":
                            row[path] = bench.kernel(family)
                        elif path == "pyflow":
                            row[path] = bench.pyflow(family, flows)
                        elif path == "floor":
                            row[path] = bench.floor_path(family)
                        elif path.startswith("pyflow_"):
                            row[path] = bench.pyflow(family, flows, args.extra_mode)
                        else:
                            row[path] = bench.floor_path(family, args.extra_mode)
                        r = row[path]
                        extra = (f", offloaded {r['offloaded']} after {r['offload_wait_s']:.1f} s "
                                 f"{r['engine']}" if path.startswith("pyflow") else "")
                        print(f"   {path:14} {r['pps']['median'] / 1e3:8.0f} kpps "
                              f"({r['pps']['min'] / 1e3:.0f}..{r['pps']['max'] / 1e3:.0f}), "
                              f"{r['ns_per_packet']['median']:7.0f} router ns/pkt, "
                              f"offered {r['offered_pps'] / 1e3:.0f} kpps{extra}", flush=True)
                    results["rows"].append(row)
        finally:
            bench.close()
    results["wall_s"] = time.monotonic() - t_start
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


def report(results: dict) -> None:
    print(f"\nrouter pps, 64-byte UDP through a NAT router (median of {results['method']['reps']} "
          f"windows of {results['method']['window_s']} s); ratios within the same run")
    print(f"{'case':18} {'kernel kpps':>11} {'pyflow kpps':>11} {'floor kpps':>10} {'pyflow/kern':>11} "
          f"{'pyflow/floor':>12} {'ns/pkt k/p/f':>18}")
    for row in results["rows"]:
        k, p, f = (row[x]["pps"]["median"] for x in ("kernel", "pyflow", "floor"))
        nk, np_, nf = (row[x]["ns_per_packet"]["median"] for x in ("kernel", "pyflow", "floor"))
        print(f"IPv{row['family']} {row['flows']:>7} flows {k / 1e3:11.0f} {p / 1e3:11.0f} {f / 1e3:10.0f} "
              f"{p / k:10.2f}x {p / f:11.0%} {nk:6.0f}/{np_:4.0f}/{nf:4.0f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
