"""A packet generator and a packet sink for measuring a router on one machine.

Generator: an AF_PACKET socket on the sender's veth, bound inside the sender's namespace,
with PACKET_QDISC_BYPASS (frames go straight to the device, as pktgen sends them), fed
by ``sendmmsg`` from a small C loop (tests/bench/sender.c, compiled with cffi on first
use into build/). The frames are prepared once per flow in a table (Ethernet, IP and UDP
headers, valid checksums) and sent round-robin, so ``flows`` distinct (source port,
destination port) pairs arrive in order. The router receives them as skbs from its veth
peer, which is how every load source this kernel allows arrives (live-frame test runs
are refused with EPERM and pktgen is not built); the fair floor is therefore a bare
redirect at the same hook pyflow uses. A full veth ring answers ENOBUFS: that frame was
not sent, the loop yields and sends it again, so the count of frames sent is exact.

Sink: an XDP program for the receiver's veth that counts UDP frames per CPU (all, and
those from the expected source to the expected destination) and drops them, or hands
them to the kernel (pass mode), where ``Echo`` (a socket echo server in the receiver's
namespace) answers every datagram, so that conntrack on the router sees a reply for
every flow. (Reflecting frames in XDP with XDP_TX was tried: on this kernel about half
of them were lost entering the router's veth.) Everything that is not UDP goes to the
kernel (ARP and neighbour discovery keep working). Optionally it records how many
frames each (source port, destination port) pair brought, for tests.

Frames: IPv4 UDP 60 bytes (64 on the wire with the FCS), IPv6 UDP 62 bytes (the smallest
IPv6 UDP frame; 66 on the wire).
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import importlib.util
import ipaddress
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

V4_FRAME, V6_FRAME = 60, 62
PORTS_PER_DPORT = 50_000  # source ports used before the destination port moves on
SPORT_BASE, DPORT_BASE = 10_000, 9_000
SINK_DROP, SINK_PASS = 0, 2
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20  # <linux/socket.h>, <linux/if_packet.h>
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>
# sink_stats slots
ST_PACKETS, ST_BYTES, ST_MATCHED = range(3)

SINK_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

struct udp_ports { __be16 source; __be16 dest; __be16 len; __sum16 check; };

/* ---- sink ---------------------------------------------------------------- */
struct sink_cfg {
    u32 mode;    /* 0: count and drop, 2: count and pass to the kernel */
    u32 record;  /* 1: count frames per port pair in sink_flows */
    u8 src4[4];
    u8 dst4[4];
    u8 src6[16];
    u8 dst6[16];
};
BPF_ARRAY(sink_cfg, struct sink_cfg, 1);
BPF_PERCPU_ARRAY(sink_stats, u64, 3);
BPF_HASH(sink_flows, u32, u64, 4096);

static __always_inline void bump(int slot, u64 by)
{
    u64 *v = sink_stats.lookup(&slot);
    if (v)
        *v += by;
}

static __always_inline int same(const u8 *a, const u8 *b, int n)
{
    #pragma unroll
    for (int i = 0; i < 16; i++)
        if (i < n && a[i] != b[i])
            return 0;
    return 1;
}

int sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    int zero = 0;
    struct sink_cfg *c = sink_cfg.lookup(&zero);
    if (!c || (void *)(eth + 1) > end)
        return XDP_PASS;
    u8 *src, *dst;
    struct udp_ports *udp;
    int alen, match;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
            return XDP_PASS;
        udp = (void *)(ip + 1);
        src = (u8 *)&ip->saddr;
        dst = (u8 *)&ip->daddr;
        alen = 4;
        match = same(src, c->src4, 4) && same(dst, c->dst4, 4);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
            return XDP_PASS;
        udp = (void *)(ip6 + 1);
        src = (u8 *)&ip6->saddr;
        dst = (u8 *)&ip6->daddr;
        alen = 16;
        match = same(src, c->src6, 16) && same(dst, c->dst6, 16);
    } else {
        return XDP_PASS;
    }
    if ((void *)(udp + 1) > end)
        return XDP_PASS;
    bump(0, 1);
    bump(1, (u64)(end - data));
    if (match)
        bump(2, 1);
    if (c->record) {
        u32 pair = ((u32)bpf_ntohs(udp->source) << 16) | bpf_ntohs(udp->dest);
        u64 one = 1, *n = sink_flows.lookup(&pair);
        if (n)
            __sync_fetch_and_add(n, 1);
        else
            sink_flows.update(&pair, &one);
    }
    return c->mode == 2 ? XDP_PASS : XDP_DROP;
}
"""


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame_v4(src_mac: str, dst_mac: str, src: str, dst: str, ttl: int = 64) -> bytes:
    """IPv4 UDP template: ports 0 (filled per flow), UDP checksum 0 (none)."""
    udp_len = V4_FRAME - 14 - 20
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, ttl, socket.IPPROTO_UDP, 0,
                     socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 0, 0, udp_len, 0) + bytes(udp_len - 8)
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + udp


