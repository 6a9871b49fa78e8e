"""SQM and pyflow together, in the kernel lab (sch_cake): shaped rates and latency under load
hold when pyflow offloads the bulk flows.

Router r1 of the control-plane topology (client - r1 - r2 - server) shapes as an OpenWrt
router with SQM does: cake on its WAN egress (pft-r1-up, upload) and cake on its LAN
egress (pft-r1-lan, download: the configuration that keeps download shaping with offload;
an IFB on the WAN ingress cannot be kept, see the README's "SQM and shaping"). Two bulk TCP
uploads, two bulk TCP downloads and a ping from the client to the server run together in
rounds, on the kernel path and offloaded by pyflowd on r1. pyflowd runs through all rounds;
it manages the two ports (added at run time) only in the offloaded rounds, so a kernel-path
round has no hook on either port and the same daemon alive beside it. The rounds alternate
in pairs (kernel, offloaded, then offloaded, kernel, ...) so that a drift over the run
weighs on both paths alike.

Measured over the same window in every round: each link's rate (bytes r1 sent out of the
shaped device, Ethernet headers included, as cake counts them: the shaper's output, the
other direction's ACKs included), each transfer's goodput, the ping's round-trip times,
what cake reports (drops, ECN marks, sparse and bulk flows, delays, largest packet) and the
bulk senders' TCP state (ss). Asserted: both link rates within RATE_TOLERANCE of the
configured bandwidth in every round; the offloaded goodput no higher than the shaped rate
allows (a fast path around cake would exceed it); the four bulk connections offloaded and
their bytes counted on the fast path. In `make lab-parity` (PYFLOW_LAB_FULL=1) only, with
ROUNDS rounds per path: ping under load no worse offloaded than on the kernel path, judged
on the pooled round-trip times with the statistics below (`ping_verdict`).
Figures: bench-results/lab-sqm.json and .md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyflow.datapath.loader import Datapath
from tests import netns
from tests.daemon.process import Pyflowd
from tests.lab.guest.lab import lab_log, require_modules
from tests.pins import remove_pin_dir
from tests.support.topology import LAN, UP, V4, topology
from tests.support.traffic import wait_for

UP_MBIT = 2     # WAN egress, cake: the upload
DOWN_MBIT = 4   # LAN egress, cake: the download
WARMUP_S = 4.0  # slow start, and (offloaded rounds) the connections reaching the fast path
WINDOW_S = 12.0
# 40 pings a second, 480 a window: a p95 from 24 samples above it instead of 6. Still a
# sparse flow to cake (one 98-byte frame every 25 ms, a fraction of cake's per-flow quantum
# per round, its queue empty before the next one comes; the kernel path's median equals the
# 0.1 s ping's, about 6 ms: what waiting behind one full-sized frame on each shaped link
# costs), and 31 kbit/s of 2 Mbit/s.
PING_INTERVAL_S = 0.025
RATE_TOLERANCE = 0.05
FULL = os.environ.get("PYFLOW_LAB_FULL") == "1"  # make lab-parity: the rounds and the latency verdict
# rounds per path: 1 in `make lab` (the shaping assertions); 4 in make lab-parity (the latency
# comparison: 4 + 4 rounds give 70 ways to split them, so a round-level permutation test can
# reach p = 1/70)
ROUNDS = 4 if FULL else 1
# The rounds' paths: "kernel" (the ports not managed: no hook) and "pyflow" (offloaded); for a
# closer look, add "paused" (offloaded, pyflowd stopped by SIGSTOP for the window: the fast
# path without the daemon's CPU) or "hook" (the ports not managed by pyflowd, pyflow's TC
# program on both with an empty flow map: every packet takes the hook's lookup and miss)
PATHS = ("kernel", "pyflow")
PATH_NAMES = {"kernel": "kernel path", "pyflow": "pyflow (offloaded)",
              "paused": "pyflow, pyflowd stopped", "hook": "kernel path, TC hook, no flows"}
BOOTSTRAP = 2000
# The latency verdict (make lab-parity): offloaded is worse when its pooled median or p95 is
# more than this above the kernel path's and the bootstrap's 95% interval of that difference
# lies wholly above zero. With 4 + 4 rounds of 480 pings that interval is about +-0.7 ms wide
# around the p95 difference (docs/lab/sqm.md), so a path that makes no difference fails about
# never (1 ms is near 3 standard errors) while the 1.2x p95 (+1.8 ms) the earlier 120-ping
# single runs suggested would fail nearly always.
PING_MARGIN_MS = 1.0
# two bulk connections each way, as SQM tests load a link (flent's RRUL runs four): one TCP
# flow alone under cake's AQM leaves the link idle now and then under emulation's jitter
UPLOAD_PORTS, DOWNLOAD_PORTS = (5301, 5303), (5302, 5304)
CHUNK = 64 * 1024
NOTE = ("Measured inside the kernel lab (qemu without KVM, 2 vCPUs, veth links). The shaped "
        "rates are low enough for the emulated router to saturate them; round-trip times carry "
        "emulation jitter.")


class Bulk:
    """One bulk TCP transfer client <-> server for as long as it runs; counts what arrives."""

    def __init__(self, topo, port: int, *, upload: bool):
        self.port, self.upload = port, upload
        self.received = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        with netns.inside(topo.sv):
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((V4["sv"], port))
            ls.listen(1)
            with netns.inside(topo.cl):
                self.client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.client.settimeout(30)
            self.client.connect((V4["sv"], port))
            ls.settimeout(30)
            self.server, _ = ls.accept()
        self.server.settimeout(30)
        sender, receiver = (self.client, self.server) if upload else (self.server, self.client)
        self.threads = [threading.Thread(target=self._send, args=(sender,), daemon=True),
                        threading.Thread(target=self._receive, args=(receiver,), daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self, sock: socket.socket) -> None:
        data = os.urandom(CHUNK)
        try:
            while not self.stop.is_set():
                sock.sendall(data)
        except OSError as exc:
            if not self.stop.is_set():
                self.error = exc

    def _receive(self, sock: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                n = len(sock.recv(262144))
                if n == 0:
                    return
                self.received += n
        except OSError as exc:
            if not self.stop.is_set():
                self.error = exc

    def close(self) -> None:
        self.stop.set()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(10)


class TxBytes:
    """r1's devices' transmitted bytes, from /proc/thread-self/net/dev read by this thread
    inside r1's namespace (a command per read takes a second under emulation, longer than
    the reads may stray from their timestamps)."""

    def __init__(self, topo):
        self.ns = topo.r1

    def read(self, dev: str) -> int:
        with netns.inside(self.ns), open("/proc/thread-self/net/dev") as f:
            for line in f.read().splitlines()[2:]:
                name, _, counters = line.partition(":")
                if name.strip() == dev:
                    return int(counters.split()[8])  # receive has 8 columns, then transmit bytes
        raise LookupError(f"no device {dev} in {self.ns}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- what cake and the TCP senders report ----------------------------------------------

CAKE_COUNTERS = ("packets", "bytes", "drops")
TIN_COUNTERS = ("sent_packets", "drops", "ecn_mark", "ack_drops", "way_collisions")
TIN_GAUGES = ("peak_delay_us", "avg_delay_us", "base_delay_us", "sparse_flows", "bulk_flows",
              "unresponsive_flows", "max_pkt_len")


def cake_stats(ns: str, dev: str) -> dict:
    """cake's statistics on ``dev``: totals and its best-effort tin (where all this traffic
    goes: no DSCP is set), from ``tc -s -j``."""
    qd = json.loads(netns.run(ns, ["tc", "-s", "-j", "qdisc", "show", "dev", dev]).stdout)
    cake = next(q for q in qd if q.get("kind") == "cake")
    tins = cake.get("tins") or [{}]
    be = tins[1] if len(tins) == 3 else tins[0]  # diffserv3 (the default): bulk, best effort, voice
    return {**{k: cake.get(k, 0) for k in CAKE_COUNTERS},
            "max_network_size": cake.get("max_network_size"),
            "tin": {k: be.get(k) for k in (*TIN_COUNTERS, *TIN_GAUGES)}}


def cake_window(before: dict, after: dict) -> dict:
    """Counters over the window, gauges as at its end."""
    out = {k: after[k] - before[k] for k in CAKE_COUNTERS}
    out["max_network_size"] = after["max_network_size"]
    tin = {k: (after["tin"][k] or 0) - (before["tin"][k] or 0) for k in TIN_COUNTERS}
    tin.update({k: after["tin"][k] for k in TIN_GAUGES})
    out["tin"] = tin
    return out


def tcp_senders(topo) -> list[dict]:
    """The bulk senders' TCP state (ss -ti): the client's upload sockets, the server's
    download sockets."""
    out = []
    for ns, ports, way in ((topo.cl, UPLOAD_PORTS, "upload"), (topo.sv, DOWNLOAD_PORTS, "download")):
        text = netns.run(ns, ["ss", "-tinH", "state", "established"]).stdout
        sock = None
        for line in text.splitlines():
            if line and not line[0].isspace():
                cols = line.split()
                local, peer = cols[-2], cols[-1]
                port = int((peer if way == "upload" else local).rsplit(":", 1)[1])
                sock = port if port in ports else None
                continue
            if sock is None:
                continue
            info = {"way": way, "port": sock}
            for key, pattern in (("srtt_ms", r"\brtt:([\d.]+)/"), ("rttvar_ms", r"\brtt:[\d.]+/([\d.]+)"),
                                 ("minrtt_ms", r"\bminrtt:([\d.]+)"), ("cwnd", r"\bcwnd:(\d+)"),
                                 ("retrans", r"\bretrans:\d+/(\d+)"), ("unacked", r"\bunacked:(\d+)")):
                m = re.search(pattern, line)
                info[key] = float(m.group(1)) if m else 0.0
            out.append(info)
            sock = None
    return out


# ---- one round ---------------------------------------------------------------------------

def measure(topo, label: str, *, gate=None, fast_path=None, window=contextlib.nullcontext,
            daemon_pid: int | None = None, after=None) -> dict:
    """Upload, download and ping together; figures over the window after the warm-up.
    ``fast_path()``: (packets, bytes) the fast path forwarded so far, read just before and
    after the window (its share is over the payload received between those reads);
    ``window()``: a context the window runs in (e.g. the daemon paused); ``daemon_pid``:
    whose CPU time over the window to report; ``after()``: called after the window, the
    connections still open. cake's statistics and the TCP state are read
    outside the ping's time (a command takes about a second of the emulated CPU)."""
    ups = [Bulk(topo, p, upload=True) for p in UPLOAD_PORTS]
    downs = [Bulk(topo, p, upload=False) for p in DOWNLOAD_PORTS]
    tx = TxBytes(topo)

    def received() -> tuple[int, int]:
        return sum(b.received for b in ups), sum(b.received for b in downs)

    ping = None
    try:
        if gate is not None:
            gate()
        time.sleep(WARMUP_S)
        count = int(WINDOW_S / PING_INTERVAL_S)
        # the fast path's counters are read outside the ping's time: a scrape has pyflowd
        # render its metrics and this process parse them, a second or more of CPU under
        # emulation that would land in the offloaded rounds' round-trip times only
        fast0, moved0 = (fast_path(), sum(received())) if fast_path else ((0, 0), 0)
        cake0 = {UP: cake_stats(topo.r1, UP), LAN: cake_stats(topo.r1, LAN)}
        with window():
            ping = subprocess.Popen(["ip", "netns", "exec", topo.cl, "ping", "-n", "-i", str(PING_INTERVAL_S),
                                     "-c", str(count), "-W", "2", V4["sv"]],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            t0, cpu0 = time.monotonic(), cpu_seconds(daemon_pid) if daemon_pid else 0.0
            (up0, down0), wan0, lan0 = received(), tx.read(UP), tx.read(LAN)
            time.sleep(WINDOW_S)
            (up1, down1), wan1, lan1 = received(), tx.read(UP), tx.read(LAN)
            seconds = time.monotonic() - t0
            daemon_cpu = (cpu_seconds(daemon_pid) - cpu0) / seconds if daemon_pid else None
            out, _ = ping.communicate(timeout=WINDOW_S + 30)
        cake = {UP: cake_window(cake0[UP], cake_stats(topo.r1, UP)),
                LAN: cake_window(cake0[LAN], cake_stats(topo.r1, LAN))}
        tcp = tcp_senders(topo)
        if after is not None:
            after()
        moved1, fast1 = (sum(received()), fast_path()) if fast_path else (0, (0, 0))
        for b in (*ups, *downs):
            assert b.error is None, f"{label}: transfer on port {b.port} failed: {b.error}"
    finally:
        if ping is not None and ping.poll() is None:
            ping.kill()
            ping.wait(10)
        for b in (*ups, *downs):
            b.close()
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert len(rtts) >= count // 2, f"{label}: ping mostly lost:\n{out}"

    def mbit(n: int) -> float:
        return round(n * 8 / seconds / 1e6, 3)

    out_ = {
        "label": label,
        "seconds": round(seconds, 2),
        "upload": {"link_mbit": mbit(wan1 - wan0), "goodput_mbit": mbit(up1 - up0), "bytes": up1 - up0},
        "download": {"link_mbit": mbit(lan1 - lan0), "goodput_mbit": mbit(down1 - down0),
                     "bytes": down1 - down0},
        "ping": {"sent": count, "received": len(rtts), **quantiles(rtts), "min_ms": min(rtts),
                 "max_ms": max(rtts)},
        "cake": cake,
        "tcp": tcp,
        "rtts_ms": rtts,
    }
    if daemon_pid:
        out_["pyflowd_cpu_share"] = round(daemon_cpu, 3)  # of one (emulated) CPU, over the window
    if fast_path:
        moved = moved1 - moved0
        fb = fast1[1] - fast0[1]
        out_["fast_path"] = {"packets": int(fast1[0] - fast0[0]), "bytes": int(fb),
                             "share": round(fb / moved, 3) if moved else 0.0}
    return out_


def measure_with_empty_hook(topo, label: str, daemon_pid: int | None = None) -> dict:
    """The load on the kernel path with pyflow's TC program attached to both shaped ports
    and nothing in its flow map."""
    pin = f"/sys/fs/bpf/pft-sqm-hook-{os.getpid()}"
    with netns.inside(topo.r1):
        dp = Datapath(pin)
    try:
        with netns.inside(topo.r1):
            for dev in (LAN, UP):
                dp.attach(dev, "tc")
        return measure(topo, label, daemon_pid=daemon_pid)
    finally:
        with netns.inside(topo.r1):
            dp.destroy()
        remove_pin_dir(pin)


# ---- statistics --------------------------------------------------------------------------

def quantiles(values) -> dict:
    """Median, p95 and p99 in ms (linear interpolation between order statistics)."""
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"median_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


def pooled(rounds: list[np.ndarray], q: float) -> float:
    return float(np.percentile(np.concatenate(rounds), q))


def bootstrap_diff(kernel: list[np.ndarray], other: list[np.ndarray], q: float, *, n: int = BOOTSTRAP,
                   seed: int = 1) -> tuple[float, float]:
    """95% interval of the pooled q-th percentile (other) - (kernel path), by a two-level
    bootstrap: rounds drawn with replacement, then pings within each drawn round (round-to-
    round variation is part of the noise: a round's pings are not independent of each other,
    they share its TCP flows' states)."""
    rng = np.random.default_rng(seed)

    def draw(rounds: list[np.ndarray]) -> np.ndarray:
        picks = rng.integers(len(rounds), size=len(rounds))
        return np.concatenate([rng.choice(rounds[i], size=len(rounds[i])) for i in picks])

    diffs = np.array([np.percentile(draw(other), q) - np.percentile(draw(kernel), q) for _ in range(n)])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return round(float(lo), 2), round(float(hi), 2)


def permutation_p(kernel: list[np.ndarray], other: list[np.ndarray], q: float) -> float:
    """One-sided p-value of the pooled q-th percentile difference (other - kernel path) over
    every way of labelling the rounds (exact: the rounds are exchangeable if the path makes
    no difference)."""
    rounds = [*kernel, *other]
    observed = pooled(other, q) - pooled(kernel, q)
    idx = range(len(rounds))
    hits = total = 0
    for pick in itertools.combinations(idx, len(other)):
        total += 1
        hits += (pooled([rounds[i] for i in pick], q)
                 - pooled([rounds[i] for i in idx if i not in pick], q)) >= observed - 1e-9
    return round(hits / total, 3)


def ping_verdict(kernel: list[dict], other: list[dict]) -> dict:
    """Pooled ping figures of the kernel path's rounds and another path's, and the
    differences (other - kernel path) of the median, p95 and p99, each with its bootstrap
    interval and round-level permutation p-value when there are rounds enough."""
    k = [np.asarray(r["rtts_ms"], dtype=float) for r in kernel]
    o = [np.asarray(r["rtts_ms"], dtype=float) for r in other]
    out: dict = {"kernel_path": {"pings": int(sum(len(x) for x in k)), **quantiles(np.concatenate(k))},
                 "compared": {"pings": int(sum(len(x) for x in o)), **quantiles(np.concatenate(o))}}
    for name, q in (("median", 50), ("p95", 95), ("p99", 99)):
        diff: dict = {"ms": round(pooled(o, q) - pooled(k, q), 2)}
        if len(k) > 1 and len(o) > 1:
            diff["ci95_ms"] = bootstrap_diff(k, o, q)
            diff["permutation_p"] = permutation_p(k, o, q)
        out[f"{name}_diff"] = diff
    return out


# ---- the runs ----------------------------------------------------------------------------

@contextlib.contextmanager
def _paused(daemon):
    daemon.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        daemon.signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def shaped_router():
    require_modules("sch_cake")
    with topology(nat=True) as topo:
        # the end hosts ask for ECN, as current Linux, macOS and iOS hosts do (Linux defaults to
        # answering only): cake marks instead of dropping, and the links stay busy through
        # emulation's jitter instead of idling while a flow recovers from a loss
        for host in (topo.cl, topo.sv):
            netns.run(host, "sysctl -qw net.ipv4.tcp_ecn=1")
        netns.run(topo.r1, f"tc qdisc replace dev {UP} root cake bandwidth {UP_MBIT}mbit")
        netns.run(topo.r1, f"tc qdisc replace dev {LAN} root cake bandwidth {DOWN_MBIT}mbit")
        yield topo


def round_order(paths: tuple[str, ...], rounds: int) -> list[str]:
    """Each path once per cycle, the order rotated from one cycle to the next so that each
    path comes first equally often (two paths: kernel, pyflow, pyflow, kernel, ...)."""
    return [paths[(i + j) % len(paths)] for i in range(rounds) for j in range(len(paths))]


def bpf_filters(ns: str, dev: str) -> int:
    res = netns.run(ns, ["tc", "filter", "show", "dev", dev, "ingress"], check=False)
    return res.stdout.count(" bpf ")


@pytest.fixture(scope="module")
def sqm_runs(shaped_router, results_dir):
    """The same load in ROUNDS rounds on the kernel path and as many offloaded by pyflowd
    (TC, chosen by auto because of the shapers), interleaved: {"kernel_path": [round...],
    "pyflow": [round...], ...}, also written to bench-results."""
    topo = shaped_router
    work = Path(tempfile.mkdtemp(prefix="pft-sqm-"))
    # no device in the file: the ports are added and removed at run time (add-device,
    # del-device), offloaded rounds with them, kernel-path rounds without
    d = Pyflowd(topo, work, devices=())
    # keep-alive at its default period: the test helper's 0.2 s costs the emulated CPU
    d.config.write_text(d.config.read_text().replace("keepalive_interval = 0.2", "keepalive_interval = 1.0"))
    rounds: dict[str, list[dict]] = {path: [] for path in PATHS}
    order = round_order(PATHS, ROUNDS)
    modes: dict[str, str] = {}
    flows: list = []
    data: dict = {}
    try:
        d.start(timeout=180)

        def fast_path() -> tuple[float, float]:
            # after a pause the first scrapes find the loop's snapshot stale (pyflow_up 0,
            # no counters) until its next keep-alive tick
            fresh: list[dict] = []
            assert wait_for(lambda: fresh.append(d.scrape()) or fresh[-1].get("pyflow_up") == 1, 30,
                            interval=0.5), fresh[-1:]
            m = fresh[-1]
            return m["pyflow_fastpath_packets_total"], m["pyflow_fastpath_bytes_total"]

        def gate():
            ok = wait_for(lambda: all(d.flow_on(p) for p in (*UPLOAD_PORTS, *DOWNLOAD_PORTS)), 60,
                          interval=0.5)
            assert ok, f"bulk flows not offloaded: {d.json('stats')['engine']}"

        def offloaded_flows():
            # just after the window, the connections still open: the four bulk connections
            # on the fast path and nothing else (the ping, ICMP, stays on the kernel path)
            flows[:] = d.json("flows")["flows"]
            assert sorted((f["proto"], f["original"]["dport"]) for f in flows) == \
                [("tcp", port) for port in sorted((*UPLOAD_PORTS, *DOWNLOAD_PORTS))], flows

        if FULL:
            # the first load after the topology is built has come out with the lowest p95 of
            # its boot (by about 0.7 ms, in three boots): a round not counted takes that place
            lab_log("sqm: warm-up round (kernel path, not counted)")
            data["warmup_round"] = measure(topo, "warm-up round", daemon_pid=d.proc.pid)
        for n, path in enumerate(order, 1):
            label = f"{PATH_NAMES[path]}, round {n}"
            lab_log(f"sqm: round {n}/{len(order)}: {PATH_NAMES[path]}")
            if path == "kernel":
                assert bpf_filters(topo.r1, LAN) == bpf_filters(topo.r1, UP) == 0
                r = measure(topo, label, daemon_pid=d.proc.pid)
            elif path == "hook":
                r = measure_with_empty_hook(topo, label, daemon_pid=d.proc.pid)
            else:
                for dev in (LAN, UP):
                    d.ctl("add-device", dev)
                try:
                    devs = {x["name"]: x for x in d.json("devices")["devices"]}
                    assert devs[UP]["shaping"]["egress"] == [f"cake {UP_MBIT}Mbit"], devs[UP]
                    assert devs[LAN]["shaping"]["egress"] == [f"cake {DOWN_MBIT}Mbit"], devs[LAN]
                    assert {devs[x]["mode"] for x in (LAN, UP)} == {"tc"}
                    assert all(devs[x]["shaping"]["treatment"] == {"egress": "tc_only"} for x in (LAN, UP))
                    modes = {x: devs[x]["mode"] for x in (LAN, UP)}
                    r = measure(topo, label, gate=gate, fast_path=fast_path, daemon_pid=d.proc.pid,
                                after=offloaded_flows,
                                window=(lambda: _paused(d)) if path == "paused" else contextlib.nullcontext)
                finally:
                    for dev in (LAN, UP):
                        d.ctl("del-device", dev)
            r["round"], r["path"] = n, path
            rounds[path].append(r)
            lab_log(f"sqm: {label}: upload {r['upload']['link_mbit']} download "
                    f"{r['download']['link_mbit']} Mbit/s, ping {r['ping']}")
    finally:
        d.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    data = {**data, "kernel": platform.release(), "note": NOTE,
            "config": {"upload_mbit": UP_MBIT, "download_mbit": DOWN_MBIT, "window_s": WINDOW_S,
                       "warmup_s": WARMUP_S, "ping_interval_s": PING_INTERVAL_S, "rounds": ROUNDS,
                       "order": order},
            "modes": modes, "flows": flows,
            "verdict": ping_verdict(rounds["kernel"], rounds["pyflow"]),
            "also_against_kernel_path": {path: ping_verdict(rounds["kernel"], rounds[path])
                                         for path in PATHS if path not in ("kernel", "pyflow")},
            "rounds": rounds}
    lab_log(f"sqm: pooled {data['verdict']} {data['also_against_kernel_path']}")
    write_results(results_dir, data)
    return data


def mean(values) -> float:
    return round(float(np.mean(values)), 3)


def write_results(results_dir: Path, data: dict) -> None:
    (results_dir / "lab-sqm.json").write_text(json.dumps(data, indent=1) + "\n")
    rounds = data["rounds"]
    verdicts = {"pyflow": data["verdict"], **data["also_against_kernel_path"]}
    lines = ["# SQM with pyflow: shaped rates and latency under load (kernel lab)", "",
             f"Router r1: cake {UP_MBIT} Mbit/s on the WAN egress ({UP}), cake {DOWN_MBIT} Mbit/s on the "
             f"LAN egress ({LAN}); two bulk TCP uploads, two bulk TCP downloads and a ping every "
             f"{PING_INTERVAL_S} s from the client to the server, measured together over "
             f"{WINDOW_S:.0f} s after {WARMUP_S:.0f} s of warm-up, in {data['config']['rounds']} rounds per "
             f"path in the order {', '.join(data['config']['order'])} (pyflowd running throughout, "
             "managing the two ports in the offloaded rounds only). Link rate: bytes r1 sent out of "
             "the shaped device (Ethernet headers included, the other direction's ACKs too).", "",
             "Ping under load, all rounds of a path pooled:", "",
             "| | pings | median (ms) | p95 (ms) | p99 (ms) |", "|" + " --- |" * 5]
    pooled_rows = [("kernel", data["verdict"]["kernel_path"])]
    pooled_rows += [(path, v["compared"]) for path, v in verdicts.items()]
    lines += [f"| {PATH_NAMES[path]} | {c['pings']} | {c['median_ms']} | {c['p95_ms']} | {c['p99_ms']} |"
              for path, c in pooled_rows]
    lines += ["", "Differences from the kernel path (95% interval: rounds, then pings within them, "
                  f"resampled {BOOTSTRAP} times; p: one-sided, over every labelling of the two paths' "
                  "rounds):", "",
              "| | median (ms) | p95 (ms) | p95's p | p99 (ms) | p99's p |", "|" + " --- |" * 6]

    def cell(d: dict) -> str:
        return f"{d['ms']} [{d['ci95_ms'][0]}, {d['ci95_ms'][1]}]" if "ci95_ms" in d else f"{d['ms']}"

    for path, v in verdicts.items():
        lines.append(f"| {PATH_NAMES[path]} | {cell(v['median_diff'])} | {cell(v['p95_diff'])} | "
                     f"{v['p95_diff'].get('permutation_p', '')} | {cell(v['p99_diff'])} | "
                     f"{v['p99_diff'].get('permutation_p', '')} |")
    lines += ["", "Each round:", "",
              "| round | path | upload link (Mbit/s) | download link (Mbit/s) | upload goodput | "
              "download goodput | ping median (ms) | p95 (ms) | p99 (ms) | pyflowd CPU | fast-path share |",
              "|" + " --- |" * 11]
    for r in sorted((r for rs in rounds.values() for r in rs), key=lambda r: r["round"]):
        fp = r.get("fast_path", {}).get("share", "")
        lines.append(f"| {r['round']} | {PATH_NAMES[r['path']]} | {r['upload']['link_mbit']} | "
                     f"{r['download']['link_mbit']} | {r['upload']['goodput_mbit']} | "
                     f"{r['download']['goodput_mbit']} | {r['ping']['median_ms']} | {r['ping']['p95_ms']} | "
                     f"{r['ping']['p99_ms']} | {r.get('pyflowd_cpu_share', '')} | {fp} |")
    if "warmup_round" in data:
        w = data["warmup_round"]["ping"]
        lines += ["", "Warm-up round before round 1 (kernel path, not counted): ping median "
                      f"{w['median_ms']}, p95 {w['p95_ms']}, p99 {w['p99_ms']} ms."]
    lines += ["", "What cake reports (best-effort tin), mean per round: packets, drops and ECN marks over "
                  "the window; flows and delays as at its end; the largest packet it was given (GRO's, "
                  "before cake splits it):", "",
              "| | path | packets | drops | ECN marks | sparse flows | bulk flows | avg delay (us) "
              "| peak delay (us) | largest packet |", "|" + " --- |" * 10]
    for dev, name in ((UP, "WAN egress (upload)"), (LAN, "LAN egress (download)")):
        for path, rs in rounds.items():
            t = [r["cake"][dev]["tin"] for r in rs]
            lines.append(f"| {name} | {PATH_NAMES[path]} | {mean([x['sent_packets'] for x in t]):.0f} | "
                         f"{mean([x['drops'] for x in t])} | {mean([x['ecn_mark'] for x in t])} | "
                         f"{mean([x['sparse_flows'] for x in t])} | {mean([x['bulk_flows'] for x in t])} | "
                         f"{mean([x['avg_delay_us'] for x in t]):.0f} | "
                         f"{mean([x['peak_delay_us'] for x in t]):.0f} | "
                         f"{max(x['max_pkt_len'] for x in t)} |")
    lines += ["", "The bulk senders at the window's end (ss), mean per connection:", "",
              "| | path | srtt (ms) | cwnd | retransmits |", "|" + " --- |" * 5]
    for way in ("upload", "download"):
        for path, rs in rounds.items():
            socks = [s for r in rs for s in r["tcp"] if s["way"] == way]
            if socks:
                lines.append(f"| {way} | {PATH_NAMES[path]} | {mean([s['srtt_ms'] for s in socks])} | "
                             f"{mean([s['cwnd'] for s in socks])} | {mean([s['retrans'] for s in socks])} |")
    lines += ["", f"pyflow: attach modes {data['modes']}; the four bulk connections offloaded in every "
                  "offloaded round (fast-path share: bytes the fast path forwarded over the bulk payload "
                  "received, frames and ACKs included).",
              f"Kernel {data['kernel']}. {NOTE}", ""]
    (results_dir / "lab-sqm.md").write_text("\n".join(lines))


def test_shaping_holds_when_pyflow_offloads(sqm_runs):
    """Both shaped rates hold on every path, in every round, and the bulk flows were carried
    by the fast path when offloaded."""
    for run in (r for rs in sqm_runs["rounds"].values() for r in rs):
        for way, mbit in (("upload", UP_MBIT), ("download", DOWN_MBIT)):
            got = run[way]["link_mbit"]
            assert abs(got - mbit) <= RATE_TOLERANCE * mbit, (run["label"], way, got, mbit)
            # a fast path around cake would carry more than the shaper lets through
            assert run[way]["goodput_mbit"] <= mbit * (1 + RATE_TOLERANCE), (run["label"], way, run[way])
        if "fast_path" in run:
            # the window's bulk bytes went by the fast path (it counts frames, ACKs included,
            # so a fully offloaded window shows a share a little over 1)
            assert run["fast_path"]["share"] >= 0.9, (run["label"], run["fast_path"])


@pytest.mark.lab_full
def test_latency_under_load_no_worse_offloaded(sqm_runs):
    """Ping under the same load, all rounds pooled: offloaded no worse than the kernel path.
    Fails when the offloaded pooled median or p95 is more than PING_MARGIN_MS above the
    kernel path's and the bootstrap's 95% interval of that difference lies above zero. So far
    the fast path itself adds nothing measurable here (offloaded with pyflowd stopped for the
    window: as the kernel path) but pyflowd's own CPU under emulation does, 0.5 to 1.5 ms at
    p95 depending on the boot, over the margin in one boot of four (README, "SQM and
    shaping")."""
    v = sqm_runs["verdict"]
    for name in ("median_diff", "p95_diff"):
        diff = v[name]
        assert diff["ms"] <= PING_MARGIN_MS or diff["ci95_ms"][0] <= 0, (name, v)
