"""A packet generator and a packet sink for measuring a router on one machine.

Generator: an XDP program run through BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES
(pyflow._native.lib.pyflow_xdp_live_run) as if received on the sender's veth; it returns
XDP_TX, so every run really transmits a frame out of that veth into the router, as a NIC
would hand the router XDP frames. Each call replays the frame ``repeat`` times in
batches, so the fixed cost of the syscall is spread over many frames.

The program writes the whole frame (Ethernet, IP and UDP headers) from a template on
every run: live-frame pages are recycled with whatever the receiver wrote into them, and
a router that rewrote the Ethernet header in place would otherwise be sent a frame
addressed to the next hop, which it drops as "other host". It rotates the UDP ports
through ``flows`` distinct (source port, destination port) pairs, keeping the IPv4
header checksum (ports are not in it) and the UDP checksum valid: IPv4 sends checksum 0
(none), IPv6 must carry one, updated incrementally from the template's (RFC 1624).

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
import ipaddress
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pyflow._native import ffi, lib

V4_FRAME, V6_FRAME = 60, 62
MAX_BATCH = 256  # the kernel's TEST_XDP_MAX_BATCH
PORTS_PER_DPORT = 50_000  # source ports used before the destination port moves on
SPORT_BASE, DPORT_BASE = 10_000, 9_000
SINK_DROP, SINK_PASS = 0, 2
# sink_stats slots
ST_PACKETS, ST_BYTES, ST_MATCHED = range(3)

GEN_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

#define V4_FRAME %(V4_FRAME)d
#define V6_FRAME %(V6_FRAME)d
#define UDP4_OFF (ETH_HLEN + 20)
#define UDP6_OFF (ETH_HLEN + 40)

struct gen_cfg {
    u8 frame4[V4_FRAME];
    u8 frame6[V6_FRAME];
    u32 flows;
    u32 ports_per_dport;
    u16 sport_base;
    u16 dport_base;
};
BPF_ARRAY(gen_cfg, struct gen_cfg, 1);
BPF_PERCPU_ARRAY(gen_seq, u32, 2);   /* [0] next flow, [1] pacing tick */
BPF_ARRAY(gen_pace, u32, 1);         /* transmit one run in this many (0, 1: every run) */

struct udp_ports { __be16 source; __be16 dest; __be16 len; __sum16 check; };

static __always_inline u32 next_flow(struct gen_cfg *c)
{
    /* Per CPU: a sender pinned to one CPU walks the flows in order, exactly. */
    int zero = 0;
    u32 *seq = gen_seq.lookup(&zero);
    if (!seq)
        return 0;
    u32 i = *seq;
    *seq = i + 1 >= c->flows ? 0 : i + 1;
    return i;
}

/* Pacing inside one call: the runs in between end in XDP_DROP (a recycled page, no
 * transmit), so a single call can spread its frames over time for a slow receiver. */
static __always_inline int skip_run(void)
{
    int zero = 0, one = 1;
    u32 *every = gen_pace.lookup(&zero);
    if (!every || *every <= 1)
        return 0;
    u32 *tick = gen_seq.lookup(&one);
    if (!tick)
        return 0;
    u32 t = *tick;
    *tick = t + 1 >= *every ? 0 : t + 1;
    return t != 0;
}

static __always_inline void set_ports(struct gen_cfg *c, struct udp_ports *u, u32 i, int v6)
{
    u32 per = c->ports_per_dport ? c->ports_per_dport : 1;
    __be16 sport = bpf_htons(c->sport_base + i %% per);
    __be16 dport = bpf_htons(c->dport_base + i / per);
    u->source = sport;
    u->dest = dport;
    if (v6) {
        /* The template's checksum covers ports 0: add the new ports (RFC 1624). The
         * ones' complement sum does not depend on byte order when every word is
         * taken as it lies in memory. */
        u32 sum = (u16)~u->check;
        sum += sport;
        sum += dport;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        u16 folded = ~sum;
        u->check = folded ? folded : 0xffff;
    }
}

int gen4(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    int zero = 0;
    struct gen_cfg *c = gen_cfg.lookup(&zero);
    if (!c || data + V4_FRAME > end)
        return XDP_ABORTED;
    if (skip_run())
        return XDP_DROP;
    __builtin_memcpy(data, c->frame4, V4_FRAME);
    set_ports(c, data + UDP4_OFF, next_flow(c), 0);
    return XDP_TX;
}

int gen6(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    int zero = 0;
    struct gen_cfg *c = gen_cfg.lookup(&zero);
    if (!c || data + V6_FRAME > end)
        return XDP_ABORTED;
    if (skip_run())
        return XDP_DROP;
    __builtin_memcpy(data, c->frame6, V6_FRAME);
    set_ports(c, data + UDP6_OFF, next_flow(c), 1);
    return XDP_TX;
}
"""

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
    """IPv4 UDP template: ports 0 (the program fills them), UDP checksum 0 (none)."""
    udp_len = V4_FRAME - 14 - 20
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, ttl, socket.IPPROTO_UDP, 0,
                     socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 0, 0, udp_len, 0) + bytes(udp_len - 8)
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + udp


