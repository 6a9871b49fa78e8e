"""The control-plane test topology, shaped like the kernel's own flowtable selftest.

    client ---- r1 (pyflow, nftables: conntrack, masquerade, DNAT) ==== r2 ---- server
     cl           lan            up (MTU 1400)  /  up2 (MTU 1400)        MTU 1600

- cl <-> r1:  198.18.1.0/24, 2001:2:1::/64 (MTU 1500)
- r1 <-> r2:  198.18.2.0/24, 2001:2:2::/64 on "up" and 198.18.4.0/24, 2001:2:4::/64 on
  "up2" (the second uplink, for failover), both MTU 1400: the smaller link
- r2 <-> sv:  198.18.3.0/24, 2001:2:3::/64, MTU 1600: the third MTU, larger than the
  uplinks', so full-sized segments from either end must go through path MTU discovery

r1 masquerades what leaves through its uplinks when ``nat`` is set, and forwards TCP
port 8080 arriving on "up" to the client's port 80 (DNAT). Every veth has GRO on and
transmit checksum offload off (DESIGN.md: redirects into veth need GRO/NAPI; real NICs
deliver complete checksums). Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests import netns

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


def _veth(a_ns, a_if, b_ns, b_if, mtu_a=1500, mtu_b=1500):
    netns.veth(a_ns, a_if, b_ns, b_if)
    for ns, ifname, mtu in ((a_ns, a_if, mtu_a), (b_ns, b_if, mtu_b)):
        netns.run(ns, f"ip link set {ifname} mtu {mtu}")
        netns.run(ns, f"ethtool -K {ifname} gro on tx off", check=False)


@contextlib.contextmanager
def topology(*, nat: bool = True) -> Iterator[Topology]:
    with netns.namespaces("cl", "r1", "r2", "sv") as (cl, r1, r2, sv):
        t = Topology(cl, r1, r2, sv)
        _veth(cl, "pft-cl-0", r1, LAN)
        _veth(r1, UP, r2, "pft-r2-up", 1400, 1400)
        _veth(r1, UP2, r2, "pft-r2-up2", 1400, 1400)
        _veth(r2, "pft-r2-sv", sv, "pft-sv-0", 1600, 1600)
        for ns, ifname, key, plen in (
            (cl, "pft-cl-0", "cl", 24), (r1, LAN, "r1_lan", 24), (r1, UP, "r1_up", 24),
            (r2, "pft-r2-up", "r2_up", 24), (r1, UP2, "r1_up2", 24), (r2, "pft-r2-up2", "r2_up2", 24),
            (r2, "pft-r2-sv", "r2_sv", 24), (sv, "pft-sv-0", "sv", 24),
        ):
            netns.addr(ns, ifname, f"{V4[key]}/{plen}")
            netns.run(ns, ["ip", "-6", "addr", "add", f"{V6[key]}/64", "dev", ifname, "nodad"])
        for ns in (r1, r2):
            netns.run(ns, "sysctl -qw net.ipv4.ip_forward=1")
            netns.run(ns, "sysctl -qw net.ipv6.conf.all.forwarding=1")
        netns.run(cl, f"ip route add default via {V4['r1_lan']}")
        netns.run(cl, f"ip -6 route add default via {V6['r1_lan']}")
        netns.run(r1, f"ip route add default via {V4['r2_up']}")
        netns.run(r1, f"ip -6 route add default via {V6['r2_up']}")
        netns.run(sv, f"ip route add default via {V4['r2_sv']}")
        netns.run(sv, f"ip -6 route add default via {V6['r2_sv']}")
        # r2 reaches the client LAN through r1 (only used without NAT)
        netns.run(r2, f"ip route add 198.18.1.0/24 via {V4['r1_up']}")
        netns.run(r2, f"ip -6 route add 2001:2:1::/64 via {V6['r1_up']}")
        rules = NFT_RULES % (MASQ if nat else TRACK_ONLY)
        res = subprocess.run(["ip", "netns", "exec", r1, "nft", "-f", "-"], input=rules,
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"nft rules failed: {res.stderr.strip()}")
        yield t


# ---- traffic --------------------------------------------------------------------------

def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


@dataclass
class Transfer:
    sent_sha: str
    received_sha: str
    received: int
    seconds: float


def tcp_transfer(server_ns: str, listen_addr: str, port: int, client_ns: str, connect_addr: str,
                 connect_port: int, data: bytes, *, upload: bool = True, pace: float = 0.0,
                 timeout: float = 60.0, on_connected=None, gate=None, gate_after: int = 65536) -> Transfer:
    """Move ``data`` over one TCP connection: client -> server when upload, else server -> client.

    ``pace`` sleeps between 64 KiB chunks (to stretch a transfer over time);
    ``gate`` is called by the sender once ``gate_after`` bytes are sent (0: before any
    data) and before the rest, e.g. to wait until the connection is offloaded;
    ``on_connected`` runs in a thread of its own once the connection is up, while data flows.
    """
    family = socket.AF_INET6 if ":" in listen_addr else socket.AF_INET
    ready = threading.Event()
    result: dict = {}

    def sender(sock):
        if gate is not None and gate_after == 0:
            gate()
        for off in range(0, len(data), 65536):
            sock.sendall(data[off:off + 65536])
            if gate is not None and gate_after and off < gate_after <= off + 65536:
                gate()
            if pace:
                time.sleep(pace)
        sock.shutdown(socket.SHUT_WR)

    def receiver(sock):
        h, n = hashlib.sha256(), 0
        sock.settimeout(timeout)
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    def server():
        try:
            with netns.inside(server_ns):
                ls = socket.socket(family, socket.SOCK_STREAM)
            with ls:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind((listen_addr, port))
                ls.listen(1)
                ls.settimeout(timeout)
                ready.set()
                conn, _ = ls.accept()
                with conn:
                    if upload:
                        result["rx"] = receiver(conn)
                    else:
                        sender(conn)
                        conn.settimeout(timeout)
                        conn.recv(1)  # wait for the client's close
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result["error"] = exc
            ready.set()

    th = threading.Thread(target=server, daemon=True)
    th.start()
    ready.wait(timeout)
    if "error" in result:
        raise result["error"]
    t0 = time.monotonic()
    with netns.inside(client_ns):
        cs = socket.socket(family, socket.SOCK_STREAM)
    with cs:
        cs.settimeout(timeout)
        cs.connect((connect_addr, connect_port))
        if on_connected is not None:
            bg = threading.Thread(target=on_connected, daemon=True)
            bg.start()
        if upload:
            sender(cs)
            cs.recv(1)
        else:
            result["rx"] = receiver(cs)
    th.join(timeout)
    if "error" in result:
        raise result["error"]
    rx_sha, n = result["rx"]
    return Transfer(hashlib.sha256(data).hexdigest(), rx_sha, n, time.monotonic() - t0)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll predicate until it returns a truthy value or timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pin_dir(tag: str) -> str:
    return f"/sys/fs/bpf/pft-{tag}-{os.getpid()}"
