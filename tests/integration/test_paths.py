"""Path resolution (RtPaths) and change watching (PathWatcher) against real namespaces.

Topology, made fresh for each test (all in pft- namespaces):

    gw1 [pft-gw1 198.18.1.2, 2001:2:0:1::2] --- [pft-up1 198.18.1.1, 2001:2:0:1::1]
    gw2 [pft-gw2 198.18.2.2, 2001:2:0:2::2] --- [pft-up2 198.18.2.1, 2001:2:0:2::1]  router
    host [pft-host 198.18.10.2, 2001:2:0:10::2] --- [pft-lan 198.18.10.1, 2001:2:0:10::1]

The router forwards both families; its main table's default routes go via gw1,
table 100's via gw2. "Remote" destinations are 198.19.0.0/16 and 2001:2:0:99::/64.

The last part of the file tests the pure decoders with fake netlink messages:
this kernel has no 802.1Q and no PPP, so VLAN / QinQ / PPPoE egress devices
cannot be created here. The messages are built in the kernel's layout
(rt_fill_info, neigh_fill_info, rtnl_fill_ifinfo + vlan_fill_info) and the link
messages go through pyroute2's own ifinfmsg decoder, as RtPaths' do.
"""

from __future__ import annotations

import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pyflow.control import paths as P
from pyflow.control.model import PPPOE_NO_SESSION, VLAN_UNSUPPORTED, Egress, Layer, NoPath, NotYet, egress_at
from tests import netns

pytestmark = pytest.mark.root  # the decode tests at the end need no root; the rest do

V4, V6 = socket.AF_INET, socket.AF_INET6
REMOTE4, REMOTE6 = "198.19.0.10", "2001:2:0:99::10"
HOST4, HOST6 = "198.18.10.2", "2001:2:0:10::2"
GW1_4, GW1_6, GW2_4, GW2_6 = "198.18.1.2", "2001:2:0:1::2", "198.18.2.2", "2001:2:0:2::2"
NEW_MAC = "02:00:5e:10:00:42"


def _ip_batch(ns: str, lines: list[str]) -> None:
    """Several ip(8) commands in one process (ip -batch): setup in a fraction of the time."""
    res = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch failed: {res.stderr.strip()}")


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass
class Topo:
    r: str
    gw1: str
    gw2: str
    host: str
    up1: int
    up2: int
    lan: int

    def ip(self, cmd: str, ns: str | None = None) -> None:
        netns.run(ns or self.r, ["ip", *cmd.split()])

    def mac(self, ns: str, ifname: str) -> bytes:
        return _mac(netns.mac(ns, ifname))

    def sysctl(self, *settings: str, ns: str | None = None) -> None:
        netns.run(ns or self.r, ["sysctl", "-qw", *settings])

    def ping(self, addr: str) -> None:
        """Resolve a neighbour the ordinary way (one echo, at most 2 s)."""
        netns.run(self.r, ["ping", "-c1", "-W2", addr])


