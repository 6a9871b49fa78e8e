"""The control plane end to end: real kernel, real sockets, pyflow on router r1.

Topology in tests/support/topology.py. Each test builds it fresh, attaches the datapath to r1's
three ports (auto mode: TC ingress on veth) and runs the control loop in a thread
inside r1's namespace. Bulk data is sent only after the connection is offloaded
(``gate``), so the proof of bypass is exact: r1's nftables forward-chain counter
sees the handshake and the first chunk, pyflow's counters carry the rest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from pyflow.control.conntrack import CtNetlink
from pyflow.control.engine import EngineConfig
from pyflow.control.runner import ControlConfig
from tests import netns
from tests.support.capture import Capture, checksums_valid
from tests.support.router import MIB, Router, forwarded_bytes
from tests.support.topology import UP, UP2, V4, V6, topology
from tests.support.traffic import payload, tcp_transfer, wait_for


@contextlib.contextmanager
def router(*, nat=True, start=True, **engine_kw):
    cfg = ControlConfig(engine=EngineConfig(**engine_kw), keepalive_period_s=0.2, offload_mark=0x100)
    with topology(nat=nat) as topo:
        r = Router(topo, cfg, start=start)
        try:
            yield topo, r
        finally:
            r.close()


def _transfer(topo, r, family, port, size, *, upload, seen=None, **kw):
    """A transfer whose bulk starts once the connection is offloaded; the Offloaded record
    is appended to ``seen`` (the flow leaves the map when the connection closes)."""
    addrs = V4 if family == 4 else V6
    seen = seen if seen is not None else []
    return tcp_transfer(topo.sv, addrs["sv"], port, topo.cl, addrs["sv"], port, payload(size, port),
                        upload=upload, gate=lambda: seen.append(r.wait_offloaded(port)), **kw)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("nat", [True, False], ids=["nat", "no-nat"])
def test_tcp_bulk_both_directions_bypasses_the_kernel(family, nat):
    size = 8 * MIB
    with router(nat=nat) as (topo, r):
        for port, upload in ((5101, True), (5102, False)):
            fwd_before, fast_before, seen = topo.nft_counter("fwd_tcp")[1], forwarded_bytes(r), []
            res = _transfer(topo, r, family, port, size, upload=upload, seen=seen)
            assert res.received == size and res.received_sha == res.sent_sha
            fwd_bytes = topo.nft_counter("fwd_tcp")[1] - fwd_before
            fast_bytes = forwarded_bytes(r) - fast_before
            # the slow path saw the handshake, the first 64 KiB chunk and the close only
            assert fwd_bytes < size // 20, (fwd_bytes, fast_bytes)
            assert fast_bytes > size * 0.9, (fwd_bytes, fast_bytes)
            conn = seen[0].conn
            nat_applied = (conn.reply.dst, conn.reply.dport) != (conn.orig.src, conn.orig.sport)
            assert nat_applied == nat
            assert wait_for(lambda p=port: r.offloaded_with(p) is None, 3.0), "closed flow still offloaded"


def test_dnat_port_forward_is_offloaded():
    size = 4 * MIB
    with router(nat=True) as (topo, r):
        # outside host (the server namespace) connects to r1's uplink :8080, DNAT to the client :80
        seen: list = []
        fast_before = forwarded_bytes(r)
        res = tcp_transfer(topo.cl, V4["cl"], 80, topo.sv, V4["r1_up"], 8080, payload(size),
                           upload=True, gate=lambda: seen.append(r.wait_offloaded(8080)))
        assert res.received_sha == res.sent_sha
        act_orig = seen[0].actions[0]
        assert (act_orig.nat_daddr, act_orig.nat_dport) == (V4["cl"], 80)
        assert forwarded_bytes(r) - fast_before > size * 0.9


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_across_the_smaller_link(family):
    """Full-sized segments (client MTU 1500) cannot cross the 1400-byte uplink: the fast path
    hands them to the kernel, which answers with ICMP too-big; the transfer then shrinks its
    segments and continues on the fast path. The connection is offloaded before its first
    data segment, so the kernel learns the path MTU only through the fast path's hand-over."""
    size = 4 * MIB
    with router() as (topo, r):
        fast_before = forwarded_bytes(r)
        res = _transfer(topo, r, family, 5201, size, upload=True, gate_after=0)
        assert res.received_sha == res.sent_sha
        assert r.stats()["over_mtu"] > 0
        assert forwarded_bytes(r) - fast_before > size * 0.5


