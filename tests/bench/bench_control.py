"""Control-plane benchmark: offload capacity, event-to-offload latency, path-change reaction.

Run as root: ``python tests/bench/bench_control.py [--quick] [--profile]``. Prints a table and
writes bench-results/control.json (and, with --profile, the cProfile top list to
bench-results/control-profile.txt). Whole run under 3 minutes, --quick under 1.

Everything runs in the integration topology (tests/support/topology.py: namespaces
cl - r1 - r2 - sv, nftables masquerade on r1); the datapath is attached to r1's three ports
and pyflow's ControlPlane runs in r1. Traffic comes from two helper processes started from
this same file (``--role client`` in cl, ``--role echo`` in sv), so that neither competes
with the control loop for this process's GIL; their clocks are time.monotonic(), which is
CLOCK_MONOTONIC and the same in every process and namespace.

1. Offload capacity. N UDP "connections" (one datagram per client source port, echoed by
   the server, so conntrack has SEEN_REPLY) are made while the control loop is not running.
   Then the loop is started: its initial resync (dump + policy + path resolution + two map
   entries + conntrack mark per connection, then the stray-entry prune) is timed from its
   first to its last instruction, and checked: N connections offloaded, 2N map entries, N
   conntrack entries carrying the offload mark. The loop is then stopped (flows handed back)
   and started again, CAPACITY_RUNS resyncs in all: the rate is their median (the machine
   is shared; one 1.5 s resync can meet another tenant's burst). Then the same resync is
   repeated with manual timers around each adapter call, which gives
   the breakdown (the timers add a little; their total is shown beside the clean figure).
2. Event-to-offload latency. With the loop running (and the N connections of part 1 still
   offloaded, so each keep-alive tick has a realistic table to walk), new connections at a
   steady rate. Per connection: the time.monotonic() after the engine's flow-map insert that
   installed both entries (a thin wrapper around the engine's flow map) minus the
   time.monotonic() the echo server took just before sending the echo that made conntrack see
   the reply.
3. Path change. conntrack is flushed (the engine drops everything), M fresh connections are
   offloaded, the new gateway's neighbour entry is resolved, then r1's default route is
   replaced (rtnetlink RTM_NEWROUTE with NLM_F_REPLACE from this process, which is what
   ``ip route replace`` sends). Reaction = last install that pointed one of the M connections'
   original direction at the second uplink, minus the time just before the request was sent;
   cross-checked by polling the kernel map every 5 ms until all M point there.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests` is a namespace package at the repo root

PORT_CAPACITY, PORT_LATENCY, PORT_PATH = 7001, 7002, 7003
# Part 1 beyond CHUNK connections: one more client process (a socket per connection, and
# a process may hold 20,000 descriptors here), client address and server port per CHUNK,
# so that neither the client's source ports nor the masquerade's (64k per destination
# address and port) run out
CHUNK = 19_000
PORT_MORE = 7100  # + k: the server port of chunk k >= 1
PAYLOAD_TAG = b"pfbc"
OFFLOAD_MARK = 0x100
CAPACITY_RUNS = 3  # clean resyncs of the whole table in part 1; the figure is their median


# ---- helper processes ------------------------------------------------------------------

def role_echo(args: argparse.Namespace) -> int:
    """Echo every datagram; record (id, monotonic time just before the echo is sent)."""
    fam = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, 32, 16 << 20)  # SO_SNDBUFFORCE
        s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: bursts of thousands
    s.bind((args.addr, args.port))
    s.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    records: list[tuple[int, float]] = []
    deadline = time.monotonic() + args.duration
    while not stop and time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(256)
        except (TimeoutError, InterruptedError):
            continue
        if len(data) >= 8 and data[:4] == PAYLOAD_TAG:
            t = time.monotonic()
            s.sendto(data, peer)
            records.append((int.from_bytes(data[4:8], "big"), t))
    Path(args.out).write_text(json.dumps(records))
    return 0


def role_client(args: argparse.Namespace) -> int:
    """One socket (so one source port, one conntrack entry) per datagram; paced at ``rate``
    per second (0: as fast as possible); then wait up to ``wait`` s for the echoes."""
    fam = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    bind = (args.bind, 0) if args.bind else None
    need = args.count + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    sel = selectors.DefaultSelector()
    sent: list[tuple[int, int, float]] = []
    socks = []
    t0 = time.monotonic()
    limit = t0 + args.max_seconds
    for i in range(args.count):
        if args.rate:
            due = t0 + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.monotonic()
        if now > limit:
            break
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setblocking(False)
        if bind:
            s.bind(bind)
        s.sendto(PAYLOAD_TAG + (args.first_id + i).to_bytes(4, "big"), (args.addr, args.port))
        sent.append((args.first_id + i, s.getsockname()[1], now))
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
        if not args.rate and i % 256 == 255:
            time.sleep(0.002)  # let the echo server keep up with a flat-out burst
    echoed = 0
    deadline = time.monotonic() + args.wait
    while echoed < len(sent) and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            with contextlib.suppress(BlockingIOError):
                key.fileobj.recv(64)
                echoed += 1
            sel.unregister(key.fileobj)
    Path(args.out).write_text(json.dumps({"sent": sent, "echoed": echoed,
                                          "seconds": time.monotonic() - t0}))
    for s in socks:
        s.close()
    return 0


# ---- the benchmark ----------------------------------------------------------------------

def _here() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


class Echo:
    """An echo server process in a namespace; stop() returns its (id, time) records."""

    def __init__(self, ns: str, addr: str, port: int, workdir: Path, duration: float = 170):
        self.out = workdir / f"echo-{port}.json"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *_here(), "--role", "echo", "--addr", addr, "--port", str(port),
             "--out", str(self.out), "--duration", str(duration)],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"echo server on port {port} did not start")

    def stop(self) -> dict[int, float]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        return {i: t for i, t in json.loads(self.out.read_text())}


def run_client(ns: str, addr: str, port: int, count: int, workdir: Path, *, rate: float = 0,
               first_id: int = 0, wait: float = 5.0, max_seconds: float = 30.0,
               bind: str = "") -> dict[str, Any]:
    out = workdir / f"client-{port}-{first_id}.json"
    subprocess.run(["ip", "netns", "exec", ns, *_here(), "--role", "client", "--addr", addr,
                    "--port", str(port), "--count", str(count), "--rate", str(rate), "--first-id",
                    str(first_id), "--wait", str(wait), "--max-seconds", str(max_seconds),
                    "--out", str(out), "--bind", bind], check=True, timeout=max_seconds + wait + 30)
    return json.loads(out.read_text())


class TimedFlows:
    """The engine's flow map with a clock on insert: records (monotonic time after the insert
    returned, what was inserted). Everything else goes straight to the FlowTable."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.log: list[tuple[float, Any]] = []

    def insert(self, items: Any, **kw: Any) -> int:
        n = self.inner.insert(items, **kw)
        self.log.append((time.monotonic(), items))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def inserted(items: Any) -> list[tuple[int, int, int, int]]:
    """(key ifindex, key sport, key dport, action out_ifindex) of every entry of one insert call."""
    from pyflow._native import ffi
    from pyflow.datapath.flowtable import FlowBatch, pack

    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], bytes | bytearray):
        items = pack(items)  # the engine's bulk installs: (key bytes, value bytes)
    if isinstance(items, FlowBatch):
        keys = ffi.cast("struct pyflow_flow_key *", items.keys)
        values = ffi.cast("struct pyflow_flow *", items.values)
        return [(keys[i].ifindex, socket.ntohs(keys[i].sport), socket.ntohs(keys[i].dport),
                 values[i].action.out_ifindex) for i in range(items.n)]
    return [(k.ifindex, k.sport, k.dport, a.out_ifindex) for k, a in items]