@pytest.fixture
def topo() -> Iterator[Topo]:
    with netns.namespaces("rt", "gw1", "gw2", "host") as (r, gw1, gw2, host):
        netns.veth(r, "pft-up1", gw1, "pft-gw1")
        netns.veth(r, "pft-up2", gw2, "pft-gw2")
        netns.veth(r, "pft-lan", host, "pft-host")
        netns.run(r, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                      "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
        _ip_batch(r, [
            "addr add 198.18.1.1/24 dev pft-up1", "addr add 2001:2:0:1::1/64 dev pft-up1 nodad",
            "addr add 198.18.2.1/24 dev pft-up2", "addr add 2001:2:0:2::1/64 dev pft-up2 nodad",
            "addr add 198.18.10.1/24 dev pft-lan", "addr add 2001:2:0:10::1/64 dev pft-lan nodad",
            f"route add default via {GW1_4}", f"route add ::/0 via {GW1_6}",
            f"route add default via {GW2_4} table 100", f"route add ::/0 via {GW2_6} table 100",
        ])
        for ns, dev, a4, a6 in ((gw1, "pft-gw1", GW1_4, GW1_6), (gw2, "pft-gw2", GW2_4, GW2_6),
                                (host, "pft-host", HOST4, HOST6)):
            _ip_batch(ns, [f"addr add {a4}/24 dev {dev}", f"addr add {a6}/64 dev {dev} nodad"])
        yield Topo(r, gw1, gw2, host, up1=netns.ifindex(r, "pft-up1"), up2=netns.ifindex(r, "pft-up2"),
                   lan=netns.ifindex(r, "pft-lan"))


@pytest.fixture
def paths(topo: Topo) -> Iterator[P.RtPaths]:
    with netns.inside(topo.r):
        p = P.RtPaths()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def watcher(topo: Topo) -> Iterator[P.PathWatcher]:
    with netns.inside(topo.r):
        w = P.PathWatcher()
    try:
        yield w
    finally:
        w.close()


def _wait_changes(w: P.PathWatcher, want, deadline_s: float) -> tuple[list[P.Change], float]:
    """Poll until a change matching want() arrives or deadline_s passes; (all changes, seconds)."""
    t0 = time.perf_counter()
    seen: list[P.Change] = []
    while True:
        left = deadline_s - (time.perf_counter() - t0)
        if left <= 0:
            return seen, time.perf_counter() - t0
        got = w.poll(left)
        seen += got
        if any(want(c) for c in got):
            return seen, time.perf_counter() - t0


def _resolved(p: P.RtPaths, *args, timeout: float = 2.0, **kw) -> Egress:
    """egress() once the neighbour resolves (bounded): NotYet until then."""
    end = time.monotonic() + timeout
    while True:
        try:
            return p.egress(*args, **kw)
        except NotYet:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


# ---------------------------------------------------------------------------
# forwarding paths


def test_ipv4_via_gateway_and_on_link(topo: Topo, paths: P.RtPaths) -> None:
    topo.ping(GW1_4)
    topo.ping(HOST4)
    up1_mac, lan_mac = topo.mac(topo.r, "pft-up1"), topo.mac(topo.r, "pft-lan")
    out = paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    assert out == Egress(ifindex=topo.up1, ifname="pft-up1", smac=up1_mac,
                         dmac=topo.mac(topo.gw1, "pft-gw1"), mtu=1500, layers=(Layer(topo.up1, "pft-up1"),))
    back = paths.egress(V4, REMOTE4, HOST4, iif=topo.up1, mark=0)
    assert back == Egress(ifindex=topo.lan, ifname="pft-lan", smac=lan_mac,
                          dmac=topo.mac(topo.host, "pft-host"), mtu=1500,
                          layers=(Layer(topo.lan, "pft-lan"),))
    # no iif: the output lookup (locally sent packets) takes the same route
    assert paths.egress(V4, "198.18.1.1", REMOTE4, iif=None, mark=0).ifindex == topo.up1


def test_ipv6_via_gateway_and_on_link(topo: Topo, paths: P.RtPaths) -> None:
    topo.ping(GW1_6)
    topo.ping(HOST6)
    out = paths.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0)
    assert out == Egress(ifindex=topo.up1, ifname="pft-up1", smac=topo.mac(topo.r, "pft-up1"),
                         dmac=topo.mac(topo.gw1, "pft-gw1"), mtu=1500, layers=(Layer(topo.up1, "pft-up1"),))
    back = paths.egress(V6, REMOTE6, HOST6, iif=topo.up1, mark=0)
    assert (back.ifindex, back.dmac) == (topo.lan, topo.mac(topo.host, "pft-host"))


def test_locally_sent_src_falls_back_to_output_lookup(topo: Topo, paths: P.RtPaths) -> None:
    """The kernel refuses an iif lookup whose src is our own address (martian source, EINVAL);
    for such a packet the output lookup is the kernel's real route."""
    topo.ping(GW1_4)
    assert paths.egress(V4, "198.18.10.1", REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1
    # a martian that is not ours stays refused
    with pytest.raises(NoPath, match="martian"):
        paths.egress(V4, "127.0.0.1", REMOTE4, iif=topo.lan, mark=0)


def test_neighbour_not_yet_then_resolved(topo: Topo, paths: P.RtPaths, watcher: P.PathWatcher) -> None:
    # unknown neighbour: NotYet, and RtPaths asked the kernel to resolve it (NTF_USE)
    with pytest.raises(NotYet, match="198.18.1.2"):
        paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    changes, _ = _wait_changes(watcher, lambda c: c == ("neigh", topo.up1, GW1_4), 2.0)
    assert ("neigh", topo.up1, GW1_4) in changes
    out = _resolved(paths, V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    assert out.dmac == topo.mac(topo.gw1, "pft-gw1")


def test_neighbour_added_by_hand(topo: Topo) -> None:
    with netns.inside(topo.r):
        p = P.RtPaths(resolve=False)
    try:
        for _ in range(3):  # stays NotYet: nothing resolves it
            with pytest.raises(NotYet, match="not known"):
                p.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0)
        topo.ip(f"-6 neigh replace {GW1_6} dev pft-up1 lladdr {NEW_MAC} nud reachable")
        assert p.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0).dmac == _mac(NEW_MAC)
    finally:
        p.close()