def _udp_echo(topo, r, family, port, count=400):
    """Client sends numbered datagrams, server echoes them; returns (sent, echoed back)."""
    addrs = V4 if family == 4 else V6
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    echo = _Echo(topo, port, family)
    with netns.inside(topo.cl):
        cli = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        cli.settimeout(2)
        got = set()
        for i in range(count):
            cli.sendto(i.to_bytes(4, "big") * 100, (addrs["sv"], port))
            with contextlib.suppress(TimeoutError):
                data, _ = cli.recvfrom(2048)
                got.add(int.from_bytes(data[:4], "big"))
            if i == 5:
                r.wait_offloaded(port)
    finally:
        cli.close()
        echo.close()
    return count, got


class _Echo:
    """A UDP echo server in sv on ``port`` (a thread)."""

    def __init__(self, topo, port: int, family: int = 4):
        with netns.inside(topo.sv):
            self.srv = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
        self.srv.bind(((V4 if family == 4 else V6)["sv"], port))
        self.srv.settimeout(0.2)
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, peer = self.srv.recvfrom(2048)
                self.srv.sendto(data, peer)

    def close(self) -> None:
        self.stop.set()
        self.th.join(2)
        self.srv.close()


@pytest.mark.parametrize("family", [4, 6])
def test_udp_flows_both_directions(family):
    with router() as (topo, r):
        sent, got = _udp_echo(topo, r, family, 5301)
        assert len(got) == sent
        off = r.offloaded_with(5301)
        orig, reply = r.flow_counters(off)
        assert orig[0] > sent * 0.9 and reply[0] > sent * 0.9


def _ct_timeout(topo, proto: str, dport: int) -> int | None:
    """The remaining timeout conntrack -L shows for the entry to dport, None if none."""
    for line in topo.sh("r1", f"conntrack -L -p {proto} --dport {dport}").stdout.splitlines():
        if f"dport={dport}" in line:
            return int(line.split()[2])
    return None


@pytest.mark.parametrize("hold", [None, 2])
def test_keepalive_outlives_a_short_conntrack_timeout(hold):
    """conntrack's established timeout is 3 s; a paced transfer runs about 6 s. conntrack sees
    none of the fast-path packets: the long timeout written with the offload mark keeps the
    entry (and its NAT) with no message per tick (once more a second after the entries went
    in: the segments that still went through the kernel meanwhile set the 3 s again); a
    short one (2 s) is written again whenever half of it is gone."""
    with router(**({} if hold is None else {"conntrack_timeout_s": hold})) as (topo, r):
        topo.sh("r1", "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_established=3")
        late: list = []

        def look_late():
            time.sleep(5)  # well past conntrack's own timeout
            late.append((r.offloaded_with(5401), _ct_timeout(topo, "tcp", 5401)))

        res = _transfer(topo, r, 4, 5401, 4 * MIB, upload=True, pace=0.1, on_connected=look_late)
        assert res.seconds > 5 and res.received_sha == res.sent_sha
        assert late and late[0][0] is not None, "flow left the fast path mid-transfer"
        if hold is None:
            assert late[0][1] is not None and late[0][1] > 86000, late
            assert r.engine.stats.refreshes == 1  # once, a second after the entries went in
        else:
            assert r.engine.stats.refreshes > 0
        assert "destroyed" not in r.engine.stats.removed