def make_control_plane(dp: Any, cfg: Any) -> Any:
    """A ControlPlane whose engine's flow map is wrapped in TimedFlows and whose resync is timed."""
    from pyflow.control.runner import ControlPlane

    class BenchControlPlane(ControlPlane):
        resyncs: list[tuple[float, float]]

        def _setup(self) -> None:
            t0 = time.perf_counter()
            super()._setup()
            self.setup_s = time.perf_counter() - t0
            self.resyncs = []
            self.timed = TimedFlows(self.engine.flows)
            self.engine.flows = self.timed
            plain = self.engine.resync

            def resync() -> None:
                t = time.perf_counter()
                plain()
                self.resyncs.append((t, time.perf_counter()))

            self.engine.resync = resync  # type: ignore[method-assign]
            # loop turns longer than 1 ms, to explain latency outliers: (start, ms, what)
            self.slow: list[tuple[float, float, str]] = []
            for name in ("tick", "handle", "paths_changed", "scan"):  # scan: a walk's parts
                if hasattr(self.engine, name):
                    self._clock_slow(name)
            self.path_events: list[tuple[float, Any]] = []  # what made the loop re-plan
            poll, events = self.watcher.poll, self.path_events

            def watched(timeout: float) -> Any:
                changes = poll(timeout)
                if changes:
                    events.append((time.monotonic(), changes))
                return changes

            self.watcher.poll = watched  # type: ignore[method-assign]

        def _clock_slow(self, name: str) -> None:
            plain, slow = getattr(self.engine, name), self.slow

            def timed(*a: Any, **kw: Any) -> Any:
                t = time.monotonic()
                try:
                    return plain(*a, **kw)
                finally:
                    dt = time.monotonic() - t
                    if dt > 1e-3:
                        slow.append((t, dt * 1e3, name))

            setattr(self.engine, name, timed)

    return BenchControlPlane(dp, cfg)


