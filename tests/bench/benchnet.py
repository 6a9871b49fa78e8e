"""The benchmark's network: one sender, one router, one receiver, in three namespaces.

    gen ---- rt (NAT router: nftables conntrack + masquerade) ---- snk
     pft-bg0    pft-bl (lan)                      pft-bu (up)     pft-bs0

- gen <-> rt:  198.18.1.0/24, 2001:2:1::/64
- rt <-> snk:  198.18.2.0/24, 2001:2:2::/64
rt masquerades everything leaving through "up" (IPv4 and IPv6), so conntrack tracks
every flow as a real home router does. Every veth has GRO on (a redirect into a veth
delivers only when the peer runs NAPI, DESIGN.md) and transmit checksum offload off
(XDP loses CHECKSUM_PARTIAL; real NICs hand over complete checksums).

With ``threaded`` every veth's NAPI runs in a kernel thread of its own
(/sys/class/net/IF/threaded): the router's work is then exactly what its two ports'
threads do, and can be read from /proc/<pid>/schedstat; the sender's and receiver's
work land in their own threads (this kernel has no IRQ time accounting, so softirq work
is charged to whichever task it interrupts). Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests import netns

V4 = {"gen": "198.18.1.2", "lan": "198.18.1.1", "up": "198.18.2.1", "snk": "198.18.2.2"}
V6 = {"gen": "2001:2:1::2", "lan": "2001:2:1::1", "up": "2001:2:2::1", "snk": "2001:2:2::2"}
GEN_IF, LAN, UP, SNK_IF = "pft-bg0", "pft-bl", "pft-bu", "pft-bs0"

NFT_NAT = """
table inet pftbench {
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "pft-bu" masquerade
    }
}
"""


def napi_threads() -> dict[int, str]:
    """pid -> name of every threaded-NAPI kernel thread on the host."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("napi/"):
            out[int(pid)] = comm
    return out