def test_unanswered_neighbour_stays_not_yet(topo: Topo, paths: P.RtPaths) -> None:
    topo.ip("route add 198.19.5.0/24 via 198.18.1.77")  # nobody has 198.18.1.77
    with pytest.raises(NotYet):
        paths.egress(V4, HOST4, "198.19.5.5", iif=topo.lan, mark=0)
    time.sleep(0.05)  # the kernel is now probing: INCOMPLETE
    with pytest.raises(NotYet, match="INCOMPLETE|FAILED"):
        paths.egress(V4, HOST4, "198.19.5.5", iif=topo.lan, mark=0)


# ---------------------------------------------------------------------------
# no path


def test_no_path_reasons(topo: Topo, paths: P.RtPaths) -> None:
    topo.ip("route add blackhole 198.19.1.0/24")
    topo.ip("route add unreachable 198.19.2.0/24")
    topo.ip("route add prohibit 198.19.3.0/24")
    topo.ip("-6 route add blackhole 2001:2:0:91::/64")
    topo.ip("-6 route add prohibit 2001:2:0:93::/64")
    cases = [
        (V4, "198.19.1.1", "blackhole"),
        (V4, "198.19.2.1", "unreachable"),
        (V4, "198.19.3.1", "prohibit"),
        (V4, "198.18.1.1", "local"),
        (V4, "198.18.2.255", "broadcast"),
        (V4, "224.0.0.5", "multicast"),
        (V6, "2001:2:0:91::1", "blackhole"),
        (V6, "2001:2:0:93::1", "prohibit"),
        (V6, "2001:2:0:1::1", "local"),
        (V6, "ff02::1", "multicast"),
    ]
    for family, dst, word in cases:
        src = HOST4 if family == V4 else HOST6
        with pytest.raises(NoPath, match=word):
            paths.egress(family, src, dst, iif=topo.lan, mark=0)
    topo.ip("route del default")
    topo.ip("-6 route del default")
    with pytest.raises(NoPath, match="no route"):
        paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    with pytest.raises(NoPath, match="no route"):
        paths.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0)


def test_forwarding_and_rp_filter_verdicts(topo: Topo, paths: P.RtPaths) -> None:
    topo.ping(GW1_4)
    topo.ping(GW1_6)
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1
    assert paths.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0).ifindex == topo.up1
    # the cached answers must go when forwarding is turned off (netconf notifications)
    topo.sysctl("net.ipv4.conf.pft-lan.forwarding=0")
    with pytest.raises(NoPath, match="forwarding disabled"):
        paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    topo.sysctl("net.ipv6.conf.all.forwarding=0")
    with pytest.raises(NoPath, match="IPv6 forwarding is disabled"):
        paths.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=0)
    topo.sysctl("net.ipv4.conf.pft-lan.forwarding=1")
    # strict reverse-path filter: a remote source arriving on the LAN side is refused
    topo.sysctl("net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.pft-lan.rp_filter=1")
    with pytest.raises(NoPath, match="reverse-path"):
        paths.egress(V4, "198.19.0.99", HOST4, iif=topo.lan, mark=0)


def test_link_down(topo: Topo, paths: P.RtPaths, watcher: P.PathWatcher) -> None:
    topo.ping(GW1_4)
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1
    # carrier loss (the peer goes down): IPv4 keeps the route, the device has no carrier
    topo.ip("link set pft-gw1 down", ns=topo.gw1)
    changes, _ = _wait_changes(watcher, lambda c: c == ("link", topo.up1, None), 1.0)
    assert ("link", topo.up1, None) in changes
    with pytest.raises(NoPath, match="pft-up1 has no carrier"):
        paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    topo.ip("link set pft-gw1 up", ns=topo.gw1)
    # administrative down on the router: the kernel flushes the routes through it
    topo.ip("link set pft-up1 down")
    with pytest.raises(NoPath, match="no route|is down"):
        paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)


# ---------------------------------------------------------------------------
# policy routing and MTU