def test_idle_flow_leaves_the_fast_path_and_conntrack_carries_on():
    with router(idle_timeout_s=1.0) as (topo, r):
        sent, got = _udp_echo(topo, r, 4, 5501, count=20)
        assert len(got) == sent
        assert r.wait_removed(5501, ("idle",), 5.0), "idle flow still offloaded"
        assert r.engine.stats.removed.get("idle") == 1
        # handed back with the UDP stream timeout (less the idle second), not the day it held
        timeout = _ct_timeout(topo, "udp", 5501)
        assert timeout is not None and timeout <= 120, timeout
        assert not r.cp.flows.read_counters().as_dict()


def test_fin_takes_the_flow_off_and_conntrack_sees_the_close():
    with router() as (topo, r):
        res = _transfer(topo, r, 4, 5601, MIB, upload=True)
        assert res.received_sha == res.sent_sha
        assert r.wait_removed(5601, ("fin_rst", "tcp_not_established"), 3.0)
        entries = topo.sh("r1", "conntrack -L -p tcp --dport 5601").stdout
        assert "TIME_WAIT" in entries or "CLOSE" in entries, entries
        assert not r.cp.flows.read_counters().as_dict()


def test_route_change_mid_transfer_moves_the_flow_to_the_new_uplink():
    """Failover without NAT: both routers move to the second uplink while data flows."""
    size = 24 * MIB
    with router(nat=False) as (topo, r):
        seen: dict = {}

        def fail_over():
            r.wait_offloaded(5701)
            time.sleep(0.2)
            topo.sh("r1", f"ip route replace default via {V4['r2_up2']}")
            topo.sh("r2", f"ip route replace 198.18.1.0/24 via {V4['r1_up2']}")
            time.sleep(0.3)  # the change is applied within one loop turn
            seen["tx_old"] = topo.link_tx_packets("r1", UP)
            seen["off"] = r.offloaded_with(5701)
            time.sleep(0.5)
            seen["tx_old_later"] = topo.link_tx_packets("r1", UP)

        res = _transfer(topo, r, 4, 5701, size, upload=True, pace=0.01, on_connected=fail_over)
        assert res.received_sha == res.sent_sha
        assert "tx_old_later" in seen, f"transfer ended before the failover was seen ({res.seconds:.1f} s)"
        assert seen["tx_old_later"] - seen["tx_old"] < 5, "packets still sent to the old uplink"
        assert seen["off"] is not None, "flow not offloaded after the failover"
        assert seen["off"].actions[0].out_ifindex == netns.ifindex(topo.r1, UP2)
        # rewritten in place, or (new gateway's MAC not yet known) handed to the kernel path
        # until the neighbour resolved and then offloaded again
        stats = r.engine.stats
        assert stats.rewritten + stats.removed.get("path_lost", 0) >= 1


def test_neighbour_mac_change_is_followed():
    size = 16 * MIB
    with router(nat=False) as (topo, r):
        new_mac = "02:00:00:00:77:01"
        seen = []

        def move():
            r.wait_offloaded(5801)
            time.sleep(0.2)
            topo.sh("r2", f"ip link set pft-r2-up address {new_mac}")
            topo.sh("r1", f"ip neigh replace {V4['r2_up']} lladdr {new_mac} dev {UP} nud reachable")
            time.sleep(0.3)
            seen.append(r.offloaded_with(5801))

        res = _transfer(topo, r, 4, 5801, size, upload=True, pace=0.01, on_connected=move)
        assert res.received_sha == res.sent_sha
        assert seen and seen[0] is not None, f"not offloaded after the change ({res.seconds:.1f} s)"
        assert seen[0].actions[0].dmac == bytes.fromhex(new_mac.replace(":", ""))


