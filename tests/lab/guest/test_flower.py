"""Flower rules pyflow generates, run by the kernel's software flower (skip_hw), carrying
real NATed TCP transfers between namespaces. Runs inside the kernel lab (cls_flower,
act_pedit, act_csum, act_mirred, act_gact as modules); on a kernel without cls_flower it
skips.

The control plane here is the engine with its real adapters -- ctnetlink, rtnetlink paths,
and the flower adapter (pyflow.hw.offload) -- but no XDP datapath: every connection must
be placed as flower rules (a refusal would land in an in-memory map and fail the test),
so no BPF program is compiled for these tests. The topology is tests/integration's (r1
masquerades to its uplink and forwards :8080 to the client), with the client LAN's MTU
lowered to the uplinks' 1400: a flower rule cannot send ICMP too-big, so pyflow places a
flow only where nothing arriving can be too big to leave (pyflow/hw/rules.py).

Proof of the rules' work: the bulk of each transfer is sent only once the connection is
placed; r1's nftables forward counter (which every kernel-path packet of an established
connection meets) must see almost nothing of it while the rules' counters, read through
pyflow and independently through ``tc -s``, show it; the server captures the segments and
every checksum after r1's NAT must be valid.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests import netns
from tests.support.flower import FlowerRouter
from tests.support.topology import LAN, UP, UP2, V4, V6, topology
from tests.support.traffic import payload, tcp_transfer, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("flower_kernel")]
KIB = 1024

IDLE_S = 8.0  # short, so that the idle test does not wait long; transfers never pause this long


@pytest.fixture(scope="module")
def lab():
    """One topology and one engine for the module: each boot of the emulated lab is slow, and
    every test uses ports of its own."""
    with topology(nat=True) as topo:
        for ns, dev in ((topo.cl, "pft-cl-0"), (topo.r1, LAN)):
            netns.run(ns, ["ip", "link", "set", dev, "mtu", "1400"])
        topo.sh("sv", "ethtool -K pft-sv-0 gro off")  # the server captures segments, not aggregates
        # Software flower cannot NAT a GRO super-packet's checksum: the aggregate carries only
        # the pseudo-header sum (CHECKSUM_PARTIAL), pedit changes the addresses under it and
        # act_csum leaves GSO TCP alone, so the segments leave with wrong checksums (seen here:
        # about a third of them). A NIC running the rules in hardware sees single frames;
        # r1's ports do too, as in hardware, with GRO off.
        for dev in (LAN, UP, UP2):
            topo.sh("r1", f"ethtool -K {dev} gro off")
        r = FlowerRouter(topo.r1, idle_timeout_s=IDLE_S)
        assert r.device_refusals == {LAN: None, UP: None, UP2: None}, r.device_refusals
        try:
            yield topo, r
        finally:
            r.close()


def tcp_out_rsts(ns: str) -> int:
    """TCP resets a namespace's stack has sent (Tcp: OutRsts in /proc/net/snmp)."""
    return netns.mib(ns)["Tcp"]["OutRsts"]


def tc_rule_counters(ns: str, ifname: str) -> dict[int, tuple[int, int]]:
    """handle -> (packets, bytes) of the flower filters on a device's ingress, read by tc(8)."""
    res = netns.run(ns, ["tc", "-s", "-j", "filter", "show", "dev", ifname, "ingress"])
    out = {}
    for f in json.loads(res.stdout or "[]"):
        if f.get("kind") != "flower" or "options" not in f:
            continue
        acts = f["options"].get("actions", [])
        if acts:
            st = acts[0].get("stats", {})
            out[int(f["options"].get("handle", 0))] = (st.get("packets", 0), st.get("bytes", 0))
    return out


def _fwd_bytes(topo) -> int:
    return topo.nft_counter("fwd_tcp")[1]


