"""Test networks: one builder for every topology of namespaces and veths the tests use, and
the control-plane topology most of them share. How the network is built and why each
setting is what it is: docs/testing.md.

The builder (:func:`network`, or :func:`build` for namespaces the caller made) takes a
:class:`Spec`: namespaces by role, veth pairs with their MTU and ``ethtool -K`` settings,
addresses (IPv6 without duplicate address detection, so they are usable at once), routes,
sysctls, nftables rules per namespace and the devices whose NAPI runs in a thread of its
own. Every name carries the pft- prefix (tests.netns refuses others), so a test removes
only what it made; each caller keeps its own names, so a leftover says whose it is.

The control-plane topology (:func:`topology`), shaped like the kernel's own flowtable
selftest:

    client ---- r1 (pyflow, nftables: conntrack, masquerade, DNAT) ==== r2 ---- server
     cl           lan            up (MTU 1400)  /  up2 (MTU 1400)        MTU 1600

- cl <-> r1:  198.18.1.0/24, 2001:2:1::/64 (MTU 1500)
- r1 <-> r2:  198.18.2.0/24, 2001:2:2::/64 on "up" and 198.18.4.0/24, 2001:2:4::/64 on
  "up2" (the second uplink, for failover), both MTU 1400: the smaller link
- r2 <-> sv:  198.18.3.0/24, 2001:2:3::/64, MTU 1600: the third MTU, larger than the
  uplinks', so full-sized segments from either end must go through path MTU discovery

r1 masquerades what leaves through its uplinks when ``nat`` is set, and forwards TCP
port 8080 arriving on "up" to the client's port 80 (DNAT). Every veth has GRO on and
transmit checksum offload off (:data:`TEST_OFFLOADS`). Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tests import netns

# GRO on: an XDP or TC redirect into a veth is delivered only when the peer end runs NAPI,
# which GRO turns on. Transmit checksum offload off: a local sender's packets otherwise
# leave with a partial checksum (CHECKSUM_PARTIAL) that an XDP program cannot see or keep,
# so forwarded frames would arrive with bad checksums; real NICs deliver full checksums.
TEST_OFFLOADS = "gro on tx off"


@dataclass(frozen=True)
class Veth:
    """A veth pair between two namespaces (by role); ``ethtool`` is the ``ethtool -K``
    setting of each end (None: the kernel's defaults)."""

    a: str
    a_if: str
    b: str
    b_if: str
    mtu: int | None = None
    ethtool: tuple[str | None, str | None] = (TEST_OFFLOADS, TEST_OFFLOADS)


@dataclass(frozen=True)
class Spec:
    """What :func:`build` makes. Roles name namespaces; ``namespaces`` maps each role to the
    tag of its unique name (tests.netns.unique: pft-<tag>-<pid>-<n>)."""

    namespaces: Mapping[str, str]
    veths: Sequence[Veth] = ()
    addrs: Sequence[tuple[str, str, str]] = ()  # (role, ifname, address/prefix), v4 or v6
    routes: Sequence[tuple[str, str, str]] = ()  # (role, destination or "default", gateway)
    sysctls: Sequence[tuple[str, str]] = ()  # (role, "key=value")
    forwarding: Sequence[str] = ()  # roles that route IPv4 and IPv6
    nft: Mapping[str, str] = field(default_factory=dict)  # role -> ruleset for nft -f
    # group -> (role, ifname) of devices whose NAPI becomes a kernel thread of its own
    # (/sys/class/net/IF/threaded), in group order; Network.napi has each group's thread ids
    threaded: Mapping[str, Sequence[tuple[str, str]]] = field(default_factory=dict)


@dataclass
class Network:
    ns: dict[str, str]  # role -> namespace name
    napi: dict[str, list[int]] = field(default_factory=dict)

    def run(self, role: str, cmd, **kw):
        return netns.run(self.ns[role], cmd, **kw)


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


def nft_load(ns: str, rules: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"nft rules failed: {res.stderr.strip()}")


def build(spec: Spec, names: Mapping[str, str]) -> Network:
    """Set up ``spec`` in existing namespaces (role -> name); returns what was made."""
    net = Network(dict(names))
    for role in names:
        # Link-local addresses skip duplicate address detection too (the global ones are
        # added nodad below): neighbour discovery sends from the link-local address, so
        # until its DAD ends, about a second after the link comes up, every IPv6 packet
        # towards a next hop waits. Set before the veths exist, so that they inherit it.
        net.run(role, "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
    for v in spec.veths:
        netns.veth(net.ns[v.a], v.a_if, net.ns[v.b], v.b_if)
        for role, ifname, setting in ((v.a, v.a_if, v.ethtool[0]), (v.b, v.b_if, v.ethtool[1])):
            if v.mtu is not None:
                net.run(role, f"ip link set {ifname} mtu {v.mtu}")
            if setting is not None:
                # not every driver has every feature; the veth's own defaults remain then
                net.run(role, f"ethtool -K {ifname} {setting}", check=False)
    for role, ifname, cidr in spec.addrs:
        if ":" in cidr:  # nodad: usable at once, not after duplicate address detection
            net.run(role, ["ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad"])
        else:
            netns.addr(net.ns[role], ifname, cidr)
    for role in spec.forwarding:
        net.run(role, "sysctl -qw net.ipv4.ip_forward=1")
        net.run(role, "sysctl -qw net.ipv6.conf.all.forwarding=1")
    for role, setting in spec.sysctls:
        net.run(role, f"sysctl -qw {setting}")
    for role, dest, via in spec.routes:
        family = ["-6"] if ":" in via else []
        net.run(role, ["ip", *family, "route", "add", dest, "via", via])
    for role, rules in spec.nft.items():
        nft_load(net.ns[role], rules)
    for group, devices in spec.threaded.items():
        before = set(napi_threads())
        for role, ifname in devices:
            # ip netns exec remounts /sys for the namespace, so the path names the right device
            net.run(role, ["sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"])
        net.napi[group] = sorted(set(napi_threads()) - before)
    return net


@contextlib.contextmanager
def network(spec: Spec) -> Iterator[Network]:
    """Fresh namespaces for ``spec``, built, and removed (with their veths) on exit."""
    roles = list(spec.namespaces)
    with netns.namespaces(*(spec.namespaces[r] for r in roles)) as names:
        yield build(spec, dict(zip(roles, names, strict=True)))


def static_neighbour(net: Network, role: str, ifname: str, addr: str, peer: str, peer_if: str) -> None:
    """A permanent neighbour entry for ``addr`` with the MAC of ``peer_if``: frames go out at
    once, without waiting for ARP (a test's first packets are then not held back)."""
    net.run(role, ["ip", "neigh", "replace", addr, "lladdr", netns.mac(net.ns[peer], peer_if),
                   "dev", ifname, "nud", "permanent"])


# ---- the control-plane topology ---------------------------------------------------------

V4 = {"cl": "198.18.1.2", "r1_lan": "198.18.1.1", "r1_up": "198.18.2.1", "r2_up": "198.18.2.2",
      "r1_up2": "198.18.4.1", "r2_up2": "198.18.4.2", "r2_sv": "198.18.3.1", "sv": "198.18.3.2"}
V6 = {"cl": "2001:2:1::2", "r1_lan": "2001:2:1::1", "r1_up": "2001:2:2::1", "r2_up": "2001:2:2::2",
      "r1_up2": "2001:2:4::1", "r2_up2": "2001:2:4::2", "r2_sv": "2001:2:3::1", "sv": "2001:2:3::2"}
LAN, UP, UP2 = "pft-r1-lan", "pft-r1-up", "pft-r1-up2"

NFT_RULES = """
table inet pft {
    counter fwd_tcp {
    }
    counter fwd_udp {
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        ct state established,related meta l4proto tcp counter name fwd_tcp
        ct state established,related meta l4proto udp counter name fwd_udp
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        iifname "pft-r1-up" tcp dport 8080 dnat ip to 198.18.1.2:80
        iifname "pft-r1-up" tcp dport 8080 dnat ip6 to [2001:2:1::2]:80
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
%s
    }
}
"""
MASQ = '        oifname { "pft-r1-up", "pft-r1-up2" } masquerade\n'
TRACK_ONLY = "        ct state new counter\n"  # conntrack tracks in a namespace whose rules use it

_PORTS = (("cl", "pft-cl-0", "cl"), ("r1", LAN, "r1_lan"), ("r1", UP, "r1_up"), ("r2", "pft-r2-up", "r2_up"),
          ("r1", UP2, "r1_up2"), ("r2", "pft-r2-up2", "r2_up2"), ("r2", "pft-r2-sv", "r2_sv"),
          ("sv", "pft-sv-0", "sv"))


@dataclass
class Topology:
    cl: str
    r1: str
    r2: str
    sv: str

    def sh(self, ns: str, cmd: str, **kw):
        return netns.run(getattr(self, ns), cmd, **kw)

    def nft_counter(self, name: str) -> tuple[int, int]:
        """(packets, bytes) of a named counter in r1's forward chain."""
        out = netns.run(self.r1, ["nft", "-j", "list", "counter", "inet", "pft", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"], item["counter"]["bytes"]
        raise AssertionError(f"no counter {name}")

    def link_tx_packets(self, ns: str, ifname: str) -> int:
        out = netns.run(getattr(self, ns), ["cat", f"/sys/class/net/{ifname}/statistics/tx_packets"]).stdout
        return int(out)


def router_spec(*, nat: bool = True) -> Spec:
    v4 = [(ns, ifname, f"{V4[key]}/24") for ns, ifname, key in _PORTS]
    v6 = [(ns, ifname, f"{V6[key]}/64") for ns, ifname, key in _PORTS]
    return Spec(
        namespaces={"cl": "cl", "r1": "r1", "r2": "r2", "sv": "sv"},
        veths=(Veth("cl", "pft-cl-0", "r1", LAN),
               Veth("r1", UP, "r2", "pft-r2-up", mtu=1400),
               Veth("r1", UP2, "r2", "pft-r2-up2", mtu=1400),
               Veth("r2", "pft-r2-sv", "sv", "pft-sv-0", mtu=1600)),
        addrs=[a for pair in zip(v4, v6, strict=True) for a in pair],
        forwarding=("r1", "r2"),
        routes=(("cl", "default", V4["r1_lan"]), ("cl", "default", V6["r1_lan"]),
                ("r1", "default", V4["r2_up"]), ("r1", "default", V6["r2_up"]),
                ("sv", "default", V4["r2_sv"]), ("sv", "default", V6["r2_sv"]),
                # r2 reaches the client LAN through r1 (only used without NAT)
                ("r2", "198.18.1.0/24", V4["r1_up"]), ("r2", "2001:2:1::/64", V6["r1_up"])),
        nft={"r1": NFT_RULES % (MASQ if nat else TRACK_ONLY)},
    )


@contextlib.contextmanager
def topology(*, nat: bool = True) -> Iterator[Topology]:
    with network(router_spec(nat=nat)) as net:
        yield Topology(**net.ns)
