"""How much of a bulk LAN -> WAN upload over PPPoE the fast path carries, per attach mode.

On the OpenWrt-shaped router (openwrt.py: c2 behind lan2 of br-lan, the WAN port wan with
wan.7 and the PPPoE session pppoe-wan on top, MTU 1492), pyflow's datapath runs on lan2 and
one flow entry is installed by hand for an IPv6 TCP upload from c2 to the internet host
(routed, no NAT, so the key is known before the first byte): ingress lan2, egress the real
port wan with VLAN 7 and the PPPoE session header, the ISP's MAC, MTU 1492, and the PPP
device for what TC cannot encapsulate itself. The upload is byte-exact (SHA-256 at both
ends). The share is the flow's fast-path L3 bytes over those plus the L3 bytes of the
upload that the kernel path forwarded (a counter in the router's forward hook, for this
connection's upload direction only); both count retransmissions alike. The rate under
emulation is no figure of pyflow's and is not asserted.

Modes: tc (GRO super-packets, the PPP device named), tc without the PPP device (what TC did
before it could name one: super-packets need a PPPoE length per segment and take the kernel
path, l2_rewrite_failed), and XDP native and generic (single frames, each encapsulated by
the datapath). The figures go to bench-results/pppoe_gso.txt and the test output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pyflow.datapath import abi
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.lab.guest.lab import lab_log
from tests.lab.guest.openwrt import PPP, PPP_MTU, V4, V6, WAN, WAN_VID, lab_openwrt
from tests.pins import remove_pin_dir

pytestmark = pytest.mark.root

SIZE = 4 << 20  # bytes uploaded per mode
PORT, SPORT = 5201, 42000
GOAL = 0.90  # the share TC and XDP must reach
RESULTS = Path(__file__).resolve().parents[3] / "bench-results"
_runs = itertools.count()
_figures: dict[str, dict] = {}

RECEIVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# Connects, reports, waits for a line on stdin (the flow is installed then), sends, closes.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.connect((sys.argv[3], int(sys.argv[4])))
print("connected", flush=True)
sys.stdin.readline()
size, chunk = int(sys.argv[5]), bytes((i * 7 + 3) & 0xFF for i in range(1 << 16))
sent = 0
while sent < size:
    sent += s.send(chunk[:min(len(chunk), size - sent)])
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(sent, flush=True)
"""


def expected_digest() -> str:
    chunk = bytes((i * 7 + 3) & 0xFF for i in range(1 << 16))
    h = hashlib.sha256()
    left = SIZE
    while left:
        h.update(chunk[:min(len(chunk), left)])
        left -= min(len(chunk), left)
    return h.hexdigest()


@pytest.fixture(scope="module")
def topo():
    with lab_openwrt("pppoe_gso") as t:
        yield t
    RESULTS.mkdir(exist_ok=True)
    if _figures:
        lines = ["mode                          fast-path L3 bytes / (fast path + kernel path)        "
                 "fast-path skbs  l2_rewrite_failed skbs"]
        for mode, f in _figures.items():
            lines.append(f"{mode:29s} {f['fast']:>10d} / ({f['fast']:>10d} + {f['kernel']:>10d}) = "
                         f"{f['share']:6.1%}   {f['skbs']:>8d}  {f['l2_failed']:>8d}")
        (RESULTS / "pppoe_gso.txt").write_text(
            f"TCP upload of {SIZE} bytes, c2 -> inet over VLAN {WAN_VID} + PPPoE (MTU {PPP_MTU}), "
            "lab kernel\n" + "\n".join(lines) + "\n")


COUNTER_TABLE = "pft_pppoe_gso"


def _kernel_upload_counter(topo, family: int, src: str, sport: int) -> None:
    """A counter in the router's forward hook for this upload's direction: what the kernel
    path carried of it (L3 bytes; a GRO super-packet counts whole)."""
    ip = "ip6" if family == 6 else "ip"
    rules = (f"table inet {COUNTER_TABLE} {{\n counter upload {{ }}\n"
             f" chain forward {{ type filter hook forward priority 10; policy accept;\n"
             f"  {ip} saddr {src} tcp sport {sport} tcp dport {PORT} counter name upload\n }}\n}}\n")
    subprocess.run([*_in(topo.ns["rt"]), "nft", "-f", "-"], input=rules, text=True, check=True,
                   capture_output=True, timeout=60)


def _kernel_upload_bytes(topo) -> int:
    out = json.loads(topo.sh("rt", ["nft", "-j", "list", "counter", "inet", COUNTER_TABLE, "upload"]).stdout)
    return next(int(o["counter"]["bytes"]) for o in out["nftables"] if "counter" in o)


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def _masquerade(topo, sport: int) -> tuple[str, int]:
    """The address and port the router's masquerade gave c2's connection from sport."""
    out = topo.sh("rt", ["conntrack", "-L", "-p", "tcp", "--orig-port-src", str(sport)]).stdout
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f and not f.startswith("["))
        # the second src=/dst= pair is the reply tuple; dict() keeps the last of each
        if fields.get("dport") and fields.get("dst") == V4["rt_ppp"]:
            return fields["dst"], int(fields["dport"])
    raise AssertionError(f"no masqueraded conntrack entry for source port {sport}:\n{out}")