@pytest.mark.parametrize("family", [4, 6])
def test_flower_rules_carry_nated_tcp_both_directions_byte_exact(lab, family):
    from tests.support.capture import Capture, checksums_valid  # scapy: loaded when needed

    topo, r = lab
    size = 384 * KIB
    addrs = V4 if family == 4 else V6
    for port, upload in ((7100 + family * 10, True), (7101 + family * 10, False)):
        seen: list = []
        fwd_before = _fwd_bytes(topo)
        in_dev = LAN if upload else UP  # where the data direction's rule sits
        cap = Capture(topo.sv, "pft-sv-0", port) if upload else None
        try:
            res = tcp_transfer(topo.sv, addrs["sv"], port, topo.cl, addrs["sv"], port, payload(size, port),
                               upload=upload, timeout=120, pace=0.05,
                               gate=lambda p=port, s=seen: s.append(r.wait_offloaded(p)))
        finally:
            frames = cap.stop() if cap is not None else []
        assert res.received == size and res.received_sha == res.sent_sha
        off = seen[0]
        assert off.hw, "placed as flower rules"
        conn = off.conn
        assert (conn.reply.dst, conn.reply.dport) != (conn.orig.src, conn.orig.sport), "masqueraded"
        fwd = _fwd_bytes(topo) - fwd_before
        assert fwd < size // 4, f"{fwd} of {size} bytes took the kernel's forward path"
        assert wait_for(lambda p=port: r.offloaded_with(p) is None, 20.0), "closed flow kept its rules"
        # the data direction's rule counted the bulk: the kernel's counters of that rule, as
        # pyflow last read them before the rule was removed
        in_index = netns.ifindex(topo.r1, in_dev)
        (rule,) = [rid for rid in off.hw_rules if rid.ifindex == in_index]
        assert r.hw.final[rule].bytes > size * 0.7, (r.hw.final, size)
        assert rule.handle not in tc_rule_counters(topo.r1, in_dev), "rule left behind"
        if frames:
            from scapy.layers.inet import IP, TCP
            from scapy.layers.inet6 import IPv6
            from scapy.layers.l2 import Ether

            l3 = IP if family == 4 else IPv6
            data = [f for _t, f in frames if len(Ether(f)[TCP].payload) > 0]
            assert len(data) > 50
            assert {Ether(f)[l3].src for f in data} == {addrs["r1_up"]}
            if family == 4:
                bad = [f for f in data if not checksums_valid(f)]
                assert not bad, f"{len(bad)} of {len(data)} segments with a wrong checksum"
    st = r.engine.stats
    assert st.hw_failures == 0 and r.flows.inserted == 0, (st.hw_refused, r.flows.entries)


def test_dnat_port_forward_as_flower_rules(lab):
    topo, r = lab
    size = 256 * KIB
    seen: list = []
    rsts = {ns: tcp_out_rsts(ns) for ns in (topo.cl, topo.r1, topo.sv)}
    try:
        res = tcp_transfer(topo.cl, V4["cl"], 80, topo.sv, V4["r1_up"], 8080, payload(size, 80),
                           upload=True, timeout=120, gate=lambda: seen.append(r.wait_offloaded(8080)))
    except ConnectionError as exc:
        sent = {ns: tcp_out_rsts(ns) - n for ns, n in rsts.items()}
        raise AssertionError(f"{exc!r}; resets sent by {sent}; offloaded: {bool(seen)}\n"
                             f"{r.why_not(8080)}\n{r.rule_dump()}") from exc
    assert res.received_sha == res.sent_sha
    off = seen[0]
    assert off.hw and (off.conn.reply.src, off.conn.reply.sport) == (V4["cl"], 80)
    assert r.engine.stats.hw_failures == 0


def test_ttl_1_meets_the_guard_and_idle_rules_expire(lab):
    """A TTL 1 packet of a flow carried by rules meets the guard filter and goes to the
    kernel (which answers time-exceeded) instead of being forwarded with TTL 0; once the
    flow is silent for idle_timeout_s, its rules' last-use time expires it."""
    topo, r = lab
    guards = [line for line in netns.run(topo.r1, ["tc", "filter", "show", "dev", LAN, "ingress"]
                                         ).stdout.splitlines() if "ip_ttl" in line]
    assert len(guards) == 2, guards  # IPv4 and IPv6
    with netns.inside(topo.sv):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.inside(topo.cl):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((V4["sv"], 7301))
        srv.settimeout(5)
        cli.settimeout(5)
        for _ in range(100):
            cli.sendto(b"x" * 100, (V4["sv"], 7301))
            _data, peer = srv.recvfrom(2048)
            srv.sendto(b"y" * 100, peer)
            cli.recvfrom(2048)
            if r.offloaded_with(7301):
                break
            time.sleep(0.05)
        off = r.wait_offloaded(7301)
        assert off.hw
        for _ in range(20):
            cli.sendto(b"x" * 100, (V4["sv"], 7301))
            assert srv.recvfrom(2048)[0] == b"x" * 100
        rule = next(rid for rid in off.hw_rules if rid.ifindex == netns.ifindex(topo.r1, LAN))
        before = tc_rule_counters(topo.r1, LAN)[rule.handle][0]
        assert before >= 20
        cli.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        cli.sendto(b"t" * 100, (V4["sv"], 7301))
        srv.settimeout(1.0)
        with pytest.raises(TimeoutError):
            srv.recvfrom(2048)
        assert tc_rule_counters(topo.r1, LAN)[rule.handle][0] == before, "TTL 1 reached the rule"
        # silence: the rules' last use ages past idle_timeout_s and the flow leaves them
        assert wait_for(lambda: r.engine.stats.removed.get("idle", 0) >= 1, 4 * IDLE_S), \
            "idle rules never expired"
        assert r.offloaded_with(7301) is None
        assert rule.handle not in tc_rule_counters(topo.r1, LAN)