def frame_v6(src_mac: str, dst_mac: str, src: str, dst: str, hlim: int = 64) -> bytes:
    """IPv6 UDP template: ports 0 and the checksum over that (the program adds the ports)."""
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


class Generator:
    """The generator program, compiled once (bcc); configure() sets frames and flow count."""

    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = _compile(GEN_SRC)
        self.prog = {4: self.bpf.load_func("gen4", BPF.XDP), 6: self.bpf.load_func("gen6", BPF.XDP)}

    def configure(self, *, src_mac: str, dst_mac: str, src4: str, dst4: str, src6: str, dst6: str,
                  flows: int) -> None:
        if not 1 <= flows <= PORTS_PER_DPORT * (65535 - DPORT_BASE):
            raise ValueError(f"flows must be 1..{PORTS_PER_DPORT * (65535 - DPORT_BASE)}: {flows}")
        t = self.bpf["gen_cfg"]
        leaf = t.Leaf()
        f4, f6 = frame_v4(src_mac, dst_mac, src4, dst4), frame_v6(src_mac, dst_mac, src6, dst6)
        ct.memmove(ct.addressof(leaf.frame4), f4, len(f4))
        ct.memmove(ct.addressof(leaf.frame6), f6, len(f6))
        leaf.flows = flows
        leaf.ports_per_dport = PORTS_PER_DPORT
        leaf.sport_base, leaf.dport_base = SPORT_BASE, DPORT_BASE
        t[ct.c_int(0)] = leaf
        self.reset_sequence()

    def reset_sequence(self) -> None:
        """The next frame on every CPU is flow 0."""
        seq = self.bpf["gen_seq"]
        seq[ct.c_int(0)] = seq.Leaf(*([0] * len(seq[ct.c_int(0)])))

    def set_pace(self, every: int) -> None:
        """Transmit one run in ``every`` (1: all), starting with the next run on every CPU."""
        self.bpf["gen_pace"][ct.c_int(0)] = ct.c_uint(max(1, every))
        seq = self.bpf["gen_seq"]
        seq[ct.c_int(1)] = seq.Leaf(*([0] * len(seq[ct.c_int(1)])))

    def send(self, family: int, ifindex: int, repeat: int, batch: int = 64) -> int:
        """One live-frames run: ``repeat`` frames out of ifindex (a device in the calling
        thread's namespace). Returns the kernel's mean ns per frame."""
        size = V4_FRAME if family == 4 else V6_FRAME
        data = ffi.new("char[]", size)
        duration = ffi.new("uint32_t *")
        rc = lib.pyflow_xdp_live_run(self.prog[family].fd, data, size, ifindex, repeat, batch, duration)
        if rc < 0:
            raise OSError(-rc, f"BPF_PROG_TEST_RUN (live frames) failed: {os.strerror(-rc)}")
        return int(duration[0])


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