def test_policy_routing(topo: Topo, paths: P.RtPaths) -> None:
    for a in (GW1_4, GW2_4, GW2_6):
        topo.ping(a)
    gw2_mac = topo.mac(topo.gw2, "pft-gw2")
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=1).ifindex == topo.up1
    # rules added after a cached answer: rule notifications drop it
    topo.ip("rule add fwmark 1 table 100")
    by_mark = paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=1)
    assert (by_mark.ifindex, by_mark.dmac) == (topo.up2, gw2_mac)
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1
    topo.ip("-6 rule add fwmark 1 table 100")
    assert paths.egress(V6, HOST6, REMOTE6, iif=topo.lan, mark=1).ifindex == topo.up2

    topo.ip("rule add iif pft-lan table 100")
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up2
    # the same destination arriving elsewhere still uses the main table
    assert paths.egress(V4, "198.19.0.20", REMOTE4, iif=topo.up1, mark=0).ifindex == topo.up1
    topo.ip("rule del iif pft-lan table 100")

    topo.ip("rule add from 198.18.10.128/25 table 100")
    assert paths.egress(V4, "198.18.10.200", REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up2
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1


def test_route_mtu_and_device_mtu(topo: Topo, paths: P.RtPaths) -> None:
    topo.ping(GW1_4)
    topo.ip(f"route add 198.19.7.0/24 via {GW1_4} mtu 1400")
    assert paths.egress(V4, HOST4, "198.19.7.1", iif=topo.lan, mark=0).mtu == 1400
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).mtu == 1500
    topo.ip("link set pft-up1 mtu 1450")  # a link notification drops the cached device facts
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).mtu == 1450
    assert paths.egress(V4, HOST4, "198.19.7.1", iif=topo.lan, mark=0).mtu == 1400
    topo.ip(f"route replace 198.19.7.0/24 via {GW1_4} mtu 9000")  # larger than the device's
    assert paths.egress(V4, HOST4, "198.19.7.1", iif=topo.lan, mark=0).mtu == 1450
    topo.ping(GW1_6)
    topo.ip(f"-6 route add 2001:2:0:97::/64 via {GW1_6} mtu 1380")
    assert paths.egress(V6, HOST6, "2001:2:0:97::1", iif=topo.lan, mark=0).mtu == 1380


# ---------------------------------------------------------------------------
# changes


def test_route_replace_is_reported_and_followed(topo: Topo, paths: P.RtPaths,
                                                watcher: P.PathWatcher) -> None:
    topo.ping(GW1_4)
    topo.ping(GW2_4)
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).ifindex == topo.up1
    while watcher.poll(0):  # what setup left behind
        pass
    t0 = time.perf_counter()
    proc = subprocess.Popen(["ip", "-n", topo.r, "route", "replace", "default", "via", GW2_4])
    want = ("route", topo.up2, "0.0.0.0/0")
    changes, _ = _wait_changes(watcher, lambda c: c == want, 0.1)
    took = time.perf_counter() - t0  # from starting the command, its fork/exec included
    assert proc.wait(5) == 0
    assert want in changes, changes
    assert took < 0.1
    out = paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0)
    assert (out.ifindex, out.dmac) == (topo.up2, topo.mac(topo.gw2, "pft-gw2"))
    print(f"\nroute change reported {took * 1e3:.1f} ms after starting `ip route replace`")


def test_neighbour_mac_change_is_reported_and_followed(topo: Topo, paths: P.RtPaths,
                                                       watcher: P.PathWatcher) -> None:
    topo.ping(GW1_4)
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).dmac == topo.mac(topo.gw1, "pft-gw1")
    while watcher.poll(0):
        pass
    # permanent: an ARP from gw1 in the meantime must not put the real MAC back
    topo.ip(f"neigh replace {GW1_4} dev pft-up1 lladdr {NEW_MAC} nud permanent")
    changes, took = _wait_changes(watcher, lambda c: c == ("neigh", topo.up1, GW1_4), 0.1)
    assert ("neigh", topo.up1, GW1_4) in changes and took < 0.1
    assert paths.egress(V4, HOST4, REMOTE4, iif=topo.lan, mark=0).dmac == _mac(NEW_MAC)
    # a state change with the same MAC is not news
    topo.ip(f"neigh replace {GW1_4} dev pft-up1 lladdr {NEW_MAC} nud reachable")
    assert _wait_changes(watcher, lambda c: c[0] == "neigh", 0.1)[0] == []
    # and the listener form of the same report
    topo.ip(f"neigh replace {GW1_4} dev pft-up1 lladdr 02:00:5e:10:00:43 nud permanent")
    heard: list[tuple[str, int]] = []
    assert watcher.notify(lambda kind, ifindex: heard.append((kind, ifindex)), 0.5) >= 1
    assert ("neigh", topo.up1) in heard