# `make lab` measures TC over IPv4 (what auto takes on a shaped or virtual uplink, and the
# mode this test is about); `make lab-parity` (PYFLOW_LAB_FULL=1) measures every mode.
_FULL = pytest.mark.lab_full


@pytest.mark.parametrize("mode,family", [("tc", 4),
                                         pytest.param("tc", 6, marks=_FULL),
                                         pytest.param("tc, no ppp device", 6, marks=_FULL),
                                         pytest.param("native", 6, marks=_FULL),
                                         pytest.param("generic", 6, marks=_FULL),
                                         pytest.param("native", 4, marks=_FULL)])
def test_upload_share_on_the_fast_path(topo, mode, family):
    sess = topo.session
    assert sess is not None
    attach = mode.split(",")[0]
    name = f"{mode} (ipv{family})"
    V = V6 if family == 6 else V4
    # the flow skips the forward path one way; conntrack then sees ACKs for data it did not
    # see and, strict, marks them invalid (the kernel flowtable sets its offloaded entries
    # liberal for the same reason)
    topo.sh("rt", "sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1")
    pin = f"/sys/fs/bpf/pft-pg-{os.getpid()}-{next(_runs)}"
    rt = topo.ns["rt"]
    receiver = subprocess.Popen([*_in(topo.ns["inet"]), "python3", "-c", RECEIVER, str(PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
        with netns.inside(rt):
            dp = Datapath(pin)
            try:
                dp.attach("lan2", attach)
                slot = dp.reserve_tx_port(WAN) if attach != "tc" else 0
                sport = SPORT + next(_runs)
                sender = subprocess.Popen(
                    [*_in(topo.ns["c2"]), "python3", "-c", SENDER, V["c2"], str(sport), V["inet"],
                     str(PORT), str(SIZE)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                assert sender.stdout is not None and sender.stdin is not None
                assert sender.stdout.readline().strip() == "connected", sender.stderr
                key = abi.FlowKey(netns.ifindex(rt, "lan2"), abi.PROTO_TCP, V["c2"], V["inet"], sport, PORT)
                nat_addr, nat_port = _masquerade(topo, sport) if family == 4 else (None, None)
                act = abi.FlowAction(
                    out_ifindex=netns.ifindex(rt, WAN), tx_port=slot, mtu=PPP_MTU,
                    nat_saddr=nat_addr, nat_sport=nat_port,
                    in_mac=netns.mac(rt, "br-lan"), dmac=sess.ac_mac, smac=netns.mac(rt, WAN),
                    vlan_outer_tci=WAN_VID, pppoe_sid=sess.sid,
                    ppp_ifindex=netns.ifindex(rt, PPP) if mode == "tc" else 0)
                k = dp.flows.Key.from_buffer_copy(abi.key_bytes(key))
                dp.flows[k] = dp.flows.Leaf.from_buffer_copy(abi.value_bytes(act, key))
                _kernel_upload_counter(topo, family, V["c2"], sport)
                before, t0 = dp.reason_counts(), time.monotonic()
                sender.stdin.write("go\n")
                sender.stdin.flush()
                out, err = sender.communicate(timeout=300)
                sent = int(out.split()[-1])
                got, _ = receiver.communicate(timeout=60)
                elapsed = time.monotonic() - t0
                after, kernel = dp.reason_counts(), _kernel_upload_bytes(topo)
                flow = dp.flows[k]
                del dp.flows[k]
            finally:
                dp.destroy()
                remove_pin_dir(pin)
                topo.sh("rt", ["nft", "delete", "table", "inet", COUNTER_TABLE], check=False)
    finally:
        for p in (sender, receiver):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    n, digest = got.split()
    assert sent == SIZE and int(n) == SIZE and digest == expected_digest(), "the upload was not byte-exact"
    fast = flow.counters.bytes
    share = fast / (fast + kernel) if fast + kernel else 0.0
    skbs = after["forwarded"][0] - before["forwarded"][0]
    l2_failed = after["l2_rewrite_failed"][0] - before["l2_rewrite_failed"][0]
    _figures[name] = dict(fast=fast, kernel=kernel, share=share, skbs=skbs, l2_failed=l2_failed)
    line = (f"pppoe_gso {name}: fast path {fast} L3 bytes, kernel path {kernel}: {share:.1%} fast "
            f"({skbs} skbs forwarded, {flow.counters.packets} packets, {l2_failed} l2_rewrite_failed, "
            f"{elapsed:.1f} s, {8 * SIZE / elapsed / 1e6:.1f} Mbit/s)")
    lab_log(line)
    print(line)
    if mode == "tc, no ppp device":
        # the comparison: without the PPP device TC leaves super-packets to the kernel
        assert l2_failed > 0, line
    else:
        assert share >= GOAL, line
