"""Flow-map throughput: FlowTable (batched bpf() through csrc/) vs bcc's per-entry table API.

Run as root: ``python tests/bench/bench_flowtable.py [--quick]``. Prints a table and writes
bench-results/flowtable.json.

Both sides work on the same kernel map (the datapath's ``pyflow_flows`` when ebpf/pyflow_xdp.c
compiles, else a bcc BPF_HASH declared from the ABI header with the same key, value and size)
and start from the same Python data, lists of key and value bytes encoded once through the ABI:
- insert: FlowTable.insert((joined keys, joined values)) vs ``t[Key] = Leaf`` per entry;
- lookup: FlowTable.lookup(key list) vs ``t[Key]`` per entry;
- delete: FlowTable.delete(key list) vs ``del t[Key]`` per entry;
- counters: FlowTable.read_counters() decoded to {key bytes: (packets, bytes, closing)}
  vs the same dict built from ``t.items()`` (GET_NEXT_KEY + LOOKUP per entry); bcc's own batch
  read (``items_lookup_batch``) is shown as a reference.
Each figure is the median of the repeats, entries per second; the ratio is from the same run.
Extra rows: raw dump vs read_counters (to choose how counters are read), its chunk size, and the
cost of packing FlowKey/FlowAction objects, which is Python work the map API cannot remove.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyflow._native import ffi
from pyflow.datapath import abi
from pyflow.datapath.abi import FLOW_SIZE, KEY_SIZE, FlowAction, FlowKey
from pyflow.datapath.bpfsource import EBPF_DIR
from pyflow.datapath.flowtable import FlowTable, pack
from pyflow.errors import DatapathError

FALLBACK_SRC = r"""
#include "pyflow_abi.h"
BPF_HASH(pyflow_flows, struct pyflow_flow_key, struct pyflow_flow, PYFLOW_MAX_FLOWS);
"""

ACTION = FlowAction(out_ifindex=2, tx_port=0, mtu=1500, in_mac="02:00:00:00:00:01", dmac="02:00:00:00:00:02",
                    smac="02:00:00:00:00:03", nat_saddr="198.19.0.1", nat_sport=40000)


def flow_key(i: int) -> FlowKey:
    return FlowKey(ifindex=5, proto=6, saddr=f"198.18.{(i >> 8) & 255}.{i & 255}", daddr="198.19.1.1",
                   sport=1024 + (i >> 16), dport=443)


def open_map(max_flows: int):
    """The bcc object holding pyflow_flows, and where it came from."""
    from pyflow.datapath.bpfsource import compile_datapath

    try:
        return compile_datapath(defines={"PYFLOW_MAX_FLOWS": max_flows}), "datapath"
    except DatapathError as exc:
        from bcc import BPF

        print(f"(datapath not usable: {exc}; using a bcc BPF_HASH of the ABI types)", file=sys.stderr)
        b = BPF(text=FALLBACK_SRC, cflags=[f"-I{EBPF_DIR / 'include'}", f"-DPYFLOW_MAX_FLOWS={max_flows}"])
        return b, "bcc BPF_HASH(pyflow_flows, struct pyflow_flow_key, struct pyflow_flow)"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def split(buf, n: int, size: int) -> list[bytes]:
    raw = ffi.buffer(buf, n * size)[:]
    return [raw[i : i + size] for i in range(0, n * size, size)]


def bcc_counters(t) -> dict[bytes, tuple[int, int, int]]:
    out = {}
    for k, v in t.items():
        out[bytes(k)] = (v.counters.packets, v.counters.bytes, v.action.closing)
    return out


def bcc_counters_batch(t) -> dict[bytes, tuple[int, int, int]]:
    out = {}
    for k, v in t.items_lookup_batch():
        out[bytes(k)] = (v.counters.packets, v.counters.bytes, v.action.closing)
    return out


def run_size(n: int, kb: list[bytes], vb: list[bytes], ft: FlowTable, bt, repeats: int) -> dict:
    keys, vals = kb[:n], vb[:n]
    Key, Leaf = bt.Key, bt.Leaf
    s: dict[str, list[float]] = {f"{side}/{op}": [] for side in ("flowtable", "bcc")
                                 for op in ("insert", "lookup", "delete", "counters")}
    s["bcc/counters_batch"] = []
    for _ in range(repeats):
        ft.clear()
        s["flowtable/insert"].append(timed(lambda: ft.insert((b"".join(keys), b"".join(vals)))))
        assert ft.count() == n
        s["flowtable/lookup"].append(timed(lambda: ft.lookup(keys)))
        s["flowtable/counters"].append(timed(lambda: ft.read_counters().as_dict()))
        s["flowtable/delete"].append(timed(lambda: ft.delete(keys)))
        assert ft.count() == 0

        def bcc_insert():
            for k, v in zip(keys, vals, strict=True):
                bt[Key.from_buffer_copy(k)] = Leaf.from_buffer_copy(v)

        def bcc_lookup():
            for k in keys:
                bt[Key.from_buffer_copy(k)]

        def bcc_delete():
            for k in keys:
                del bt[Key.from_buffer_copy(k)]

        s["bcc/insert"].append(timed(bcc_insert))
        s["bcc/lookup"].append(timed(bcc_lookup))
        s["bcc/counters"].append(timed(lambda: bcc_counters(bt)))
        s["bcc/counters_batch"].append(timed(lambda: bcc_counters_batch(bt)))
        s["bcc/delete"].append(timed(bcc_delete))
        assert ft.count() == 0
    out = {}
    for name, samples in s.items():
        med = statistics.median(samples)
        out[name] = {"median_s": med, "entries_per_s": n / med, "samples_s": samples}
    return out


def choose_counter_read(n: int, kb, vb, ft: FlowTable, repeats: int) -> dict:
    """Raw C walks at n entries: full dump vs the counters-only copy, and the batch size."""
    ft.clear()
    ft.insert((b"".join(kb[:n]), b"".join(vb[:n])))
    rows: dict[str, list[float]] = {name: [] for name in
                                    ("dump", "read_counters", "dump+decode", "read_counters+decode")}
    # What read_counters keeps (closing flag, packets, bytes), at its places in struct pyflow_flow
    # as cffi sees the ABI (no hand-written layout).
    closing = ffi.offsetof(abi.FLOW_TYPE, "action") + ffi.offsetof("struct pyflow_flow_action", "closing")
    off = ffi.offsetof(abi.FLOW_TYPE, "counters")
    tail = FLOW_SIZE - off - 16
    fmt = f"={closing}xH{off - closing - 2}xQQ" + (f"{tail}x" if tail else "")
    counters_in_flow = struct.Struct(fmt)
    for _ in range(repeats):
        rows["dump"].append(timed(ft.dump))
        rows["read_counters"].append(timed(ft.read_counters))

        def dump_decode():
            d = ft.dump()
            vals = ffi.buffer(d.values, d.n * FLOW_SIZE)
            return dict(zip(d.key_bytes(), counters_in_flow.iter_unpack(vals), strict=True))

        rows["dump+decode"].append(timed(dump_decode))
        rows["read_counters+decode"].append(timed(lambda: ft.read_counters().as_dict()))
    chunks = {}
    saved = ft.dump_chunk
    for chunk in (256, 1024, 4096, 16384, 65536):
        ft.dump_chunk = chunk
        chunks[str(chunk)] = statistics.median(timed(ft.read_counters) for _ in range(repeats))
    ft.dump_chunk = saved
    ft.clear()
    walks = {k: statistics.median(v) for k, v in rows.items()}
    return {"n": n, "walks": walks, "read_counters_chunk": chunks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, no 100k point (smoke run)")
    ap.add_argument("--out", default="bench-results/flowtable.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_flowtable: needs root (BPF)", file=sys.stderr)
        return 1
    t_start = time.monotonic()
    repeats = 3 if args.quick else 5
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    nmax = max(sizes)

    b, source = open_map(max_flows=nmax * 2)
    bt = b["pyflow_flows"]
    ft = FlowTable(bt.map_fd)

    # Encode every flow once through the ABI; both sides then start from the same bytes.
    t0 = time.perf_counter()
    batch = pack([(flow_key(i), ACTION) for i in range(nmax)])
    pack_s = time.perf_counter() - t0
    kb, vb = split(batch.keys, nmax, KEY_SIZE), split(batch.values, nmax, FLOW_SIZE)

    results: dict = {"map": source, "map_type": ft.map_type, "max_entries": ft.max_entries,
                     "repeats": repeats, "sizes": {},
                     "pack_flowkey_flowaction_per_entry_us": pack_s / nmax * 1e6}
    for n in sizes:
        results["sizes"][str(n)] = run_size(n, kb, vb, ft, bt, repeats)
    results["counter_read_choice"] = choose_counter_read(nmax, kb, vb, ft, repeats)
    results["wall_s"] = time.monotonic() - t_start
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    ft.close()
    return 0


def report(r: dict) -> None:
    print(f"flow map: {r['map']} ({r['map_type']}, max_entries {r['max_entries']}); "
          f"median of {r['repeats']}, entries/s")
    print(f"{'op':<10}{'N':>9}{'FlowTable':>14}{'bcc per entry':>16}{'speed-up':>10}")
    for n, ops in r["sizes"].items():
        for op in ("insert", "lookup", "delete", "counters"):
            f, c = ops[f"flowtable/{op}"]["entries_per_s"], ops[f"bcc/{op}"]["entries_per_s"]
            print(f"{op:<10}{int(n):>9}{f:>14,.0f}{c:>16,.0f}{f / c:>9.1f}x")
        cb = ops["bcc/counters_batch"]["entries_per_s"]
        print(f"{'  (bcc items_lookup_batch counters: ' + format(cb, ',.0f') + ' entries/s)':<49}")
    ch = r["counter_read_choice"]
    print(f"counter read at {ch['n']} entries, ms: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in ch["walks"].items()))
    print("read_counters batch size, ms: " + ", ".join(f"{k} {v * 1e3:.1f}"
                                                        for k, v in ch["read_counters_chunk"].items()))
    pack_us = r["pack_flowkey_flowaction_per_entry_us"]
    print(f"packing FlowKey+FlowAction through abi.py: {pack_us:.1f} us/entry "
          f"(paid once per flow, by either API); wall {r['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