def bursts(gen: Generator, ns: str, ifindex: int, family: int, *, frames: int, burst: int = 64,
           pause: float = 0.002, cpu: int = 0) -> None:
    """``frames`` frames in bursts of ``burst`` with a pause after each, from a thread pinned
    to ``cpu`` inside ``ns`` (pinned: the flow sequence is per CPU, so one CPU walks the
    flows in order). Paced, so that a router on its slow path can take every frame."""
    error: list[BaseException] = []

    def run() -> None:
        from tests import netns

        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
            os.sched_setaffinity(0, {cpu})
            with netns.inside(ns):
                left = frames
                while left > 0:
                    n = min(burst, left)
                    gen.send(family, ifindex, n, n)
                    left -= n
                    time.sleep(pause)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    th = threading.Thread(target=run, name="pft-bursts", daemon=True)
    th.start()
    th.join()
    if error:
        raise error[0]


def paced(gen: Generator, ns: str, ifindex: int, family: int, *, frames: int, rate: float,
          chunk: int = 4096, cpu: int = 0) -> float:
    """``frames`` frames at about ``rate`` per second, from a thread pinned to ``cpu`` inside
    ``ns``: few calls of many runs each (a call has a fixed setup cost of milliseconds), the
    frames spread inside each call by the program's pacing, which is adjusted after every
    call to the rate reached. Returns the seconds it took."""
    error: list[BaseException] = []
    took = [0.0]

    def run() -> None:
        from tests import netns

        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
            os.sched_setaffinity(0, {cpu})
            every, left, t_start = 64, frames, time.monotonic()
            with netns.inside(ns):
                while left > 0:
                    n = min(chunk, left)
                    gen.set_pace(every)
                    t0 = time.monotonic()
                    gen.send(family, ifindex, n * every, 64)
                    reached = n / max(time.monotonic() - t0, 1e-6)
                    every = max(1, min(1 << 16, round(every * reached / rate)))
                    left -= n
            took[0] = time.monotonic() - t_start
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)
        finally:
            gen.set_pace(1)

    th = threading.Thread(target=run, name="pft-paced", daemon=True)
    th.start()
    th.join()
    if error:
        raise error[0]
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
    calls: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


class Blaster:
    """Sends as fast as it can from a thread inside ``ns`` until stopped (or ``max_seconds``),
    on CPU ``cpu`` if given.

    cffi releases the GIL around each call, so the rest of the process keeps running; each
    call is ``chunk`` frames, so stop() takes effect within one call.
    """

    def __init__(self, gen: Generator, ns: str, ifindex: int, family: int, *, chunk: int = 262_144,
                 batch: int = MAX_BATCH, max_seconds: float = 60.0, cpu: int | None = None,
                 nice: int = 10):
        self.gen, self.ns, self.ifindex, self.family = gen, ns, ifindex, family
        self.cpu, self.nice = cpu, nice
        self.chunk, self.batch, self.max_seconds = chunk, batch, max_seconds
        self.stats = GenStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pft-blaster", daemon=True)

    def _run(self) -> None:
        from tests import netns

        try:
            # Signals for the process (a child's SIGCHLD, ...) go to the main thread, not into
            # the middle of a send call (which would end with EINTR).
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # this thread only
            # Lower priority than the receiver's NAPI thread (nice 0) on the same CPU: the
            # sender offers far more than a router forwards, and the receiver must never be
            # the bottleneck.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            with netns.inside(self.ns):
                t0 = time.monotonic()
                while not self._stop.is_set() and time.monotonic() - t0 < self.max_seconds:
                    self.gen.send(self.family, self.ifindex, self.chunk, self.batch)
                    self.stats.frames += self.chunk
                    self.stats.calls += 1
                self.stats.seconds = time.monotonic() - t0
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
