"""The benchmark's network: one sender, one router, one receiver, in three namespaces.

    gen ---- rt (NAT router: nftables conntrack + masquerade) ---- snk
     pft-bg0    pft-bl (lan)                      pft-bu (up)     pft-bs0

- gen <-> rt:  198.18.1.0/24, 2001:2:1::/64
- rt <-> snk:  198.18.2.0/24, 2001:2:2::/64
rt masquerades everything leaving through "up" (IPv4 and IPv6), so conntrack tracks
every flow as a real home router does. Every veth has GRO on and transmit checksum
offload off, as in every test network (tests/support/topology.py builds it; why:
docs/testing.md).

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
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests import netns
from tests.support import topology
from tests.support.topology import Spec, Veth

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
            topology.nft_load(self.rt, NFT_NAT)


def spec(*, threaded: bool) -> Spec:
    ports = ((GEN_IF, "gen", "gen"), (LAN, "rt", "lan"), (UP, "rt", "up"), (SNK_IF, "snk", "snk"))
    return Spec(
        namespaces={"gen": "bgen", "rt": "brt", "snk": "bsnk"},
        veths=(Veth("gen", GEN_IF, "rt", LAN), Veth("rt", UP, "snk", SNK_IF)),
        addrs=[a for ifname, role, key in ports
               for a in ((role, ifname, f"{V4[key]}/24"), (role, ifname, f"{V6[key]}/64"))],
        # UDP conntrack entries outlive the whole benchmark of one flow count (the kernel's
        # defaults, 30 s and 120 s, let early flows expire while 100,000 are being set up)
        sysctls=(("rt", "net.netfilter.nf_conntrack_udp_timeout=300"),
                 ("rt", "net.netfilter.nf_conntrack_udp_timeout_stream=300")),
        forwarding=("rt",),
        routes=(("gen", "default", V4["lan"]), ("gen", "default", V6["lan"]),
                ("snk", "default", V4["up"]), ("snk", "default", V6["up"])),
        # the router's threads first, so that they can be told from the sender's and receiver's
        threaded={"router": (("rt", LAN), ("rt", UP)), "hosts": (("gen", GEN_IF), ("snk", SNK_IF))}
        if threaded else {},
    )


@contextlib.contextmanager
def network(*, threaded: bool = True, nat: bool = True) -> Iterator[Net]:
    with topology.network(spec(threaded=threaded)) as built:
        net = Net(built.ns["gen"], built.ns["rt"], built.ns["snk"])
        for ifname, role in ((GEN_IF, "gen"), (LAN, "rt"), (UP, "rt"), (SNK_IF, "snk")):
            net.ifindex[ifname] = netns.ifindex(built.ns[role], ifname)
            net.mac[ifname] = netns.mac(built.ns[role], ifname)
        net.set_nat(nat)
        # Neighbours resolved before any measurement (the router needs both hosts' MACs).
        for dst in (V4["gen"], V4["snk"], V6["gen"], V6["snk"]):
            netns.run(net.rt, f"ping -c1 -W2 {dst}", check=False)
        if threaded:
            net.router_napi, net.host_napi = built.napi["router"], built.napi["hosts"]
            if not net.router_napi:
                raise RuntimeError("threaded NAPI on the router's veths made no kernel thread")
        yield net
