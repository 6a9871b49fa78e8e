"""Micro-benchmark of the datapath through BPF_PROG_TEST_RUN (ns per packet).

Run as root: ``python tests/bench/bench_datapath.py [--quick]``. Prints a table and
writes bench-results/datapath.json.

Why a harness program: BPF_PROG_TEST_RUN replays one buffer ``repeat`` times without
restoring it, so after the first run a forwarded packet would carry the rewritten
MACs, NATed addresses and a lower TTL and stop being a hit. Every measured program
is therefore reached through the same harness: a small program that copies a packet
template over the buffer (rotating through many templates, so that with many flows
the lookups touch many buckets as real traffic does) and tail-calls the program
under test. All rows pay the same harness cost; the ``harness`` row (harness +
XDP_PASS) shows it, and the ``net`` column subtracts it.

Rows, each for the XDP and the TC build: a hit (IPv4 TCP with SNAT+DNAT), a hit
(IPv6 TCP, no NAT), a miss, and the floor: a minimal program that only redirects.
Then the IPv4 hit at 1k, 10k, 100k and 1M flows in the map.

Profile (where a hit's time goes, at 1 flow and at 100k flows spread over the table):
variants of the datapath compiled from a copy of ebpf/ in which one part is cut, each run
through the same harness on the same IPv4 NAT hit; a part's cost is the difference
between two variants:
  stop_before_lookup   returns (as a hit does) right after parsing
  stop_before_redirect returns after the lookup and the checks
  stop_before_rewrite  returns after the redirect helper and the L2 resize
  no_counters          the full hit without the counter updates (two atomics, the coarse
                       clock, the per-CPU forwarded stats)
  plain_counters       the full hit with its two atomic adds made plain adds
  no_csum_helpers      the full hit without the checksum helpers (TC: bpf_l4_csum_replace,
                       bpf_csum_update; XDP computes its checksums inline and has none)
So: parse = stop_before_lookup - harness; lookup and checks = stop_before_redirect -
stop_before_lookup; redirect = stop_before_rewrite - stop_before_redirect; rewrite and
checksums = no_counters - stop_before_rewrite; counters = full - no_counters, of which
atomics = full - plain_counters; checksum helpers = full - no_csum_helpers. A variant's
packets are wrong in the part cut; only its time is used.
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

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pyflow.datapath import abi
from pyflow.datapath.bpfsource import TC_FUNC, XDP_FUNC, compile_datapath
from pyflow.datapath.flowtable import FlowTable
from pyflow.datapath.testrun import TEST_IFINDEX, run

FRAME = 96  # bytes restored per run; every template frame is exactly this long
MAX_TEMPLATES = 16384
SPREAD = 1000  # flows the "spread" scale series rotates through
ROUTER_MAC, NEXTHOP_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"

HARNESS_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
struct frame { u8 b[%(FRAME)d]; };
/* One prog array per hook: the kernel binds a prog array to the type of its first user. */
BPF_PROG_ARRAY(under_test_xdp, 1);
BPF_PROG_ARRAY(under_test_tc, 1);
BPF_ARRAY(templates, struct frame, %(MAX_TEMPLATES)d);
BPF_PERCPU_ARRAY(cursor, u32, 1);
BPF_ARRAY(ntemplates, u32, 1);
BPF_DEVMAP(floor_tx, 1);

static __always_inline struct frame *next_template(void)
{
	int zero = 0;
	u32 *n = ntemplates.lookup(&zero);
	u32 *c = cursor.lookup(&zero);
	if (!n || !c || *n == 0)
		return 0;
	u32 i = *c;
	*c = i + 1 >= *n ? 0 : i + 1;
	return templates.lookup(&i);
}

int harness_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct frame *t = next_template();
	if (!t || data + sizeof(*t) > end)
		return XDP_ABORTED;
	__builtin_memcpy(data, t->b, sizeof(*t));
	under_test_xdp.call(ctx, 0);
	return XDP_ABORTED;
}

int harness_tc(struct __sk_buff *skb)
{
	struct frame *t = next_template();
	if (!t || bpf_skb_store_bytes(skb, 0, t->b, sizeof(*t), 0))
		return TC_ACT_SHOT;
	under_test_tc.call(skb, 0);
	return TC_ACT_SHOT;
}

/* The floor: the least a forwarding program can do. */
int floor_xdp(struct xdp_md *ctx) { return floor_tx.redirect_map(0, XDP_PASS); }
int floor_tc(struct __sk_buff *skb) { return bpf_redirect(%(IFINDEX)d, 0); }
/* Harness cost alone. */
int pass_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int pass_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


def v4_addr(i: int) -> tuple[str, int]:
    return f"198.18.{(i >> 8) & 0xFF}.{i & 0xFF}", 1024 + (i >> 16)


def v4_flow(i: int) -> tuple[abi.FlowKey, abi.FlowAction]:
    """Flow i: client 198.18.x.y:port -> server 198.19.0.1:80, SNAT to 198.19.255.1 and DNAT."""
    src, sport = v4_addr(i)
    key = abi.FlowKey(TEST_IFINDEX, abi.PROTO_TCP, src, "198.19.0.1", sport, 80)
    action = abi.FlowAction(TEST_IFINDEX, 0, 1500, ROUTER_MAC, NEXTHOP_MAC, ROUTER_MAC,
                            nat_saddr="198.19.255.1", nat_sport=40000 + (i & 0x3FFF),
                            nat_daddr="198.19.1.1", nat_dport=8080)
    return key, action


def v4_frame(i: int) -> bytes:
    src, sport = v4_addr(i)
    return pad(Ether(dst=ROUTER_MAC, src=CLIENT_MAC) / IP(src=src, dst="198.19.0.1", ttl=64)
               / TCP(sport=sport, dport=80, flags="A"))


def v6_addr(i: int) -> str:
    return f"2001:2::{(i >> 16) & 0xFFFF:x}:{i & 0xFFFF:x}"


def v6_flow(i: int) -> tuple[abi.FlowKey, abi.FlowAction]:
    key = abi.FlowKey(TEST_IFINDEX, abi.PROTO_TCP, v6_addr(i), "2001:2:0:1::1", 1024, 443)
    return key, abi.FlowAction(TEST_IFINDEX, 0, 1500, ROUTER_MAC, NEXTHOP_MAC, ROUTER_MAC)


def v6_frame(i: int) -> bytes:
    return pad(Ether(dst=ROUTER_MAC, src=CLIENT_MAC) / IPv6(src=v6_addr(i), dst="2001:2:0:1::1", hlim=64)
               / TCP(sport=1024, dport=443, flags="A"))


def pad(pkt) -> bytes:
    """The packet padded with zeros to exactly FRAME bytes; scapy fills lengths and checksums."""
    out = bytes(pkt / Raw(bytes(FRAME - len(pkt))))
    assert len(out) == FRAME, len(out)
    return out


class Harness:
    def __init__(self):
        from bcc import BPF

        self.bpf = BPF(text=HARNESS_SRC % {"FRAME": FRAME, "MAX_TEMPLATES": MAX_TEMPLATES,
                                            "IFINDEX": TEST_IFINDEX})
        self.bpf["floor_tx"][ct.c_int(0)] = ct.c_int(TEST_IFINDEX)
        self.fn = {
            "xdp": self.bpf.load_func("harness_xdp", BPF.XDP),
            "tc": self.bpf.load_func("harness_tc", BPF.SCHED_CLS),
            "floor_xdp": self.bpf.load_func("floor_xdp", BPF.XDP),
            "floor_tc": self.bpf.load_func("floor_tc", BPF.SCHED_CLS),
            "pass_xdp": self.bpf.load_func("pass_xdp", BPF.XDP),
            "pass_tc": self.bpf.load_func("pass_tc", BPF.SCHED_CLS),
        }

    def set_templates(self, frames: list[bytes]) -> None:
        frames = frames[:MAX_TEMPLATES]
        t = self.bpf["templates"]
        for i, f in enumerate(frames):
            t[ct.c_int(i)] = t.Leaf.from_buffer_copy(f)
        self.bpf["ntemplates"][ct.c_int(0)] = ct.c_uint(len(frames))

    def measure(self, hook: str, target_fd: int, repeat: int, rounds: int) -> list[float]:
        """Mean ns per packet of harness + target, one value per round."""
        self.bpf[f"under_test_{hook}"][ct.c_int(0)] = ct.c_int(target_fd)
        xdp = hook == "xdp"
        results = []
        for _ in range(rounds):
            r = run(self.fn[hook].fd, bytes(FRAME), repeat=repeat, xdp=xdp)
            results.append(float(r.duration_ns))
        return results


# (variant, file under ebpf/, text, replacement): every text must be found, or the
# datapath changed under the profile and it says so instead of measuring something else
_SEND = "\treturn ctx_redirected(is_tc);\n"  # how a variant ends early: as a hit ends
_PKTS = "__sync_fetch_and_add(&flow->counters.packets, ctx_gso_segs(ctx, is_tc));"
_BYTES = "__sync_fetch_and_add(&flow->counters.bytes, pkt.l3len);"
PROFILE_CUTS: dict[str, list[tuple[str, str, str]]] = {
    "stop_before_lookup": [("pyflow_xdp.c", "\t/* 3. flow */\n", "\t/* 3. flow */\n" + _SEND)],
    "stop_before_redirect": [("pyflow_xdp.c", "\tvia_ppp = ctx_via_ppp(",
                              _SEND + "\tvia_ppp = ctx_via_ppp(")],
    "stop_before_rewrite": [("pyflow_xdp.c", "\t/* 5. rewrite;", _SEND + "\t/* 5. rewrite;")],
    "no_counters": [("pyflow_xdp.c", "\t" + _PKTS, _SEND + "\t" + _PKTS)],
    "plain_counters": [("pyflow_xdp.c", _PKTS, "flow->counters.packets += ctx_gso_segs(ctx, is_tc);"),
                       ("pyflow_xdp.c", _BYTES, "flow->counters.bytes += pkt.l3len;")],
    "no_csum_helpers": [("lib/context.h", "bpf_l4_csum_replace(", "0 && bpf_l4_csum_replace("),
                        ("lib/context.h", "bpf_csum_update(", "0 && bpf_csum_update(")],
}
PROFILE_PARTS = (  # (part, minuend, subtrahend)
    ("parse", "stop_before_lookup", "harness"),
    ("lookup_and_checks", "stop_before_redirect", "stop_before_lookup"),
    ("redirect", "stop_before_rewrite", "stop_before_redirect"),
    ("rewrite_and_checksums", "no_counters", "stop_before_rewrite"),
    ("counters", "full", "no_counters"),
    ("  of which atomics", "full", "plain_counters"),
    ("checksum_helpers", "full", "no_csum_helpers"),
)


def compile_variant(name: str, defines: dict[str, int]):
    """The datapath compiled from a copy of ebpf/ with PROFILE_CUTS[name] applied."""
    import shutil
    import tempfile

    from bcc import BPF

    from pyflow.datapath.bpfsource import EBPF_DIR

    with tempfile.TemporaryDirectory(prefix="pft-dpprof-") as tmp:
        root = Path(tmp) / "ebpf"
        shutil.copytree(EBPF_DIR, root)
        for rel, text, repl in PROFILE_CUTS[name]:
            f = root / rel
            src = f.read_text()
            if text not in src:
                raise RuntimeError(f"profile variant {name}: {text.strip()!r} not found in ebpf/{rel}")
            f.write_text(src.replace(text, repl))
        flags = [f"-I{root / 'include'}", f"-I{root}", "-Wno-unused-function", "-w"]
        flags += [f"-D{k}={v}" for k, v in defines.items()]
        return BPF(src_file=str(root / "pyflow_xdp.c").encode(), cflags=flags)


def profile(h: Harness, repeat: int, rounds: int, quick: bool) -> dict:
    """ns per run of each variant at 1 flow (hot) and 100k flows (1,000 of them spread over
    the table), XDP and TC; then the parts (PROFILE_PARTS)."""
    from bcc import BPF

    big = 10_000 if quick else 100_000
    defines = {"PYFLOW_MAX_FLOWS": 2 * big + 1024}
    variants = {"full": None, **{k: None for k in PROFILE_CUTS}}
    out: dict = {"flows": {"1": {}, str(big): {}}, "parts": {}}
    for name in variants:
        dp = compile_variant(name, defines) if name != "full" else compile_datapath(defines=defines)
        prog = {"xdp": dp.load_func(XDP_FUNC, BPF.XDP).fd, "tc": dp.load_func(TC_FUNC, BPF.SCHED_CLS).fd}
        dp["pyflow_txports"][ct.c_int(0)] = ct.c_int(TEST_IFINDEX)
        table = FlowTable(dp["pyflow_flows"].map_fd)
        install(table, [v4_flow(0)])
        for n, frames in ((1, [v4_frame(0)]), (big, None)):
            if n == big:
                install(table, [v4_flow(i) for i in range(1, big)])
                frames = [v4_frame(i * (big // SPREAD)) for i in range(SPREAD)]
            h.set_templates(frames)
            for hook in ("xdp", "tc"):
                if name == "full":
                    out["flows"][str(n)][f"{hook}/harness"] = summarize(
                        h.measure(hook, h.fn[f"pass_{hook}"].fd, repeat, rounds))
                out["flows"][str(n)][f"{hook}/{name}"] = summarize(
                    h.measure(hook, prog[hook], repeat, rounds))
        table.close()
        dp.cleanup()
    for n, rows in out["flows"].items():
        for hook in ("xdp", "tc"):
            med = {k.split("/", 1)[1]: v["median_ns"] for k, v in rows.items() if k.startswith(hook + "/")}
            out["parts"][f"{hook}/{n}"] = {part: med[a] - med[b] for part, a, b in PROFILE_PARTS}
            out["parts"][f"{hook}/{n}"]["total_net"] = med["full"] - med["harness"]
    return out


def summarize(samples: list[float]) -> dict:
    return {"median_ns": statistics.median(samples), "min_ns": min(samples), "max_ns": max(samples),
            "samples": samples}


def install(table: FlowTable, flows) -> None:
    flows = list(flows)
    for start in range(0, len(flows), 65536):
        table.insert(flows[start:start + 65536])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and no 1M point (smoke run)")
    ap.add_argument("--repeat", type=int, help="runs per BPF_PROG_TEST_RUN call (default 2,000,000)")
    ap.add_argument("--rounds", type=int, help="calls per figure, the median is kept (default 7)")
    ap.add_argument("--out", default="bench-results/datapath.json")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the hit (variants)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_datapath: needs root (BPF)", file=sys.stderr)
        return 1
    repeat = args.repeat or (200_000 if args.quick else 2_000_000)
    rounds = args.rounds or (3 if args.quick else 7)
    scale_points = [1_000, 10_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]

    from bcc import BPF

    dp = compile_datapath(defines={"PYFLOW_MAX_FLOWS": max(scale_points) * 2})
    prog = {"xdp": dp.load_func(XDP_FUNC, BPF.XDP).fd, "tc": dp.load_func(TC_FUNC, BPF.SCHED_CLS).fd}
    dp["pyflow_txports"][ct.c_int(0)] = ct.c_int(TEST_IFINDEX)
    table = FlowTable(dp["pyflow_flows"].map_fd)
    h = Harness()

    results: dict = {"repeat": repeat, "rounds": rounds, "frame_bytes": FRAME, "rows": {}, "scale": {}}
    install(table, [v4_flow(i) for i in range(1000)] + [v6_flow(i) for i in range(1000)])
    cases = {
        "hit_ipv4_tcp_nat": [v4_frame(i) for i in range(1000)],
        "hit_ipv6_tcp": [v6_frame(i) for i in range(1000)],
        "miss": [v4_frame(100_000 + i) for i in range(1000)],
    }
    for hook in ("xdp", "tc"):
        h.set_templates(cases["hit_ipv4_tcp_nat"])
        base = summarize(h.measure(hook, h.fn[f"pass_{hook}"].fd, repeat, rounds))
        floor = summarize(h.measure(hook, h.fn[f"floor_{hook}"].fd, repeat, rounds))
        results["rows"][f"{hook}/harness"] = base
        results["rows"][f"{hook}/floor_redirect"] = floor
        for name, frames in cases.items():
            h.set_templates(frames)
            results["rows"][f"{hook}/{name}"] = summarize(h.measure(hook, prog[hook], repeat, rounds))

    # Scale: the IPv4 NAT hit with N flows in the map. "hot" replays one flow (the
    # hash map's O(1) cost with warm caches); "spread" rotates through SPREAD flows
    # spaced evenly over the N, so bigger tables cost cache misses as real traffic
    # does. The harness does the same work at every N.
    table.clear()
    installed = 0
    for n in scale_points:
        install(table, [v4_flow(i) for i in range(installed, n)])
        installed = n
        for series, frames in (("hot", [v4_frame(n // 2)]),
                               ("spread", [v4_frame(i * (n // SPREAD)) for i in range(SPREAD)])):
            h.set_templates(frames)
            for hook in ("xdp", "tc"):
                results["scale"][f"{series}/{hook}/{n}"] = summarize(
                    h.measure(hook, prog[hook], repeat, rounds))

    table.close()
    dp.cleanup()
    if not args.no_profile:
        results["profile"] = profile(h, repeat, rounds, args.quick)
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {args.out}")
    return 0


def report(results: dict) -> None:
    rows = results["rows"]
    print(f"datapath micro-benchmark: BPF_PROG_TEST_RUN, {FRAME}-byte frames, repeat {results['repeat']}, "
          f"median of {results['rounds']} rounds; 'net' subtracts the harness row")
    print(f"{'case':28} {'median ns':>10} {'net ns':>8} {'spread':>14}")
    for hook in ("xdp", "tc"):
        base = rows[f"{hook}/harness"]["median_ns"]
        for name in ("harness", "floor_redirect", "hit_ipv4_tcp_nat", "hit_ipv6_tcp", "miss"):
            r = rows[f"{hook}/{name}"]
            print(f"{hook + '/' + name:28} {r['median_ns']:10.1f} {r['median_ns'] - base:8.1f} "
                  f"{r['min_ns']:6.0f}..{r['max_ns']:<6.0f}")
        floor = rows[f"{hook}/floor_redirect"]["median_ns"]
        hit = rows[f"{hook}/hit_ipv4_tcp_nat"]["median_ns"]
        print(f"  {hook}: hit/floor = {hit / floor:.2f}x with harness, "
              f"{(hit - base) / max(floor - base, 0.1):.2f}x net (target <= 1.5x)")
    print("\nscale: IPv4 NAT hit with N flows installed (with harness)")
    for series in ("hot", "spread"):
        for hook in ("xdp", "tc"):
            prefix = f"{series}/{hook}/"
            pts = {int(k[len(prefix):]): v["median_ns"]
                   for k, v in results["scale"].items() if k.startswith(prefix)}
            line = "  ".join(f"{n:>9,}: {ns:6.1f}" for n, ns in sorted(pts.items()))
            growth = pts[max(pts)] / pts[min(pts)]
            print(f"  {series:6} {hook:3} {line}   growth {growth:.2f}x (target <= 1.3x)")
    prof = results.get("profile")
    if prof:
        keys = list(prof["parts"])
        print("\nprofile: where an IPv4 NAT hit's time goes, ns (differences of variants, "
              "net of the harness)")
        print(f"{'part':24} " + " ".join(f"{k:>12}" for k in keys))
        for part in [p for p, _a, _b in PROFILE_PARTS] + ["total_net"]:
            print(f"{part:24} " + " ".join(f"{prof['parts'][k][part]:12.1f}" for k in keys))

if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"bench_datapath took {time.monotonic() - t0:.0f} s")
    sys.exit(rc)