def frame_v6(src_mac: str, dst_mac: str, src: str, dst: str, hlim: int = 64) -> bytes:
    """IPv6 UDP template: ports 0 and the checksum over that (the ports are added per flow)."""
    udp_len = V6_FRAME - 14 - 40
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    ip = struct.pack("!IHBB16s16s", 6 << 28, udp_len, socket.IPPROTO_UDP, hlim, s6, d6)
    payload = bytes(udp_len - 8)
    pseudo = s6 + d6 + struct.pack("!IxxxB", udp_len, socket.IPPROTO_UDP)
    check = _csum(pseudo + struct.pack("!HHHH", 0, 0, udp_len, 0) + payload) or 0xFFFF
    udp = struct.pack("!HHHH", 0, 0, udp_len, check) + payload
    return _mac(dst_mac) + _mac(src_mac) + b"\x86\xdd" + ip + udp


def flow_ports(i: int) -> tuple[int, int]:
    """(source port, destination port) of flow i, as the generator makes them."""
    return SPORT_BASE + i % PORTS_PER_DPORT, DPORT_BASE + i // PORTS_PER_DPORT


def _compile(src: str):
    from bcc import BPF

    return BPF(text=src % {"V4_FRAME": V4_FRAME, "V6_FRAME": V6_FRAME})


def flow_frames(template: bytes, flows: int) -> bytes:
    """The template once per flow, with flow i's ports and (IPv6) its UDP checksum,
    updated incrementally from the template's (RFC 1624: the ports were 0 in it)."""
    v6 = template[12:14] == b"\x86\xdd"
    udp = 14 + (40 if v6 else 20)
    head, tail = template[:udp], template[udp + 8:]
    length, check = struct.unpack_from("!HH", template, udp + 4)
    out = bytearray()
    for i in range(flows):
        sport, dport = flow_ports(i)
        c = 0
        if v6:
            total = (~check & 0xFFFF) + sport + dport
            total = (total & 0xFFFF) + (total >> 16)
            total = (total & 0xFFFF) + (total >> 16)
            c = (~total & 0xFFFF) or 0xFFFF
        out += head + struct.pack("!HHHH", sport, dport, length, c) + tail
    return bytes(out)


_SENDER_CDEF = """
long pft_send_frames(int fd, const uint8_t *table, uint32_t frame_len, uint32_t nframes,
                     uint32_t *next, uint64_t count, uint64_t *busy_retries);
"""