def test_watcher_reports_rules_and_deletions(topo: Topo, watcher: P.PathWatcher) -> None:
    while watcher.poll(0):
        pass
    topo.ip("rule add fwmark 5 table 100")
    assert ("rule", 0, None) in _wait_changes(watcher, lambda c: c[0] == "rule", 0.5)[0]
    topo.ip("-6 route add 2001:2:0:98::/64 via 2001:2:0:2::2")
    want = ("route", topo.up2, "2001:2:0:98::/64")
    assert want in _wait_changes(watcher, lambda c: c == want, 0.5)[0]
    topo.ip("neigh add 198.18.2.9 dev pft-up2 lladdr 02:00:5e:10:00:09 nud permanent")
    want = ("neigh", topo.up2, "198.18.2.9")
    assert want in _wait_changes(watcher, lambda c: c == want, 0.5)[0]
    topo.ip("neigh del 198.18.2.9 dev pft-up2")
    assert want in _wait_changes(watcher, lambda c: c == want, 0.5)[0]


# ---------------------------------------------------------------------------
# device_of, mac_of, cost


def test_device_of_and_mac_of(topo: Topo, paths: P.RtPaths) -> None:
    assert paths.device_of(V4, HOST4, mark=0) == topo.lan
    assert paths.device_of(V6, HOST6, mark=0) == topo.lan
    assert paths.device_of(V4, REMOTE4, mark=0) == topo.up1
    topo.ip("rule add fwmark 1 table 100")
    assert paths.device_of(V4, REMOTE4, mark=1) == topo.up2
    with pytest.raises(NoPath, match="local"):
        paths.device_of(V4, "198.18.1.1", mark=0)
    assert paths.mac_of(topo.up2) == topo.mac(topo.r, "pft-up2")
    topo.ip(f"link set pft-up2 address {NEW_MAC}")
    assert paths.mac_of(topo.up2) == _mac(NEW_MAC)


def _median_us(fn, n: int = 1000) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def test_egress_latency(topo: Topo, paths: P.RtPaths, capsys: pytest.CaptureFixture[str]) -> None:
    topo.ping(GW1_4)
    topo.ping(GW1_6)
    lan = topo.lan
    with netns.inside(topo.r):
        cold = P.RtPaths(cache=False)
    try:
        hit4 = _median_us(lambda i: paths.egress(V4, HOST4, REMOTE4, iif=lan, mark=0))
        hit6 = _median_us(lambda i: paths.egress(V6, HOST6, REMOTE6, iif=lan, mark=0))
        # a new (src, dst) pair each call: route lookup in the kernel, neighbour and link cached
        miss4 = _median_us(lambda i: paths.egress(V4, f"198.18.10.{2 + i % 250}",
                                                  f"198.19.{i // 250}.{i % 250}", iif=lan, mark=0))
        lookups = paths.lookups
        cold4 = _median_us(lambda i: cold.egress(V4, HOST4, REMOTE4, iif=lan, mark=0), 300)
        cold6 = _median_us(lambda i: cold.egress(V6, HOST6, REMOTE6, iif=lan, mark=0), 300)
        # the same route lookup through pyroute2's IPRoute: why the hot path does not use it
        with netns.inside(topo.r):
            from pyroute2 import IPRoute
            ipr = IPRoute(groups=0)
        try:
            via_pyroute2 = _median_us(lambda i: ipr.route("get", dst=REMOTE4, src=HOST4, iif=lan), 300)
        finally:
            ipr.close()
    finally:
        cold.close()
    assert lookups >= 1000  # the miss series really went to the kernel
    with capsys.disabled():
        print(f"\negress() median: cached IPv4 {hit4:.1f} us, IPv6 {hit6:.1f} us (1000 calls); "
              f"route miss IPv4 {miss4:.1f} us (1000 new src/dst pairs); nothing cached (route + "
              f"neighbour + pyroute2 link get) IPv4 {cold4:.1f} us, IPv6 {cold6:.1f} us; "
              f"pyroute2 IPRoute.route('get') alone {via_pyroute2:.1f} us")
    # 20,000 connections/s need two paths each: a cache hit must be well under 25 us
    assert hit4 < 25


# ---------------------------------------------------------------------------
# pure decoding with fake messages (no kernel: see the module docstring)


def _nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), atype | (0x8000 if nested else 0))
    return head + payload + b"\0" * (-(4 + len(payload)) & 3)