def thread_cpu_ns(pids: list[int]) -> int:
    """Sum of CPU time (ns, /proc/<pid>/schedstat) of the given threads."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread gone (device removed) has no more time to add
    return total


@dataclass
class Net:
    gen: str
    rt: str
    snk: str
    ifindex: dict[str, int] = field(default_factory=dict)
    mac: dict[str, str] = field(default_factory=dict)
    router_napi: list[int] = field(default_factory=list)  # the router's two ports' NAPI threads
    host_napi: list[int] = field(default_factory=list)  # the sender's and receiver's

    def pin(self, router_cpu: int, host_cpu: int | None, *, realtime_hosts: bool = False) -> None:
        """Router threads on one CPU, sender's and receiver's on another: the router then has a
        CPU to itself (but for the rest of the machine), as a router's forwarding core would.
        host_cpu None: the sender's and receiver's threads stay where the scheduler puts them.
        With realtime_hosts the sender's and receiver's threads get SCHED_FIFO: they share
        their CPU with a generator that never pauses and must never be the bottleneck (without
        it, most frames a bare redirect forwarded were lost entering the receiver). Their work
        is bounded by what the router forwards, a fraction of a CPU."""
        for pids, cpu in ((self.router_napi, router_cpu), (self.host_napi, host_cpu)):
            for pid in pids if cpu is not None else []:
                os.sched_setaffinity(pid, {cpu})
        for pid in self.host_napi if realtime_hosts else []:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))

    def router_cpu_ns(self) -> int:
        return thread_cpu_ns(self.router_napi)

    @contextlib.contextmanager
    def router_realtime(self) -> Iterator[None]:
        """The router's NAPI threads under SCHED_FIFO for the body, back to normal after: for
        paced setup traffic, whose frames would otherwise be lost whenever another task holds
        the router's CPU for longer than its veth ring (256 frames) lasts. Their work is
        bounded by the paced input, a small share of the CPU."""
        for pid in self.router_napi:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))
        try:
            yield
        finally:
            for pid in self.router_napi:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))

    def router_links(self) -> dict[str, dict[str, int]]:
        """The router ports' counters: rx/tx packets and drops (a veth counts frames its peer
        could not take as its own tx drops / the peer's rx drops)."""
        out = netns.run(self.rt, "ip -s -j link show", check=True).stdout
        links = {}
        for item in json.loads(out):
            if item["ifname"] in (LAN, UP):
                st = item["stats64"]
                links[item["ifname"]] = {"rx": st["rx"]["packets"], "rx_dropped": st["rx"]["dropped"],
                                         "tx": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"],
                                         "tx_bytes": st["tx"]["bytes"]}
        return links

    def conntrack_count(self) -> int:
        res = netns.run(self.rt, "conntrack -C", check=False)
        return int(res.stdout.strip() or 0)

    def flush_conntrack(self) -> None:
        netns.run(self.rt, "conntrack -F", check=False)

    def set_nat(self, on: bool) -> None:
        netns.run(self.rt, "nft delete table inet pftbench", check=False)
        if on:
            res = subprocess.run(["ip", "netns", "exec", self.rt, "nft", "-f", "-"], input=NFT_NAT,
                                 capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                raise RuntimeError(f"nft rules failed: {res.stderr.strip()}")


def _set_threaded(ns: str, ifname: str) -> None:
    # ip netns exec remounts /sys for the namespace, so the path names the right device
    netns.run(ns, ["sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"])


@contextlib.contextmanager
def network(*, threaded: bool = True, nat: bool = True) -> Iterator[Net]:
    with netns.namespaces("bgen", "brt", "bsnk") as (gen, rt, snk):
        net = Net(gen, rt, snk)
        netns.veth(gen, GEN_IF, rt, LAN)
        netns.veth(rt, UP, snk, SNK_IF)
        where = {GEN_IF: gen, LAN: rt, UP: rt, SNK_IF: snk}
        for ifname, ns in where.items():
            netns.run(ns, f"ethtool -K {ifname} gro on tx off", check=False)
        for ifname, key, plen in ((GEN_IF, "gen", 24), (LAN, "lan", 24), (UP, "up", 24), (SNK_IF, "snk", 24)):
            netns.addr(where[ifname], ifname, f"{V4[key]}/{plen}")
            netns.run(where[ifname], ["ip", "-6", "addr", "add", f"{V6[key]}/64", "dev", ifname, "nodad"])
            net.ifindex[ifname] = netns.ifindex(where[ifname], ifname)
            net.mac[ifname] = netns.mac(where[ifname], ifname)
        # UDP conntrack entries outlive the whole benchmark of one flow count (the kernel's
        # defaults, 30 s and 120 s, let early flows expire while 100,000 are being set up)
        netns.run(rt, "sysctl -qw net.netfilter.nf_conntrack_udp_timeout=300")
        netns.run(rt, "sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=300")
        netns.run(rt, "sysctl -qw net.ipv4.ip_forward=1")
        netns.run(rt, "sysctl -qw net.ipv6.conf.all.forwarding=1")
        for ns, gw in ((gen, "lan"), (snk, "up")):
            netns.run(ns, f"ip route add default via {V4[gw]}")
            netns.run(ns, f"ip -6 route add default via {V6[gw]}")
        net.set_nat(nat)
        # Neighbours resolved before any measurement (the router needs both hosts' MACs).
        for dst in (V4["gen"], V4["snk"], V6["gen"], V6["snk"]):
            netns.run(rt, f"ping -c1 -W2 {dst}", check=False)
        if threaded:
            before = set(napi_threads())
            for ifname in (LAN, UP):
                _set_threaded(rt, ifname)
            net.router_napi = sorted(set(napi_threads()) - before)
            if not net.router_napi:
                raise RuntimeError("threaded NAPI on the router's veths made no kernel thread")
            before = set(napi_threads())
            for ifname in (GEN_IF, SNK_IF):
                _set_threaded(where[ifname], ifname)
            net.host_napi = sorted(set(napi_threads()) - before)
        yield net