def _sender():
    """tests/bench/sender.c as a cffi module, built once per source version into build/."""
    from cffi import FFI

    src_path = Path(__file__).with_name("sender.c")
    src = src_path.read_text()
    tag = hashlib.sha256((src + _SENDER_CDEF).encode()).hexdigest()[:12]
    name = f"_pft_sender_{tag}"
    out = Path(__file__).resolve().parents[2] / "build" / "bench-sender"
    built = sorted(out.glob(f"{name}*.so")) if out.is_dir() else []
    if not built:
        ffi = FFI()
        ffi.cdef(_SENDER_CDEF)
        ffi.set_source(name, src, extra_compile_args=["-O2"])
        built = [Path(ffi.compile(tmpdir=str(out)))]
    spec = importlib.util.spec_from_file_location(name, built[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class SendResult:
    frames: int = 0
    busy_retries: int = 0  # sends the device refused with a full ring, and retried


class Generator:
    """Frames for ``flows`` flows per family, sent round-robin out of a packet socket.

    configure() prepares the frames; send() must be called from a thread inside the
    namespace that holds the device (the socket is opened there)."""

    def __init__(self) -> None:
        self._mod = _sender()
        self._tables: dict[int, Any] = {}
        self._next = {4: self._mod.ffi.new("uint32_t *"), 6: self._mod.ffi.new("uint32_t *")}
        self.flows = 0

    def configure(self, *, src_mac: str, dst_mac: str, src4: str, dst4: str, src6: str, dst6: str,
                  flows: int) -> None:
        if not 1 <= flows <= PORTS_PER_DPORT * (65535 - DPORT_BASE):
            raise ValueError(f"flows must be 1..{PORTS_PER_DPORT * (65535 - DPORT_BASE)}: {flows}")
        ffi = self._mod.ffi
        self._tables = {
            4: ffi.from_buffer("uint8_t[]", flow_frames(frame_v4(src_mac, dst_mac, src4, dst4), flows)),
            6: ffi.from_buffer("uint8_t[]", flow_frames(frame_v6(src_mac, dst_mac, src6, dst6), flows)),
        }
        self.flows = flows
        self.reset_sequence()

    def reset_sequence(self) -> None:
        """The next frame of either family is flow 0's."""
        for nxt in self._next.values():
            nxt[0] = 0

    def open(self, ifindex: int) -> socket.socket:
        """A packet socket that transmits on ifindex (in the calling thread's namespace)."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
            sock.bind((socket.if_indextoname(ifindex), 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def send(self, family: int, sock: socket.socket, count: int) -> SendResult:
        """``count`` frames of ``family`` out of ``sock`` (from open()), continuing the
        round-robin where the last call stopped."""
        if not self._tables:
            raise RuntimeError("configure() the generator first")
        size = V4_FRAME if family == 4 else V6_FRAME
        busy = self._mod.ffi.new("uint64_t *")
        rc = self._mod.lib.pft_send_frames(sock.fileno(), self._tables[family], size, self.flows,
                                           self._next[family], count, busy)
        if rc < 0:
            raise OSError(-rc, f"sending frames on a packet socket failed: {os.strerror(-rc)}")
        return SendResult(int(rc), int(busy[0]))


class Sink:
    """One sink: its own program, counters and configuration, for one device."""

    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = _compile(SINK_SRC)
        self.fn = self.bpf.load_func("sink", BPF.XDP)
        self.ifname: str | None = None

    def configure(self, *, mode: int, src4: str, dst4: str, src6: str, dst6: str,
                  record: bool = False) -> None:
        """Frames from src to dst (of either family) count as matched."""
        t = self.bpf["sink_cfg"]
        leaf = t.Leaf()
        leaf.mode, leaf.record = mode, int(record)
        for name, addr in (("src4", src4), ("dst4", dst4), ("src6", src6), ("dst6", dst6)):
            raw = ipaddress.ip_address(addr).packed
            ct.memmove(ct.addressof(getattr(leaf, name)), raw, len(raw))
        t[ct.c_int(0)] = leaf

    def counts(self) -> dict[str, int]:
        t = self.bpf["sink_stats"]
        names = ("packets", "bytes", "matched")
        return {name: sum(t[ct.c_int(slot)]) for slot, name in enumerate(names)}

    def flows(self) -> dict[tuple[int, int], int]:
        """(source port, destination port) -> frames, when configured with record."""
        return {(k.value >> 16, k.value & 0xFFFF): v.value for k, v in self.bpf["sink_flows"].items()}

    def clear_flows(self) -> None:
        self.bpf["sink_flows"].clear()

    def attach(self, ifname: str) -> None:
        """Native XDP on ifname, in the calling thread's namespace."""
        self.bpf.attach_xdp(ifname, self.fn, 0)
        self.ifname = ifname

    def detach(self) -> None:
        if self.ifname is not None:
            self.bpf.remove_xdp(self.ifname, 0)
            self.ifname = None


def _in_thread(ns: str, cpu: int | None, nice: int, body: Callable[[], None]) -> None:
    """Runs body in a thread inside namespace ``ns`` (pinned to ``cpu`` if given), waits
    for it and re-raises what it raised. Signals stay with the main thread, so that none
    lands in the middle of a send call."""
    error: list[BaseException] = []

    def run() -> None:
        from tests import netns

        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})  # this thread only
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            with netns.inside(ns):
                body()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    th = threading.Thread(target=run, name="pft-sender", daemon=True)
    th.start()
    th.join()
    if error:
        raise error[0]