def ct_count(ns: str, port: int | set[int]) -> dict[str, int]:
    """Conntrack entries to the server port(s) in namespace ns: total, replied, marked offloaded."""
    from pyflow.control.conntrack import CtNetlink
    from pyflow.control.model import IPS_SEEN_REPLY
    from tests import netns

    with netns.inside(ns):
        ct = CtNetlink(subscribe=False)
    with ct:
        ports = port if isinstance(port, set) else {port}
        conns = [c for c in ct.dump() if c.orig.dport in ports]
    return {"total": len(conns), "replied": sum(1 for c in conns if c.status & IPS_SEEN_REPLY),
            "marked": sum(1 for c in conns if c.mark & OFFLOAD_MARK)}


def feed_figures(ct: Any) -> dict[str, Any]:
    """The ctnetlink feed through the adapter's own API, so any version of it is measured
    the same way: the events of the capacity burst read (and decoded) by poll() until none
    is left, then dumps of the whole table."""
    gc.collect()
    events = resyncs = 0
    spent = 0.0
    idle = 0
    while idle < 3:
        t = time.perf_counter()
        got = ct.poll(0.05 if events else 1.0)
        if not got:  # a wait for more, not work
            idle += 1
            continue
        spent += time.perf_counter() - t
        idle = 0
        events += sum(1 for e in got if e is not None)
        resyncs += sum(1 for e in got if e is None)
    dumps = []
    for _ in range(5):
        t = time.perf_counter()
        n = len(ct.dump())
        dumps.append(time.perf_counter() - t)
    best = statistics.median(dumps)
    return {"events": events, "event_s": spent, "us_per_event": spent / max(events, 1) * 1e6,
            "overruns": resyncs, "dump_entries": n, "dump_s": best,
            "us_per_dump_entry": best / max(n, 1) * 1e6}


def decode_figures() -> dict[str, Any] | None:
    """Decoding alone, in this process, on the datagrams the kernel sent that
    tests/unit/data/ctnetlink.hex holds: the Python reference decoder (conntrack._parse)
    against the C decoder with and without building the Conns. None where the adapter has
    no C decoder."""
    import timeit

    try:
        from pyflow._native import ffi, lib
        from pyflow.control import conntrack, ctfeed
    except ImportError:
        return None
    data = ROOT / "tests" / "unit" / "data" / "ctnetlink.hex"
    recorded = [line.split(None, 1) for line in data.read_text().splitlines() if not line.startswith("#")]
    events = [bytes.fromhex(h) for k, h in recorded if k == "event"]
    joined = b"".join(events)
    feed = ctfeed.Feed(max(len(joined), 1 << 16))
    n = len(feed.decode(joined, len(joined))[0])
    src = ffi.from_buffer(joined)

    def c_only() -> None:
        lib.pyflow_ct_decode(src, len(joined), ctfeed.EVENTS, 0, 0, feed.out, feed.cap, feed._reset())

    def per(fn: Any) -> float:
        return min(timeit.repeat(fn, number=200, repeat=5)) / 200 / n * 1e6

    return {"messages": n,
            "python_us": per(lambda: [conntrack._events_of(e, len(e)) for e in events]),
            "c_build_us": per(lambda: feed.decode(joined, len(joined))),
            "c_only_us": per(c_only)}