def test_event_storm_overflows_a_small_buffer_and_reconciles():
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, conntrack_rcvbuf=4096)
    with topology() as topo:
        r = Router(topo, cfg)
        try:
            # hold the loop inside a keep-alive tick while the storm arrives, so that
            # nothing reads the 4 KiB buffer and the overrun is certain, not a race
            engine, tick = r.engine, r.engine.tick
            held, release = threading.Event(), threading.Event()

            def held_tick():
                held.set()
                release.wait(10)
                engine.tick = tick
                tick()

            engine.tick = held_tick
            assert held.wait(5)
            with netns.inside(topo.cl):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                for port in range(20000, 23000):
                    s.sendto(b"x", (V4["sv"], port))
            release.set()
            assert wait_for(lambda: r.cp.ct.lost_events > 0 and r.engine.stats.resyncs >= 2, 10.0), \
                (r.cp.ct.lost_events, r.engine.stats.resyncs)
            # none of these saw a reply: nothing may be offloaded, nothing stale in the map
            time.sleep(0.5)
            assert not r.engine.offloaded and not r.cp.flows.read_counters().as_dict()
            # and the loop still works after the storm
            sent, got = _udp_echo(topo, r, 4, 5901, count=20)
            assert len(got) == sent and r.offloaded_with(5901)
        finally:
            r.close()


def _replied(topo, port: int, n: int, first_sport: int) -> int:
    """n UDP connections cl:first_sport.. -> sv:port (source ports set, so that no two are
    one), each answered once (a datagram lost is sent again, up to three times); returns
    how many got the answer."""
    answered = 0
    for start in range(0, n, 200):
        with netns.inside(topo.cl):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(min(200, n - start))]
        for i, s in enumerate(socks, first_sport + start):
            s.bind((V4["cl"], i))
            s.settimeout(0.5)
            for _try in range(3):
                s.sendto(b"x", (V4["sv"], port))
                with contextlib.suppress(TimeoutError):
                    if s.recv(64) == b"x":
                        answered += 1
                        break
            s.close()
    return answered


def test_a_resync_of_thousands_does_not_overrun_the_event_buffer_with_its_own_marks(monkeypatch):
    """The start-up resync marks every connection it offloads, and each mark comes back on
    the event socket. 3000 of them overran a 256 KiB buffer (another full resync); they are
    read off while the marks go out. An event that arrives during the resync waits in the
    adapter's backlog, and the loop takes it from there without the socket waking it."""
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, conntrack_rcvbuf=256 << 10)
    with topology() as topo:
        echoes = [_Echo(topo, 6001), _Echo(topo, 6002)]
        try:
            # an entry reports events only if someone listened when it was made
            with netns.inside(topo.r1), CtNetlink():
                assert _replied(topo, 6001, 3000, 30000) == 3000
            r = Router(topo, cfg, start=False)
            try:
                late: list[int] = []
                absorb = CtNetlink._absorb

                def absorb_after_a_new_connection(self: CtNetlink) -> None:
                    # once, inside the resync: a connection the resync's dump cannot hold
                    if not late:
                        late.append(_replied(topo, 6002, 1, 40000))
                    absorb(self)

                monkeypatch.setattr(CtNetlink, "_absorb", absorb_after_a_new_connection)
                r.start()
                ct = r.cp.ct
                assert late == [1]
                assert (ct.lost_events, r.engine.stats.resyncs) == (0, 1)
                assert sum(1 for off in r.engine.offloaded.values() if off.conn.orig.dport == 6001) == 3000, \
                    (r.engine.stats.refused, len(r.engine.pending), r.engine.stats.install_errors)
                # the late connection's events came through the backlog
                assert wait_for(lambda: r.offloaded_with(6002), 3.0), r.engine.stats.refused
                assert r.engine.stats.resyncs == 1
            finally:
                r.close()
        finally:
            for echo in echoes:
                echo.close()


def test_mark_opt_out_keeps_the_flow_on_the_kernel_path():
    with router(exclude_mark_mask=0x10) as (topo, r):
        topo.sh("r1", "nft add rule inet pft forward tcp dport 5902 ct mark set ct mark or 0x10")
        res = tcp_transfer(topo.sv, V4["sv"], 5902, topo.cl, V4["sv"], 5902, payload(2 * MIB),
                           upload=True, gate=lambda: time.sleep(0.5))
        assert res.received_sha == res.sent_sha
        assert r.offloaded_with(5902) is None
        assert r.engine.stats.refused.get("excluded_by_mark", 0) >= 1