def bursts(gen: Generator, ns: str, ifindex: int, family: int, *, frames: int, burst: int = 64,
           pause: float = 0.002, cpu: int = 0) -> None:
    """``frames`` frames in bursts of ``burst`` with a pause after each, from a thread inside
    ``ns``. Paced, so that a router on its slow path can take every frame."""

    def body() -> None:
        with gen.open(ifindex) as sock:
            left = frames
            while left > 0:
                n = min(burst, left)
                gen.send(family, sock, n)
                left -= n
                time.sleep(pause)

    _in_thread(ns, cpu, 0, body)


def paced(gen: Generator, ns: str, ifindex: int, family: int, *, frames: int, rate: float,
          chunk: int = 64, cpu: int = 0) -> float:
    """``frames`` frames at about ``rate`` per second, in chunks of ``chunk`` frames each
    sent when the schedule says it is due, from a thread inside ``ns``. Returns the
    seconds it took."""
    took = [0.0]

    def body() -> None:
        with gen.open(ifindex) as sock:
            t_start, sent = time.monotonic(), 0
            while sent < frames:
                due = t_start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                n = min(chunk, frames - sent)
                gen.send(family, sock, n)
                sent += n
            took[0] = time.monotonic() - t_start

    _in_thread(ns, cpu, 0, body)
    return took[0]


class Echo:
    """A UDP echo server in namespace ``ns`` on ``ports`` (IPv4 and IPv6), in a child process
    of its own (it must not compete with the caller's GIL), bounded by ``max_seconds``."""

    def __init__(self, ns: str, ports: list[int], max_seconds: float = 120.0):
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO_MAIN, ",".join(map(str, ports)),
             str(max_seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("udp echo did not start")

    def stop(self) -> int:
        """Stops it; returns the datagrams it answered."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(30)
        return int(out.strip() or 0)


# The echo's body, run with ``python -c``: answers until stdin closes or time runs out.
_ECHO_MAIN = """
import selectors, socket, sys, time
ports, limit = [int(p) for p in sys.argv[1].split(",")], float(sys.argv[2])
sel = selectors.DefaultSelector()
for port in ports:
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: past rmem_max (root)
        s.bind((addr, port))
        sel.register(s, selectors.EVENT_READ)
sel.register(sys.stdin, selectors.EVENT_READ)
print("ready", flush=True)
n, end = 0, time.monotonic() + limit
while time.monotonic() < end:
    for key, _ in sel.select(0.2):
        if key.fileobj is sys.stdin:
            print(n, flush=True)
            sys.exit(0)
        s = key.fileobj
        for _ in range(256):
            try:
                data, peer = s.recvfrom(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            s.sendto(data, peer)  # blocking: waits for room rather than losing the reply
            n += 1
print(n, flush=True)
"""


@dataclass
class GenStats:
    frames: int = 0
    busy_retries: int = 0
    calls: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


class Blaster:
    """Sends as fast as it can from a thread inside ``ns`` until stopped (or ``max_seconds``),
    on CPU ``cpu`` if given.

    cffi releases the GIL around each call, so the rest of the process keeps running; each
    call is ``chunk`` frames, so stop() takes effect within one call.
    """

    def __init__(self, gen: Generator, ns: str, ifindex: int, family: int, *, chunk: int = 65_536,
                 max_seconds: float = 60.0, cpu: int | None = None, nice: int = 10):
        self.gen, self.ns, self.ifindex, self.family = gen, ns, ifindex, family
        self.cpu, self.nice = cpu, nice
        self.chunk, self.max_seconds = chunk, max_seconds
        self.stats = GenStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pft-blaster", daemon=True)

    def _run(self) -> None:
        # Lower priority than the receiver's NAPI thread (nice 0) on the same CPU: the
        # sender offers far more than a router forwards, and the receiver must never be
        # the bottleneck.
        def body() -> None:
            with self.gen.open(self.ifindex) as sock:
                t0 = time.monotonic()
                while not self._stop.is_set() and time.monotonic() - t0 < self.max_seconds:
                    res = self.gen.send(self.family, sock, self.chunk)
                    self.stats.frames += res.frames
                    self.stats.busy_retries += res.busy_retries
                    self.stats.calls += 1
                self.stats.seconds = time.monotonic() - t0

        try:
            _in_thread(self.ns, self.cpu, self.nice, body)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.stats.error = exc

    def start(self) -> Blaster:
        self._thread.start()
        return self

    def stop(self) -> GenStats:
        self._stop.set()
        self._thread.join(self.max_seconds + 30)
        if self.stats.error is not None:
            raise self.stats.error
        return self.stats