class Timers:
    """Manual timers around adapter calls: wrap(obj, name, label) replaces obj.name by a timed
    call. Nested timed calls are subtracted from the outer one (self time per label)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # child time accumulated per open frame

    def wrap(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)
        perf = time.perf_counter
        stack, total, calls = self._stack, self.total, self.calls
        total.setdefault(label, 0.0)
        calls.setdefault(label, 0)

        def timed(*a: Any, **kw: Any) -> Any:
            stack.append(0.0)
            t0 = perf()
            try:
                return fn(*a, **kw)
            finally:
                dt = perf() - t0
                child = stack.pop()
                total[label] += dt - child
                calls[label] += 1
                if stack:
                    stack[-1] += dt

        setattr(obj, name, timed)


def instrumented_resync(ns: str, dp: Any, cfg: Any, profile: bool, workdir: Path) -> dict[str, Any]:
    """The initial resync again, on adapters of our own, with a timer around every adapter
    call (and cProfile when asked); then hand everything back."""
    import pyflow.datapath.flowtable as flowtable_mod
    from pyflow.control.conntrack import CtNetlink
    from pyflow.control.engine import Engine
    from pyflow.control.paths import RtPaths
    from pyflow.control.runner import LoaderDevices
    from pyflow.datapath.abi import MAP_FLOWS
    from pyflow.datapath.flowtable import FlowTable
    from tests import netns

    with netns.inside(ns):
        flows = FlowTable(dp.map_fd(MAP_FLOWS))
        ct = CtNetlink(offload_mark=cfg.offload_mark, subscribe=False)
        paths = RtPaths()
        devices = LoaderDevices(dp, paths)
    engine = Engine(ct, paths, flows, devices, cfg.engine)
    t = Timers()
    t.wrap(ct, "dump", "dump + parse (ctnetlink)")
    t.wrap(paths, "egress", "paths: egress")
    t.wrap(paths, "device_of", "paths: device_of")
    # the engine's planning and packing of a batch's entries (path lookups are timed on their own)
    t.wrap(engine, "_entry_bytes" if hasattr(engine, "_entry_bytes") else "plan",
           "plan + pack entries (bytes)")
    for name in ("pack", "pack_keys"):
        if hasattr(flowtable_mod, name):
            t.wrap(flowtable_mod, name, "flowtable.pack (into cffi arrays)")
    t.wrap(flows, "insert", "map insert (bpf syscall + call)")
    t.wrap(flows, "delete", "map delete")
    t.wrap(flows, "read_counters", "prune: read counters")
    t.wrap(engine, "prune", "prune: owned-key set")
    t.wrap(ct, "mark_offloaded", "conntrack mark (ctnetlink)")
    if hasattr(ct, "mark_offloaded_many"):  # a pass's marks in one sendmsg()
        t.wrap(ct, "mark_offloaded_many", "conntrack mark (ctnetlink)")
    try:
        t0 = time.perf_counter()
        engine.resync()
        total = time.perf_counter() - t0
        offloaded = len(engine.offloaded)
        parts, calls = dict(t.total), dict(t.calls)  # before the hand-back below adds to them
        engine.flush()
        profile_text = None
        if profile:  # a separate pass: cProfile's overhead would distort the timers
            prof = cProfile.Profile()
            prof.enable()
            engine.resync()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            profile_text = buf.getvalue()
            engine.flush()
    finally:
        for name, fn in _ORIGINALS.items():  # undo the module-level wrappers
            setattr(flowtable_mod, name, fn)
        ct.close()
        paths.close()
        flows.close()
    accounted = sum(parts.values())
    parts["engine: policy, bookkeeping, rest"] = total - accounted
    return {"seconds": total, "offloaded": offloaded, "parts": parts, "calls": calls,
            "profile": profile_text}


_ORIGINALS: dict[str, Any] = {}


def host_speed() -> float:
    """Seconds for a fixed pure-Python loop: this machine's speed varies by up to 2x from minute
    to minute (shared host), and every figure here scales with it."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        sum(range(5_000_000))
        best = min(best, time.perf_counter() - t)
    return best


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, under a minute")
    ap.add_argument("--profile", action="store_true", help="cProfile the instrumented resync too")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() once the loop has started (as a daemon could): the latency of part 2 "
                         "without full collections walking the table built at startup")
    ap.add_argument("--conns", type=int, default=0,
                    help="connections of part 1, left offloaded during part 2 (default 5,000; quick 2,000)")
    ap.add_argument("--latency-seconds", type=float, default=0.0,
                    help="seconds of new connections at 1,000/s in part 2 (default 3; quick 1)")
    ap.add_argument("--role", choices=("echo", "client"))
    ap.add_argument("--bind", default="", help=argparse.SUPPRESS)
    ap.add_argument("--addr")
    ap.add_argument("--port", type=int)
    ap.add_argument("--out")
    ap.add_argument("--duration", type=float, default=170)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--first-id", type=int, default=0)
    ap.add_argument("--wait", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    args = ap.parse_args(argv)
    if args.role == "echo":
        return role_echo(args)
    if args.role == "client":
        return role_client(args)
    if os.geteuid() != 0:
        print("bench_control: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    return bench(args)


def bench(args: argparse.Namespace) -> int:
    import tempfile

    import pyflow.datapath.flowtable as flowtable_mod
    from pyflow.control.conntrack import CtNetlink
    from pyflow.control.engine import EngineConfig
    from pyflow.control.runner import ControlConfig
    from pyflow.datapath.abi import MAP_FLOWS
    from pyflow.datapath.flowtable import FlowTable
    from pyflow.datapath.loader import Datapath
    from tests import netns
    from tests.pins import pin_dir
    from tests.support.topology import LAN, UP, UP2, V4, topology
    from tests.support.traffic import wait_for

    for name in ("pack", "pack_keys"):
        if hasattr(flowtable_mod, name):
            _ORIGINALS[name] = getattr(flowtable_mod, name)
    gc_pauses: list[tuple[float, float, int]] = []  # (start, ms, generation) of slow collections
    gc_start: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.monotonic()
        elif (dt := time.monotonic() - gc_start[0]) > 1e-3:
            gc_pauses.append((gc_start[0], dt * 1e3, info["generation"]))

    gc.callbacks.append(on_gc)
    n_conns = args.conns or (2000 if args.quick else 5000)
    rate = 1000.0
    # long enough to span keep-alive walks of the table part 1 left offloaded (paced: several
    # seconds apart at 100k), so that the percentiles include the events that wait for one
    lat_seconds = args.latency_seconds or (1.0 if args.quick else 3.0)
    m_conns = 1000
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=1.0, offload_mark=OFFLOAD_MARK)
    results: dict[str, Any] = {"quick": args.quick, "n": n_conns, "m": m_conns, "rate": rate,
                               "latency_seconds": lat_seconds}
    t_start = time.monotonic()
    results["host_loop_s_before"] = host_speed()
    results["decode"] = decode_figures()
    work = Path(tempfile.mkdtemp(prefix="pft-bench-control-"))
    with topology(nat=True) as topo:
        pin = pin_dir("bench-r1")
        with netns.inside(topo.r1):
            dp = Datapath(pin_dir=pin, state_file=f"/run/{pin.rsplit('/', 1)[1]}.json")
        cps: list[Any] = []
        echoes: list[Echo] = []
        try:
            with netns.inside(topo.r1):
                for dev in (LAN, UP, UP2):
                    dp.attach(dev, "auto")
                map_view = FlowTable(dp.map_fd(MAP_FLOWS))
            idx = {name: netns.ifindex(topo.r1, name) for name in (LAN, UP, UP2)}
            # Since Linux 5.19 the default (2) gives a conntrack entry event delivery only if a
            # listener existed when it was created: the connections made before the loop starts
            # would never report their DESTROY. A router running pyflow wants 1 (always).
            netns.run(topo.r1, "sysctl -qw net.netfilter.nf_conntrack_events=1")
            sv = V4["sv"]

            results["gc_objects_at_start"] = len(gc.get_objects())
            # ---- 1. offload capacity -------------------------------------------------------
            chunks = -(-n_conns // CHUNK)
            cap_ports = {PORT_CAPACITY} | {PORT_MORE + k for k in range(1, chunks)}
            if chunks > 1:
                with netns.inside(topo.cl):
                    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65535\n")
                for k in range(1, chunks):
                    netns.run(topo.cl, f"ip addr add 198.18.1.{100 + k}/24 dev pft-cl-0")
            for k in range(chunks):
                echoes.append(Echo(topo.sv, sv, PORT_CAPACITY if k == 0 else PORT_MORE + k, work))
            with netns.inside(topo.r1):
                feed_ct = CtNetlink(rcvbuf=256 << 20)  # holds every event of the burst
            c1: dict[str, Any] = {"sent": [], "echoed": 0, "seconds": 0.0}
            for k in range(chunks):
                part = run_client(topo.cl, sv, PORT_CAPACITY if k == 0 else PORT_MORE + k,
                                  min(CHUNK, n_conns - k * CHUNK), work, first_id=k * CHUNK,
                                  bind="" if k == 0 else f"198.18.1.{100 + k}", max_seconds=60.0)
                c1["sent"] += part["sent"]
                c1["echoed"] += part["echoed"]
                c1["seconds"] += part["seconds"]
            results["feed"] = feed_figures(feed_ct)
            feed_ct.close()
            before = ct_count(topo.r1, cap_ports)
            print(f"part 1: {len(c1['sent'])} sent, {c1['echoed']} echoed in {c1['seconds']:.2f} s; "
                  f"conntrack {before}", file=sys.stderr)
            replied = before["replied"]
            # the same resync CAPACITY_RUNS times (each hands everything back at its end): the
            # machine is shared, and the median of a few 1.5 s resyncs says more than one
            rates: list[float] = []
            for run in range(CAPACITY_RUNS):
                cp = make_control_plane(dp, cfg)
                cps.append(cp)
                with netns.inside(topo.r1):
                    cp.start()
                r0, r1 = cp.resyncs[0]
                offloaded = len(cp.engine.offloaded)
                rates.append(offloaded / (r1 - r0))
                if run == 0:
                    first = r1 - r0
                    entries = map_view.count()
                    after = ct_count(topo.r1, cap_ports)
                    # what was not offloaded, and why: every qualifying connection has a counted reason
                    waiting = {"pending": len(cp.engine.pending), "refused": dict(cp.engine.stats.refused),
                               "install_errors": cp.engine.stats.install_errors}
                    cap = {"connections": replied, "offloaded": offloaded, "map_entries": entries,
                           "ct_marked": after["marked"], "resync_s": first, "setup_s": cp.setup_s,
                           "first_conn_per_s": offloaded / first,
                           "us_per_conn": first / max(offloaded, 1) * 1e6, "not_offloaded": waiting}
                    print(f"part 1: resync {first * 1e3:.1f} ms for {offloaded} connections; not offloaded: "
                          f"{waiting}", file=sys.stderr)
                elif offloaded != cap["offloaded"]:
                    raise SystemExit(f"capacity run {run + 1}: {offloaded} offloaded, "
                                     f"the first {cap['offloaded']}")
                cp.stop(hand_back=True)
                cps.remove(cp)
            cap["runs_conn_per_s"] = rates
            cap["conn_per_s"] = statistics.median(rates)
            cap["handed_back_entries_left"] = map_view.count()

            inst = instrumented_resync(topo.r1, dp, cfg, args.profile, work)
            cap["instrumented"] = {k: v for k, v in inst.items() if k != "profile"}
            if inst["profile"]:
                out = ROOT / "bench-results" / "control-profile.txt"
                out.parent.mkdir(exist_ok=True)
                out.write_text(inst["profile"])
            results["capacity"] = cap

            # ---- 2. event-to-offload latency ----------------------------------------------
            cp = make_control_plane(dp, cfg)
            cps.append(cp)
            with netns.inside(topo.r1):
                cp.start()
            r0, r1 = cp.resyncs[0]
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
            results["gc_freeze"] = args.gc_freeze
            results["capacity"]["second_resync_s"] = r1 - r0
            results["capacity"]["second_resync_offloaded"] = len(cp.engine.offloaded)
            table_before = len(cp.engine.offloaded)
            # the steady state "with N offloaded": after the resync the keep-alive writes every
            # connection's long timeout once more (at most MAX_EXTENDS_PER_TICK a tick), which
            # is the start's work, not the steady state's; it is timed apart
            t_settle = time.monotonic()
            wait_for(lambda: cp.engine.stats.refreshes >= table_before, 60.0)
            results["capacity"]["settle_after_resync_s"] = time.monotonic() - t_settle
            echo2 = Echo(topo.sv, sv, PORT_LATENCY, work)
            echoes.append(echo2)
            count = int(rate * lat_seconds)
            c2 = run_client(topo.cl, sv, PORT_LATENCY, count, work, rate=rate, first_id=1_000_000,
                            wait=3.0, max_seconds=lat_seconds + 2)
            sports = {sport for _i, sport, _t in c2["sent"]}
            wait_for(lambda: sum(1 for o in list(cp.engine.offloaded.values())
                                 if o.conn.orig.dport == PORT_LATENCY) >= len(sports), 3.0)
            echo_t = echo2.stop()
            echoes.remove(echo2)
            installed: dict[int, float] = {}
            for t, items in list(cp.timed.log):
                for ifindex, sport, dport, _out in inserted(items):
                    if ifindex == idx[LAN] and dport == PORT_LATENCY and sport in sports \
                            and sport not in installed:
                        installed[sport] = t
            lats, series = [], []
            for ident, sport, _t in c2["sent"]:
                if ident in echo_t and sport in installed:
                    lats.append((installed[sport] - echo_t[ident]) * 1e3)
                    series.append((round(echo_t[ident] - c2["sent"][0][2], 4), round(lats[-1], 3)))
            send_span = c2["sent"][-1][2] - c2["sent"][0][2] if c2["sent"] else 0.0
            t_first = c2["sent"][0][2] if c2["sent"] else 0.0
            slow = [(round(t - t_first, 4), round(ms, 2), what) for t, ms, what in cp.slow
                    if t_first - 0.5 <= t <= t_first + lat_seconds + 1]
            results["latency"] = {
                "sent": len(c2["sent"]), "echoed": c2["echoed"], "offloaded": len(installed),
                "measured": len(lats), "achieved_rate": (len(c2["sent"]) - 1) / send_span if send_span else 0,
                "table_before": table_before,
                "p50_ms": pct(lats, 50), "p99_ms": pct(lats, 99), "max_ms": max(lats) if lats else None,
                "mean_ms": statistics.fmean(lats) if lats else None,
                "negative": sum(1 for x in lats if x < 0),
                "series": series,  # (echo time from the first send, latency ms)
                "slow_turns": slow,  # engine calls over 1 ms meanwhile: (start, ms, which)
                "gc_pauses": [(round(t - t_first, 4), round(ms, 2), g) for t, ms, g in gc_pauses
                              if t_first - 0.5 <= t <= t_first + lat_seconds + 1],
                "path_events": [(round(t - t_first, 4), str(ch)) for t, ch in cp.path_events
                                if t_first - 0.5 <= t <= t_first + lat_seconds + 1],
            }

            results["gc_objects_after_latency"] = len(gc.get_objects())
            # ---- 3. path change reaction ---------------------------------------------------
            netns.run(topo.r1, "conntrack -F")
            wait_for(lambda: not cp.engine.offloaded, 10.0)
            results["path"] = {"left_after_flush": len(cp.engine.offloaded),
                               "ct_left_after_flush": ct_count(topo.r1, cap_ports)["total"]
                               + ct_count(topo.r1, PORT_LATENCY)["total"]}
            echoes.append(Echo(topo.sv, sv, PORT_PATH, work))
            c3 = run_client(topo.cl, sv, PORT_PATH, m_conns, work, first_id=2_000_000)
            sports3 = {sport for _i, sport, _t in c3["sent"]}

            def mine() -> list[Any]:
                return [o for o in list(cp.engine.offloaded.values()) if o.conn.orig.dport == PORT_PATH]

            wait_for(lambda: len(mine()) >= len(sports3), 5.0)
            m_off = len(mine())
            # the new gateway's MAC known beforehand, as on a router whose second uplink is in use
            netns.run(topo.r1, f"ping -c1 -W1 {V4['r2_up2']}", check=False)
            time.sleep(0.3)  # the neighbour event is handled before the route change
            from pyroute2 import IPRoute

            with netns.inside(topo.r1):
                ipr = IPRoute()
            log_mark = len(cp.timed.log)
            handled_before = cp.engine.stats.rewritten + cp.engine.stats.removed.get("path_lost", 0)
            with ipr:
                t0 = time.monotonic()
                ipr.route("replace", dst="0.0.0.0/0", gateway=V4["r2_up2"])
                t_sent = time.monotonic()
            # Wait without competing for the GIL (a map dump decoded in Python every few ms
            # slowed the loop it was timing): the engine's own counters say when it is done.
            st = cp.engine.stats
            done_at = None
            deadline = t0 + 5.0
            while time.monotonic() < deadline:
                if st.rewritten + st.removed.get("path_lost", 0) - handled_before >= m_off:
                    done_at = time.monotonic()
                    break
                time.sleep(0.002)
            time.sleep(0.2)  # a later pass (a second notification) may still move some

            def on_new_uplink() -> int:
                d = map_view.dump()
                n = 0
                for i in range(d.n):
                    k = d.keys[i]
                    out = d.values[i].action.out_ifindex
                    if k.ifindex == idx[LAN] and socket.ntohs(k.dport) == PORT_PATH \
                            and socket.ntohs(k.sport) in sports3 and out == idx[UP2]:
                        n += 1
                return n

            in_map = on_new_uplink()
            moved: dict[int, float] = {}
            for t, items in list(cp.timed.log[log_mark:]):
                for ifindex, sport, dport, out in inserted(items):
                    if ifindex == idx[LAN] and dport == PORT_PATH and sport in sports3 and out == idx[UP2] \
                            and sport not in moved:
                        moved[sport] = t
            st = cp.engine.stats
            results["path"]["turns"] = [(round((t - t0) * 1e3, 2), round(ms, 2), what)
                                        for t, ms, what in cp.slow if t >= t0 - 0.01]
            results["path"]["events"] = [(round((t - t0) * 1e3, 2), str(ch)) for t, ch in cp.path_events
                                         if t >= t0 - 0.01]
            results["path"].update({
                "m": len(sports3), "offloaded_before": m_off, "moved": len(moved),
                "reaction_ms": (max(moved.values()) - t0) * 1e3 if moved else None,
                "first_move_ms": (min(moved.values()) - t0) * 1e3 if moved else None,
                "request_ms": (t_sent - t0) * 1e3,
                "engine_done_ms": (done_at - t0) * 1e3 if done_at else None,
                "in_map_on_new_uplink": in_map,
                "rewritten": st.rewritten, "path_lost": st.removed.get("path_lost", 0),
            })
            results["engine_stats"] = {"offloaded": st.offloaded, "removed": st.removed,
                                       "refused": st.refused, "install_errors": st.install_errors,
                                       "resyncs": st.resyncs, "lost_events": cp.ct.lost_events,
                                       "discarded_events": cp.ct.discarded_events}
            map_view.close()
        finally:
            for cp in cps:
                with netns.inside(topo.r1):
                    cp.stop(hand_back=False)
            for e in echoes:
                with contextlib.suppress(Exception):
                    e.stop()
            with netns.inside(topo.r1):
                dp.destroy()
            shutil.rmtree(work, ignore_errors=True)  # the helpers' sockets and outputs
    results["wall_s"] = time.monotonic() - t_start
    results["host_loop_s_after"] = host_speed()
    report(results)
    out = ROOT / "bench-results" / "control.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    return 0


def report(r: dict[str, Any]) -> None:
    cap, lat, path = r["capacity"], r["latency"], r["path"]
    inst = cap["instrumented"]
    print(f"pyflow control-plane benchmark ({'quick' if r['quick'] else 'full'}; "
          f"{r['wall_s']:.0f} s wall)")
    print(f"host speed (it varies on a shared machine): a fixed Python loop took "
          f"{r['host_loop_s_before'] * 1e3:.0f} ms before, {r['host_loop_s_after'] * 1e3:.0f} ms after")
    print()
    feed = r["feed"]
    print("0. ctnetlink feed (the adapter's poll() and dump(): receive and decode)")
    print(f"   events read and decoded            {feed['events']} in {feed['event_s'] * 1e3:.1f} ms: "
          f"{feed['us_per_event']:.2f} us/event (overruns {feed['overruns']}; the idle waits not counted)")
    print(f"   dump of {feed['dump_entries']} entries (median of 5)  {feed['dump_s'] * 1e3:.1f} ms: "
          f"{feed['us_per_dump_entry']:.2f} us/entry")
    dec = r.get("decode")
    if dec:
        print(f"   decoding alone ({dec['messages']} recorded events): Python reference "
              f"{dec['python_us']:.2f} us/message, C + Conns {dec['c_build_us']:.2f}, C alone "
              f"{dec['c_only_us']:.2f}")
    print()
    print("1. offload capacity (initial resync, loop started on existing connections)")
    print(f"   connections replied in conntrack   {cap['connections']}")
    print(f"   offloaded / map entries / marked   {cap['offloaded']} / {cap['map_entries']} / "
          f"{cap['ct_marked']}")
    print(f"   first resync time                  {cap['resync_s'] * 1e3:9.1f} ms")
    runs = cap.get("runs_conn_per_s", [])
    print(f"   rate, median of {len(runs)} resyncs         {cap['conn_per_s']:9.0f} conn/s   "
          f"(target >= 50000; each: {', '.join(f'{r:.0f}' for r in runs)})")
    print(f"   per connection (first resync)      {cap['us_per_conn']:9.1f} us")
    print(f"   (control plane setup before it     {cap['setup_s'] * 1e3:9.1f} ms; second resync "
          f"{cap['second_resync_s'] * 1e3:.1f} ms for {cap['second_resync_offloaded']})")
    print(f"   breakdown, instrumented rerun: {inst['seconds'] * 1e3:.1f} ms for {inst['offloaded']} "
          f"({inst['seconds'] / max(inst['offloaded'], 1) * 1e6:.1f} us/conn with timers)")
    for label, secs in sorted(inst["parts"].items(), key=lambda kv: -kv[1]):
        calls = inst["calls"].get(label, "")
        per = secs / max(inst["offloaded"], 1) * 1e6
        print(f"     {label:38s} {secs * 1e3:8.1f} ms  {per:6.1f} us/conn  {calls!s:>7} calls")
    print()
    print(f"2. event-to-offload latency ({lat['sent']} new connections at {lat['achieved_rate']:.0f}/s, "
          f"{lat['table_before']} already offloaded)")
    print(f"   offloaded {lat['offloaded']} of {lat['sent']} (echoed {lat['echoed']}), "
          f"measured {lat['measured']}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"   p50 {fmt(lat['p50_ms'])} ms   p99 {fmt(lat['p99_ms'])} ms   max {fmt(lat['max_ms'])} ms"
          f"   (target p99 < 2 ms)")
    print()
    print(f"3. path change reaction ({path['offloaded_before']} offloaded connections, default route "
          f"replaced to the second uplink)")
    print(f"   all moved after {fmt(path['reaction_ms'])} ms (first {fmt(path['first_move_ms'])} ms; "
          f"route request {path['request_ms']:.2f} ms)   (target <= 100 ms)")
    print(f"   moved {path['moved']}; rewritten in place {path['rewritten']}, path_lost {path['path_lost']}; "
          f"afterwards {path['in_map_on_new_uplink']} of them on the new uplink in the kernel map")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