def test_differential_slow_and_fast_path_packets_look_the_same_at_the_server():
    """The same connection's data segments captured at the server while they took the kernel
    path (before offload) and after (fast path on r1) differ only in what a TCP stream varies
    itself: sequence numbers, IP id, payload. Addresses, ports (NATed), TTL, DSCP/ECN, DF,
    header lengths are identical and every checksum is valid."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    with router(start=False) as (topo, r):
        topo.sh("sv", "ethtool -K pft-sv-0 gro off")  # capture segments, not GRO aggregates
        cap = Capture(topo.sv, "pft-sv-0", 6001)
        marks: dict = {}

        def gate():
            # the first 256 KiB took the kernel path; now the control plane starts, and its
            # initial dump finds the established connection and offloads it
            marks["slow_until"] = time.monotonic()
            r.start()
            r.wait_offloaded(6001)
            marks["fast_from"] = time.monotonic()

        try:
            fast_before = forwarded_bytes(r)
            res = tcp_transfer(topo.sv, V4["sv"], 6001, topo.cl, V4["sv"], 6001, payload(4 * MIB),
                               upload=True, gate=gate, gate_after=256 * 1024, pace=0.005)
            assert res.received_sha == res.sent_sha
            assert forwarded_bytes(r) - fast_before > MIB
        finally:
            frames = cap.stop()
        data = [(t, f) for t, f in frames if len(Ether(f)[TCP].payload) > 0
                and not Ether(f)[TCP].flags & 0x07]  # data segments, no SYN/FIN/RST
        slow = [f for t, f in data if t < marks["slow_until"]]
        fast = [f for t, f in data if t > marks["fast_from"] + 0.05]
        assert len(slow) > 20 and len(fast) > 100, (len(slow), len(fast), len(frames), len(data))

        def shape(frame):
            ip, tcp = Ether(frame)[IP], Ether(frame)[TCP]
            return (ip.version, ip.ihl, ip.tos, int(ip.flags), ip.frag, ip.ttl, ip.proto, ip.src, ip.dst,
                    tcp.sport, tcp.dport, tcp.dataofs)

        slow_shapes, fast_shapes = {shape(f) for f in slow}, {shape(f) for f in fast}
        assert len(slow_shapes) == 1 and slow_shapes == fast_shapes, (slow_shapes, fast_shapes)
        (only,) = slow_shapes
        assert only[5] == 62 and only[7] == V4["r1_up"], "two router hops, masqueraded to r1's uplink"
        bad = [f.hex() for f in slow + fast if not checksums_valid(f)]
        assert not bad, f"{len(bad)} frames with a wrong checksum, first {bad[0][:200]}"


def test_offloaded_entries_are_marked_in_conntrack():
    with router() as (topo, r):
        listing: list = []

        def look():
            r.wait_offloaded(6101)
            listing.append(topo.sh("r1", "conntrack -L -p tcp --dport 6101").stdout)

        res = _transfer(topo, r, 4, 6101, 2 * MIB, upload=True, pace=0.01, on_connected=look)
        assert res.received_sha == res.sent_sha
        assert listing and "mark=256" in listing[0], listing


def test_link_down_takes_flows_off_the_fast_path():
    # without NAT: masquerade would flush the conntrack entries of a downed device itself
    # (the flow would then leave as "destroyed"); here only the path watcher can notice
    with router(nat=False) as (topo, r):
        sent, got = _udp_echo(topo, r, 4, 6201, count=20)
        assert len(got) == sent and r.offloaded_with(6201)
        topo.sh("r1", f"ip link set {UP} down")
        assert r.wait_removed(6201, ("path_lost",), 2.0), "flow still on a dead uplink"
        assert r.engine.stats.removed.get("path_lost") == 1
        assert not r.cp.flows.read_counters().as_dict()