def _nlmsg(mtype: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body


def _route_msg(oif: int, *, rtype: int = P.RTN_UNICAST, family: int = V4, gateway: str | None = None,
               mtu: int = 0, via: tuple[int, str] | None = None, encap: int = 0) -> bytes:
    alen = 4 if family == V4 else 16
    body = struct.pack("=BBBBBBBBI", family, alen * 8, 0, 0, 254, 0, 0, rtype, 0)
    body += _nla(P.RTA_TABLE, struct.pack("=I", 254))
    body += _nla(P.RTA_DST, b"\xc6\x13\x00\x0a" if family == V4 else socket.inet_pton(V6, REMOTE6))
    body += _nla(P.RTA_OIF, struct.pack("=I", oif))
    if gateway:
        body += _nla(P.RTA_GATEWAY, socket.inet_pton(family, gateway))
    if via:
        body += _nla(P.RTA_VIA, struct.pack("=H", via[0]) + socket.inet_pton(via[0], via[1]))
    if mtu:
        body += _nla(P.RTA_METRICS, _nla(P.RTAX_MTU, struct.pack("=I", mtu)), nested=True)
    if encap:
        body += _nla(P.RTA_ENCAP_TYPE, struct.pack("=H", encap))
    return _nlmsg(P.RTM_NEWROUTE, body)


def _neigh_msg(ifindex: int, addr: str, state: int, lladdr: str | None, family: int = V4) -> bytes:
    body = struct.pack("=BxxxiHBB", family, ifindex, state, 0, 1)
    body += _nla(P.NDA_DST, socket.inet_pton(family, addr))
    if lladdr:
        body += _nla(P.NDA_LLADDR, _mac(lladdr))
    return _nlmsg(P.RTM_NEWNEIGH, body)


def _link_msg(index: int, name: str, mac: str | None, *, mtu: int = 1500, arptype: int = 1,
              flags: int = 0x11043, kind: str | None = None, link: int | None = None,
              vlan: tuple[int, int] | None = None, qos: bool = False,
              netnsid: int | None = None) -> ifinfmsg:
    """An RTM_NEWLINK message in rtnl_fill_ifinfo's layout, decoded by pyroute2 like RtPaths' own."""
    attrs = _nla(3, name.encode() + b"\0") + _nla(4, struct.pack("=I", mtu))
    if mac:
        attrs += _nla(1, _mac(mac))
    if link is not None:
        attrs += _nla(5, struct.pack("=I", link))
    if netnsid is not None:
        attrs += _nla(37, struct.pack("=i", netnsid))  # IFLA_LINK_NETNSID
    if kind:
        info = _nla(1, kind.encode() + b"\0")
        if vlan:
            vid, proto = vlan
            # vlan_fill_info: IFLA_VLAN_PROTOCOL (be16), IFLA_VLAN_ID, IFLA_VLAN_FLAGS,
            # then the QoS maps with only their non-zero entries
            data = _nla(5, struct.pack("!H", proto)) + _nla(1, struct.pack("=H", vid))
            data += _nla(2, struct.pack("=II", 1, 0xFFFFFFFF))
            if qos:
                data += _nla(3, _nla(1, struct.pack("=II", 5, 3)), nested=True)
            info += _nla(2, data, nested=True)
        attrs += _nla(18, info, nested=True)
    body = struct.pack("=BxHiII", 0, arptype, index, flags, 0) + attrs
    msg = ifinfmsg(_nlmsg(16, body))
    msg.decode()
    return msg


ETH0 = _link_msg(2, "eth0", "02:00:00:00:00:02")
GW_MAC = "02:00:00:00:00:99"


def _lowest(eg: Egress) -> Egress:
    """The egress at the last layer (frames handed to the real port, every header written)."""
    return egress_at(eg, eg.layers[-1])


def test_decode_plain_ethernet() -> None:
    out = P.decode_egress(V4, REMOTE4, _route_msg(2, gateway="198.18.1.2", mtu=1400), {2: ETH0},
                          _neigh_msg(2, "198.18.1.2", P.NUD_STALE, GW_MAC))
    assert out == Egress(ifindex=2, ifname="eth0", smac=_mac("02:00:00:00:00:02"), dmac=_mac(GW_MAC),
                         mtu=1400, layers=(Layer(2, "eth0"),))
    assert _lowest(out) == Egress(ifindex=2, ifname="eth0", smac=_mac("02:00:00:00:00:02"),
                                  dmac=_mac(GW_MAC), mtu=1400)


def test_decode_vlan() -> None:
    vlan = _link_msg(10, "eth0.100", "02:00:00:00:01:00", mtu=1496, kind="vlan", link=2,
                     vlan=(100, P.ETH_P_8021Q))
    out = P.decode_egress(V4, REMOTE4, _route_msg(10, gateway="198.18.1.2"), {2: ETH0, 10: vlan},
                          _neigh_msg(10, "198.18.1.2", P.NUD_REACHABLE, GW_MAC))
    assert out.layers == (Layer(10, "eth0.100"), Layer(2, "eth0", vlan_outer_tci=100))
    assert (out.ifindex, out.ifname, out.vlan_outer_tci) == (10, "eth0.100", None)  # the route device
    assert _lowest(out) == Egress(ifindex=2, ifname="eth0", smac=_mac("02:00:00:00:01:00"), dmac=_mac(GW_MAC),
                                  mtu=1496, vlan_outer_tci=100, vlan_outer_tpid=0x8100, lower_ifindex=2)


def test_decode_qinq() -> None:
    svlan = _link_msg(11, "eth0.300", "02:00:00:00:01:01", mtu=1496, kind="vlan", link=2,
                      vlan=(300, P.ETH_P_8021AD))
    cvlan = _link_msg(12, "eth0.300.20", "02:00:00:00:01:02", mtu=1492, kind="vlan", link=11,
                      vlan=(20, P.ETH_P_8021Q))
    links = {2: ETH0, 11: svlan, 12: cvlan}
    out = P.decode_egress(V6, REMOTE6, _route_msg(12, family=V6), links,
                          _neigh_msg(12, REMOTE6, P.NUD_PERMANENT, GW_MAC, family=V6))
    assert out.layers == (Layer(12, "eth0.300.20"), Layer(11, "eth0.300", vlan_outer_tci=20),
                          Layer(2, "eth0", vlan_outer_tci=300, vlan_outer_tpid=0x88A8, vlan_inner_tci=20))
    assert _lowest(out) == Egress(ifindex=2, ifname="eth0", smac=_mac("02:00:00:00:01:02"),
                                  dmac=_mac(GW_MAC), mtu=1492, vlan_outer_tci=300, vlan_outer_tpid=0x88A8,
                                  vlan_inner_tci=20, lower_ifindex=2)
    # an 802.1ad tag inside, or a third tag, cannot be written on the real port (a managed
    # device higher up can still take the frames)
    neigh = _neigh_msg(12, REMOTE6, P.NUD_PERMANENT, GW_MAC, family=V6)
    bad_inner = _link_msg(12, "eth0.300.20", "02:00:00:00:01:02", kind="vlan", link=11,
                          vlan=(20, P.ETH_P_8021AD))
    out = P.decode_egress(V6, REMOTE6, _route_msg(12, family=V6), {**links, 12: bad_inner}, neigh)
    assert egress_at(out, out.layers[1]).vlan_outer_tpid == 0x88A8
    with pytest.raises(NoPath, match="only 802.1Q inner") as info:
        _lowest(out)
    assert info.value.code == VLAN_UNSUPPORTED
    third = _link_msg(13, "x", "02:00:00:00:01:03", kind="vlan", link=12, vlan=(5, P.ETH_P_8021Q))
    neigh = _neigh_msg(13, REMOTE6, P.NUD_PERMANENT, GW_MAC, family=V6)
    out = P.decode_egress(V6, REMOTE6, _route_msg(13, family=V6), {**links, 13: third}, neigh)
    with pytest.raises(NoPath, match="more than two"):
        _lowest(out)


def test_decode_refusals() -> None:
    vlan_qos = _link_msg(10, "eth0.100", "02:00:00:00:01:00", kind="vlan", link=2,
                         vlan=(100, P.ETH_P_8021Q), qos=True)
    out = P.decode_egress(V4, REMOTE4, _route_msg(10), {2: ETH0, 10: vlan_qos},
                          _neigh_msg(10, REMOTE4, P.NUD_REACHABLE, GW_MAC))
    assert egress_at(out, out.layers[0]).ifindex == 10  # the VLAN device itself writes its PCP
    with pytest.raises(NoPath, match="egress-qos-map"):
        _lowest(out)
    vlan_elsewhere = _link_msg(10, "eth0.100", "02:00:00:00:01:00", kind="vlan", link=2,
                               vlan=(100, P.ETH_P_8021Q), netnsid=0)
    with pytest.raises(NoPath, match="another network namespace"):
        P.decode_egress(V4, REMOTE4, _route_msg(10), {2: ETH0, 10: vlan_elsewhere}, None)
    ppp = _link_msg(20, "ppp0", None, arptype=P.ARPHRD_PPP, kind="ppp", flags=0x10051)
    with pytest.raises(NoPath, match="no PPPoE session") as info:
        P.decode_egress(V4, REMOTE4, _route_msg(20), {20: ppp}, None)
    assert info.value.code == PPPOE_NO_SESSION
    tun = _link_msg(21, "tun0", None, arptype=65534, kind="tun")
    with pytest.raises(NoPath, match="not Ethernet"):
        P.decode_egress(V4, REMOTE4, _route_msg(21), {21: tun}, None)
    down = _link_msg(2, "eth0", "02:00:00:00:00:02", flags=0x1002)
    with pytest.raises(NoPath, match="eth0 is down"):
        P.decode_egress(V4, REMOTE4, _route_msg(2), {2: down}, None)
    with pytest.raises(NoPath, match="gone"):
        P.decode_egress(V4, REMOTE4, _route_msg(7), {2: ETH0}, None)
    with pytest.raises(NoPath, match="lightweight-tunnel"):
        P.decode_egress(V4, REMOTE4, _route_msg(2, encap=1), {2: ETH0}, None)
    for rtype, word in ((P.RTN_BLACKHOLE, "blackhole"), (P.RTN_LOCAL, "local"),
                        (P.RTN_BROADCAST, "broadcast"), (P.RTN_UNREACHABLE, "unreachable")):
        with pytest.raises(NoPath, match=word):
            P.decode_egress(V4, REMOTE4, _route_msg(2, rtype=rtype), {2: ETH0}, None)


def test_decode_neighbour_states() -> None:
    route = _route_msg(2, gateway="198.18.1.2")
    for state in (P.NUD_REACHABLE, P.NUD_STALE, P.NUD_DELAY, P.NUD_PROBE, P.NUD_PERMANENT, P.NUD_NOARP):
        out = P.decode_egress(V4, REMOTE4, route, {2: ETH0}, _neigh_msg(2, "198.18.1.2", state, GW_MAC))
        assert out.dmac == _mac(GW_MAC)
    for state, word in ((P.NUD_INCOMPLETE, "INCOMPLETE"), (P.NUD_FAILED, "FAILED"), (0, "NONE")):
        with pytest.raises(NotYet, match=word):
            P.decode_egress(V4, REMOTE4, route, {2: ETH0}, _neigh_msg(2, "198.18.1.2", state, None))
    with pytest.raises(NotYet, match="not known"):
        P.decode_egress(V4, REMOTE4, route, {2: ETH0}, None)


def test_decode_ipv6_next_hop_for_ipv4_route() -> None:
    """RTA_VIA (RFC 5549 style): the next hop, and so the neighbour entry, is IPv6."""
    route = P.parse_route(_route_msg(2, via=(V6, "fe80::1")))
    plan = P.plan_egress(V4, socket.inet_pton(V4, REMOTE4), route, {2: P.link_from_msg(ETH0)}.get)
    assert (plan.nh_family, plan.nkey) == (V6, (2, "fe80::1"))


def test_watcher_filters_neighbour_churn_and_fdb() -> None:
    w = P.PathWatcher()
    try:
        out: list[P.Change] = []
        w._decode(_neigh_msg(3, "198.18.1.2", P.NUD_REACHABLE, GW_MAC), out)
        w._decode(_neigh_msg(3, "198.18.1.2", P.NUD_STALE, GW_MAC), out)  # same MAC: no news
        w._decode(_neigh_msg(3, "198.18.1.2", P.NUD_STALE, NEW_MAC), out)
        w._decode(_neigh_msg(3, "198.18.1.2", P.NUD_FAILED, None), out)
        fdb = struct.pack("=BxxxiHBB", 7, 3, P.NUD_REACHABLE, 2, 0) + _nla(P.NDA_LLADDR, _mac(GW_MAC))
        w._decode(_nlmsg(P.RTM_NEWNEIGH, fdb), out)  # AF_BRIDGE forwarding entry: ignored
        assert out == [("neigh", 3, "198.18.1.2")] * 3

        out = []
        vlan = _link_msg(10, "eth0.100", "02:00:00:00:01:00", kind="vlan", link=2, vlan=(100, 0x8100))
        w._decode(vlan.data, out)
        w._decode(vlan.data, out)  # the same facts again (a statistics update): no news
        w._decode(_link_msg(10, "eth0.100", "02:00:00:00:01:00", mtu=1400, kind="vlan", link=2,
                            vlan=(100, 0x8100)).data, out)
        # a VLAN's change is reported under its lower device too (Egress.ifindex names it)
        assert out == [("link", 10, None), ("link", 2, None)] * 2
    finally:
        w.close()
