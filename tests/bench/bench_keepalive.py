"""Keep-alive tick and control-plane memory at 10k, 100k and 1M offloaded connections.

Run as root: ``python tests/bench/bench_keepalive.py [--sizes 10000,100000,1000000]
[--tree DIR] [--label NAME] [--ticks 5] [--steady 30] [--quick]``. Prints a table and writes
bench-results/keepalive.json (keepalive-<label>.json with --label). ``--tree`` runs the
code of another checkout (a git worktree of an older commit, say) with this same script,
so two versions are measured the same way in one run.

Each size runs in a child process of its own (its memory is its own):

1. A real BPF hash flow map (2 entries per connection, sized for them) and the engine
   of the tree under test (pyflow.control.engine.Engine) with the fakes of its
   tests/support for paths and devices. Connections come in as ctnetlink messages
   encoded with the tree's own netlink code and decoded by its conntrack parser (so the
   strings and integers are what pyflowd would hold), UDP and TCP half and half, 250
   client addresses behind the router and 4,000 servers, handed to Engine.handle in
   batches of 4,096 events.
2. Memory: VmRSS before the first connection and after the last one; the difference
   per connection is what the control plane holds per connection beyond the BPF map
   (whose memory is the kernel's, shown apart: max_entries x (key + value + about 64
   bytes of hash-table element overhead)).
3. Ticks: before each tick every entry's counters move (one batched map update, not
   timed: the worst case for a tick, every connection active); then Engine.tick() is
   timed (wall and CPU) and the conntrack messages it sent are counted (after the ticks
   that write each new connection's timeout once more, reported apart as "settle"); each
   of these ticks is made to walk the map (the pacer is told a walk is due). Conntrack is a
   real ctnetlink socket in a namespace of the benchmark's own, and every message the
   tick sends is a real round trip (a refresh of one real entry), so a tick that writes
   a timeout per moving connection pays what it pays in pyflowd.
4. Steady (``--steady`` seconds): a tick a second as pyflowd runs them, walks as the
   engine's pacer decides (keepalive.Pacer), every connection's counters moved before each
   tick (not counted); the control plane's CPU seconds (this thread's) per wall second.
5. Hand-back (``--handback 1``): Engine.flush(), every connection handed back (entries
   deleted, conntrack given its protocol's timeout in a real round trip), timed; what is
   left offloaded or in the map is reported (errors).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
BATCH_EVENTS = 4096


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    from pyflow._native import ffi  # noqa: PLC0415 - the tree's own modules
    from pyflow.control import conntrack as ctmod  # noqa: PLC0415
    from pyflow.control.engine import Engine, EngineConfig  # noqa: PLC0415
    from pyflow.control.model import Conn, CtEvent, EventType, Tuple  # noqa: PLC0415
    from pyflow.datapath.abi import FLOW_SIZE, FLOW_TYPE, KEY_SIZE  # noqa: PLC0415
    from pyflow.datapath.flowtable import FlowTable  # noqa: PLC0415
    from pyflow.netlink import uapi  # noqa: PLC0415
    from pyflow.netlink.wire import nest, nla  # noqa: PLC0415
    from tests import netns  # noqa: PLC0415
    from tests.support.fakes import FakeDevices, FakePaths  # noqa: PLC0415

    assert str(Path(ctmod.__file__).resolve()).startswith(str(tree)), "imported the wrong tree"
    n = args.child

    with netns.namespaces("kab") as (ns,):
        # one real conntrack entry: every message the engine sends is a real round trip on it
        netns.run(ns, "conntrack -I -p udp -s 198.18.0.1 -d 198.18.0.2 --sport 1000 --dport 2000 "
                      "-r 198.18.0.2 -q 198.18.0.1 --reply-port-src 2000 --reply-port-dst 1000 "
                      "-t 600 -u SEEN_REPLY")
        with netns.inside(ns):
            real = ctmod.CtNetlink(subscribe=False)
        target = Conn(socket.AF_INET, UDP, Tuple("198.18.0.1", "198.18.0.2", 1000, 2000),
                      Tuple("198.18.0.2", "198.18.0.1", 2000, 1000))

        class NetlinkCounted:
            """model.Conntrack: every refresh and every hand-back a real ctnetlink request."""

            lost_events = 0
            offload_mark = 0

            def __init__(self) -> None:
                self.messages = 0
                self.installing = True

            def dump(self) -> list:
                return []

            def poll(self, timeout: float) -> list:
                return []

            def timeouts(self) -> dict[int, int]:
                return {TCP: 432000, UDP: 120}

            def refresh(self, conn: Any, timeout_s: int) -> bool:
                self.messages += 1
                return real.refresh(target, timeout_s)

            def mark_offloaded(self, conn: Any, offloaded: bool, **kw: Any) -> bool:
                if self.installing:
                    return True  # installs are not what is measured
                self.messages += 1
                return real.refresh(target, 120)

        ct = NetlinkCounted()
        base = rss_kib()
        flows = FlowTable.create(2 * n + 1024, name="pft_kab")
        eng = Engine(ct, FakePaths(), flows, FakeDevices(),
                     EngineConfig(idle_timeout_s=3600.0))
        status = (1 << 1) | (1 << 2) | (1 << 3)  # SEEN_REPLY | ASSURED | CONFIRMED

        def message(i: int) -> bytes:
            proto = TCP if i & 1 else UDP
            client = f"198.18.0.{2 + i % 250}"
            server = f"198.19.{(i // 250) % 16}.{1 + i % 250}"  # 4,000 servers
            cport, sport = 1024 + (i // 250) % 60000, 443 if proto == TCP else 53
            o = Tuple(client, server, cport, sport)
            orig = Conn(socket.AF_INET, proto, o, o)
            # _tuple_attr encodes a Conn's orig tuple: the reply tuple goes in as one's orig
            reply = Conn(socket.AF_INET, proto, Tuple(server, "198.19.0.1", sport, 1024 + i % 64000), o)
            payload = (ctmod._tuple_attr(uapi.CTA_TUPLE_ORIG, orig)
                       + ctmod._tuple_attr(uapi.CTA_TUPLE_REPLY, reply)
                       + nla(uapi.CTA_STATUS, struct.pack(">I", status))
                       + nla(uapi.CTA_TIMEOUT, struct.pack(">I", 120))
                       + nla(uapi.CTA_ID, struct.pack(">I", i)) + nla(uapi.CTA_MARK, struct.pack(">I", 0)))
            if proto == TCP:
                payload += nest(uapi.CTA_PROTOINFO, nest(uapi.CTA_PROTOINFO_TCP,
                                                          nla(uapi.CTA_PROTOINFO_TCP_STATE, bytes([3]))))
            return ctmod._request(ctmod._MSG_NEW, 0, i, socket.AF_INET, payload)

        started = time.perf_counter()
        for lo in range(0, n, BATCH_EVENTS):
            events = []
            for i in range(lo, min(n, lo + BATCH_EVENTS)):
                raw = message(i)
                conn = ctmod._parse(raw, 0, len(raw))
                events.append(CtEvent(EventType.UPDATE, conn))
            eng.handle(events)
            del events
        install_s = time.perf_counter() - started
        assert len(eng.offloaded) == n, (len(eng.offloaded), eng.stats.refused)
        ct.installing = False
        after = rss_kib()

        # every entry's counters move before each tick (one batched update, not timed)
        dump = flows.dump()
        keys = bytes(ffi.buffer(dump.keys, len(dump) * KEY_SIZE))
        values = bytearray(ffi.buffer(dump.values, len(dump) * FLOW_SIZE))
        at = ffi.offsetof(FLOW_TYPE, "counters")
        del dump
        # the one-time work after the installs, not counted in the steady ticks: the newer
        # keep-alive writes each connection's long timeout once more a second after its
        # entries went in (at most MAX_EXTENDS_PER_TICK a tick); the older one has none
        settle = {"ticks": 0, "messages": 0, "wall_s": 0.0}
        ka = sys.modules["pyflow.control.keepalive"]
        limit = getattr(ka, "MAX_EXTENDS_PER_TICK", 0)
        if limit:
            # in pyflowd they are spread over n / MAX_EXTENDS_PER_TICK ticks; here the cap is
            # lifted so that one tick does them all (the steady ticks are what is measured)
            ka.MAX_EXTENDS_PER_TICK = limit = n
            time.sleep(1.2)
            for _ in range(n // limit + 3):
                sent, wall = ct.messages, time.perf_counter()
                eng.tick()
                settle["ticks"] += 1
                settle["wall_s"] += time.perf_counter() - wall
                settle["messages"] += ct.messages - sent
                if ct.messages == sent:
                    break
        ticks = []
        for t in range(args.ticks):
            for j in range(len(values) // FLOW_SIZE):
                struct.pack_into("=QQ", values, j * FLOW_SIZE + at, t + 1, 100 * (t + 1))
            flows.insert((keys, bytes(values)))
            time.sleep(0.05)
            sent = ct.messages
            if hasattr(eng, "pacer"):
                eng.pacer.next_ns = 0  # these ticks measure a walk: make each one walk
            wall, cpu = time.perf_counter(), time.process_time()
            eng.tick()
            ticks.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                          "messages": ct.messages - sent})
            assert len(eng.offloaded) == n
        # the control plane's share of a core while every connection moves: a tick a
        # second as pyflowd runs it (walks as its pacer decides), the counters moved before
        # each (not counted: that is the datapath's work)
        steady: dict[str, Any] = {"seconds": 0.0, "cpu_s": 0.0, "ticks": 0, "walks": 0}
        if args.steady > 0:
            walks0 = getattr(getattr(eng, "pacer", None), "walks", None)
            start, t = time.monotonic(), args.ticks
            while time.monotonic() - start < args.steady:
                t += 1
                for j in range(len(values) // FLOW_SIZE):
                    struct.pack_into("=QQ", values, j * FLOW_SIZE + at, t + 1, 100 * (t + 1))
                flows.insert((keys, bytes(values)))
                next_at = start + (steady["ticks"] + 1) * 1.0
                time.sleep(max(0.0, next_at - time.monotonic()))
                cpu = time.thread_time()
                eng.tick()
                steady["cpu_s"] += time.thread_time() - cpu
                steady["ticks"] += 1
            # over the loop's wall time (at 1M moving the counters takes longer than a second:
            # the ticks are then further apart, and the share is still CPU over wall time)
            steady["seconds"] = time.monotonic() - start
            if walks0 is not None:
                steady["walks"] = eng.pacer.walks - walks0
                steady["interval_s"] = eng.pacer.interval_s
                steady["walk_cpu_s"] = eng.pacer.last_cost_s
            else:
                steady["walks"] = steady["ticks"]
            steady["cpu_share"] = steady["cpu_s"] / max(steady["seconds"], 1e-9)
            assert len(eng.offloaded) == n
        # hand-back of every connection (pyflowd's stop, or a flush): each one's entries
        # deleted and its conntrack entry given its protocol's timeout (a real round trip)
        handback: dict[str, Any] = {}
        if args.handback:
            sent, wall = ct.messages, time.perf_counter()
            eng.flush()
            handback = {"seconds": time.perf_counter() - wall, "messages": ct.messages - sent,
                        "left_offloaded": len(eng.offloaded), "left_entries": flows.count(),
                        "removed": dict(eng.stats.removed), "install_errors": eng.stats.install_errors}
        real.close()
        result = {
            "handback": handback,
            "steady": steady,
            "tree": str(tree), "connections": n, "install_s": install_s,
            "rss_base_kib": base, "rss_kib": after, "rss_per_conn_bytes": (after - base) * 1024 / n,
            "map_max_entries": flows.max_entries, "settle": settle,
            "map_bytes": (flows.memory_bytes() if hasattr(flows, "memory_bytes")
                          else flows.max_entries * (KEY_SIZE + FLOW_SIZE + 64)),
            "tick_wall_s": statistics.median(x["wall_s"] for x in ticks),
            "tick_cpu_s": statistics.median(x["cpu_s"] for x in ticks),
            "tick_messages": statistics.median(x["messages"] for x in ticks),
            "ticks": ticks, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        flows.close()
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--tree", default=str(ROOT), help="checkout whose pyflow is measured")
    p.add_argument("--label", default="current")
    p.add_argument("--quick", action="store_true", help="10k and 100k, 3 ticks, 12 s steady")
    p.add_argument("--handback", type=int, default=1, help="hand every connection back at the end (1/0)")
    p.add_argument("--ticks", type=int, default=5)
    p.add_argument("--steady", type=float, default=30.0,
                   help="seconds of a tick a second with every connection moving (control-plane CPU share)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.sizes, args.ticks, args.steady = "10000,100000", 3, 12.0
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        # the child finds this script's tests/ (netns, fakes) under --tree: the tree's own
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(n),
                              "--tree", args.tree, "--ticks", str(args.ticks),
                               "--steady", str(args.steady), "--handback", str(args.handback)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": args.tree},
                             timeout=3600)
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{args.label:>10} {n:>9,} conns: tick {r['tick_wall_s'] * 1e3:9.1f} ms wall "
              f"{r['tick_cpu_s'] * 1e3:9.1f} ms cpu, {r['tick_messages']:>9,.0f} conntrack msgs/tick; "
              f"RSS +{r['rss_per_conn_bytes']:6.0f} B/conn ({r['rss_base_kib'] / 1024:.1f} -> "
              f"{r['rss_kib'] / 1024:.1f} MiB); map {r['map_bytes'] / 2**20:.0f} MiB kernel; "
              f"install {r['install_s']:.1f} s; settle {r['settle']['messages']:,} msgs in "
              f"{r['settle']['ticks']} ticks, {r['settle']['wall_s']:.1f} s", flush=True)
        hb = r.get("handback", {})
        if hb:
            print(f"{'':>27}hand-back of all: {hb['seconds']:.1f} s, {hb['messages']:,} conntrack msgs, "
                  f"{hb['left_offloaded']} left offloaded, {hb['left_entries']} entries left in the map",
                  flush=True)
        st = r.get("steady", {})
        if st.get("ticks"):
            print(f"{'':>27}steady {st['seconds']:.0f} s, {st['ticks']} ticks, every connection moving: "
                  f"control plane {st['cpu_share'] * 100:.2f}% of a core, {st['walks']} walks "
                  f"(interval {st.get('interval_s', 0):.1f} s, "
                  f"walk {st.get('walk_cpu_s', 0) * 1e3:.0f} ms cpu)",
                  flush=True)
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    # `make bench` reads keepalive.json; a labelled run (an older tree, say) writes its own file
    name = "keepalive.json" if args.label == "current" else f"keepalive-{args.label}.json"
    (out_dir / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
