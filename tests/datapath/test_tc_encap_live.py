"""TC with real skbs: PPPoE egress of GSO super-packets through an L3 device, and tags the
receiving stack moved into skb metadata.

BPF_PROG_TEST_RUN (the packet table) cannot show either: it does not send what a
program redirects, and it cannot set skb->vlan_tci. Here a real sender drives pyflow's
TC hook on a veth of a router namespace (the router's own forwarding off: what leaves
went through the fast path).

1. GSO over PPPoE. A flow that must leave in a PPPoE session names the session's PPP
   device (FlowAction.ppp_ifindex). The host kernel has no PPP, so a TUN device stands in
   for it: like a PPP device it is an L3 device without segmentation offload, so a
   redirect to it drops the mac header and the kernel cuts the super-packet into
   segments before the device sees them. UDP GSO super-packets from the sender must come
   out of the TUN device as single datagrams of gso_size bytes with NAT, TTL - 1 and full
   checksums; plain datagrams of the same flow must leave on the wire port with the PPPoE
   header pushed by the hook. (The PPPoE channel's own encapsulation of each segment is
   run in the kernel lab, tests/lab/guest/test_pppoe_gso.py.)
2. Tags as metadata. Every Linux receiver moves a frame's outer 802.1Q/802.1ad tag into
   skb metadata before TC ingress (skb_vlan_untag), so on a live port TC always finds the
   outer tag there, the inner one (QinQ) in the data. Frames sent with tags must match
   the flows holding those VLAN ids (and PPPoE session), and near misses must not.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.ppp import PPP, PPPoE

from pyflow.datapath import abi
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.pins import remove_pin_dir
from tests.support.datapath import line
from tests.support.packets import payload, pppoe, vlan

pytestmark = pytest.mark.root

SOL_UDP, UDP_SEGMENT = 17, 103
SOL_PACKET, PACKET_AUXDATA, PACKET_OUTGOING = 263, 8, 4
TP_STATUS_VLAN_VALID = 0x10
ETH_P_ALL = 0x0003
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
GSO_SIZE, SEGS, SENDS = 1000, 4, 20
SPORT, DPORT = 40000, 5000
SID = 0x1234
_pins = itertools.count()


@pytest.fixture(scope="module")
def topo():
    """h1 -- pft-r1 [r, pyflow TC] pft-r2 -- h2, and in r a TUN device pft-ppp0 (its fd
    reads what is sent to it)."""
    pin_dir = f"/sys/fs/bpf/pft-encap-{os.getpid()}-{next(_pins)}"
    with line(far_side=False) as (h1, r, h2):
        tun = netns.call(r, _open_tun, "pft-ppp0")
        try:
            netns.run(r, "ip link set pft-ppp0 up mtu 1492")
            with netns.inside(r):
                dp = Datapath(pin_dir)
                try:
                    dp.attach("pft-r1", "tc")
                    yield h1, r, h2, dp, tun
                finally:
                    dp.close()
                    remove_pin_dir(pin_dir)
        finally:
            os.close(tun)  # a TUN device without persist goes with its last fd


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _install(dp: Datapath, key: abi.FlowKey, act: abi.FlowAction):
    k = dp.flows.Key.from_buffer_copy(abi.key_bytes(key))
    dp.flows[k] = dp.flows.Leaf.from_buffer_copy(abi.value_bytes(act, key))
    return k


def _capture(ns: str, ifname: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ifname, 0))
        s.settimeout(0.3)
        return s
    return netns.call(ns, make)


def _received(cap: socket.socket, want, limit: float = 3.0) -> list[tuple[bytes, int | None]]:
    """Frames for which want(frame) holds, with the VLAN TCI the receiver found in metadata."""
    out = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data, anc, _, (_, _, pkttype, *_) = cap.recvmsg(65536, socket.CMSG_SPACE(64))
        except TimeoutError:
            break
        if pkttype == PACKET_OUTGOING or not want(data):
            continue
        tci = None
        for level, typ, val in anc:
            if level == SOL_PACKET and typ == PACKET_AUXDATA:
                status, _l, _s, _m, _n, vtci, _tpid = struct.unpack_from("IIIHHHH", val)
                tci = vtci if status & TP_STATUS_VLAN_VALID else None
        out.append((data, tci))
    return out


def _checksums_right(ip: IP) -> bool:
    fresh = IP(bytes(ip))
    del fresh.chksum
    del fresh[UDP].chksum
    fresh = IP(bytes(fresh))
    return (fresh.chksum, fresh[UDP].chksum) == (ip.chksum, ip[UDP].chksum)


def test_gso_pppoe_egress_goes_through_the_ppp_device(topo):
    h1, r, h2, dp, tun = topo
    key = abi.FlowKey(netns.ifindex(r, "pft-r1"), abi.PROTO_UDP, "198.18.1.2", "198.18.2.2", SPORT, DPORT)
    act = abi.FlowAction(out_ifindex=netns.ifindex(r, "pft-r2"), tx_port=0, mtu=1492,
                         in_mac=netns.mac(r, "pft-r1"), dmac=netns.mac(h2, "pft-h2"),
                         smac=netns.mac(r, "pft-r2"), nat_saddr="198.18.2.1", nat_sport=41000,
                         pppoe_sid=SID, ppp_ifindex=netns.ifindex(r, "pft-ppp0"))
    k = _install(dp, key, act)
    while True:  # whatever the TUN device got while it came up (IPv6 router solicitations)
        try:
            os.read(tun, 65536)
        except BlockingIOError:
            break
    before = dp.reason_counts()
    cap = _capture(h2, "pft-h2")

    def sender(gso: bool) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("198.18.1.2", SPORT))
        if gso:
            s.setsockopt(SOL_UDP, UDP_SEGMENT, GSO_SIZE)
        return s

    supers = [bytes((i * 13 + j) & 0xFF for j in range(GSO_SIZE * SEGS)) for i in range(SENDS)]
    singles = [bytes((i * 5 + j) & 0xFF for j in range(300)) for i in range(5)]
    try:
        tx = netns.call(h1, sender, True)
        try:
            for p in supers:
                tx.sendto(p, ("198.18.2.2", DPORT))
        finally:
            tx.close()
        segments = []
        deadline = time.monotonic() + 5
        while len(segments) < SENDS * SEGS and time.monotonic() < deadline:
            try:
                pkt = os.read(tun, 65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if pkt[0] >> 4 == 4 and IP(pkt).haslayer(UDP) and IP(pkt)[UDP].dport == DPORT:
                segments.append(IP(pkt))
        mid = dp.reason_counts()
        tx = netns.call(h1, sender, False)
        try:
            for p in singles:
                tx.sendto(p, ("198.18.2.2", DPORT))
        finally:
            tx.close()
        wire = _received(cap, lambda f: Ether(f).type == 0x8864)
    finally:
        cap.close()
    flow = dp.flows[k]
    del dp.flows[k]

    skbs = mid["forwarded"][0] - before["forwarded"][0]
    assert skbs < SENDS * SEGS, f"the hook saw {skbs} skbs for {SENDS * SEGS} segments: no GSO to test"
    assert mid["l2_rewrite_failed"][0] == before["l2_rewrite_failed"][0]
    # every segment came out of the L3 device: no mac header, cut to gso_size, rewritten
    assert len(segments) == SENDS * SEGS, f"{len(segments)} datagrams out of the TUN device"
    for ip in segments:
        assert (ip.src, ip.dst, ip.ttl, ip[UDP].sport, len(ip[UDP].payload)) == \
            ("198.18.2.1", "198.18.2.2", 63, 41000, GSO_SIZE)
        assert _checksums_right(ip)
    assert b"".join(bytes(ip[UDP].payload) for ip in segments) == b"".join(supers)
    # the plain datagrams left on the wire port with the PPPoE header pushed by the hook
    assert len(wire) == len(singles)
    for (frame, _tci), sent in zip(wire, singles, strict=True):
        eth = Ether(frame)
        assert (eth[PPPoE].sessionid, eth[PPPoE].len, eth[PPP].proto) == (SID, 28 + len(sent) + 2, 0x0021)
        assert bytes(eth[UDP].payload) == sent and eth[IP].src == "198.18.2.1"
    assert flow.counters.packets == SENDS * SEGS + len(singles)


def _send_frames(ns: str, ifname: str, frames: list[bytes]) -> None:
    def send() -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((ifname, 0))
            for f in frames:
                s.send(f)
        finally:
            s.close()
    netns.call(ns, send)


@pytest.mark.parametrize("case", ["802.1q", "802.1ad+802.1q", "802.1q+pppoe", "802.1ad+802.1q+pppoe"])
def test_tags_in_skb_metadata_match_their_flow(topo, case):
    """The outer tag reaches TC as skb metadata (the inner one, and PPPoE, in the data): the
    frame hits the flow with its VLAN ids, outer tag protocol and session and leaves
    untagged; the same frame with another outer VLAN id, the same id in the other tag
    protocol (802.1Q <-> 802.1ad, skb->vlan_proto), a priority tag (VLAN id 0) as outer tag,
    or another session goes to the kernel under the right reason."""
    h1, r, h2, dp, _tun = topo
    outer_tpid = abi.ETH_P_8021AD if case.startswith("802.1ad") else abi.ETH_P_8021Q
    inner = 10 if "+802.1q" in case else 0
    sid = SID if "pppoe" in case else 0
    r1 = netns.mac(r, "pft-r1")
    l3 = IP(src="198.18.1.2", dst="198.18.2.2", ttl=64) / UDP(sport=SPORT + 1, dport=DPORT) / payload(64)

    other_tpid = abi.ETH_P_8021Q if outer_tpid == abi.ETH_P_8021AD else abi.ETH_P_8021AD

    def frame(outer_vid: int, session: int = sid, tpid: int = outer_tpid) -> bytes:
        f = Ether(dst=r1, src=netns.mac(h1, "pft-h1")) / vlan(outer_vid, tpid)
        if inner:
            f = f / vlan(inner)
        if session:
            f = f / pppoe(session, l3)
        return bytes(f / l3)

    key = abi.FlowKey(netns.ifindex(r, "pft-r1"), abi.PROTO_UDP, "198.18.1.2", "198.18.2.2", SPORT + 1, DPORT,
                      vlan_outer=100, vlan_inner=inner, pppoe_sid=sid, vlan_outer_tpid=outer_tpid)
    act = abi.FlowAction(out_ifindex=netns.ifindex(r, "pft-r2"), tx_port=0, mtu=1500, in_mac=r1,
                         dmac=netns.mac(h2, "pft-h2"), smac=netns.mac(r, "pft-r2"))
    k = _install(dp, key, act)
    cap = _capture(h2, "pft-h2")
    before = dp.reason_counts()
    try:
        _send_frames(h1, "pft-h1", [frame(100)])
        got = _received(cap, lambda f: Ether(f).haslayer(UDP) and Ether(f)[UDP].sport == SPORT + 1)
        mid = dp.reason_counts()
        misses = [frame(101), frame(100, tpid=other_tpid), frame(5 << 13)] + (
            [frame(100, sid + 1)] if sid else [])
        _send_frames(h1, "pft-h1", misses)
        stray = _received(cap, lambda f: Ether(f).haslayer(UDP) and Ether(f)[UDP].sport == SPORT + 1, 1.0)
        after = dp.reason_counts()
    finally:
        cap.close()
        flow = dp.flows[k]
        del dp.flows[k]

    def delta(a, b, reason):
        return a[reason][0] - b[reason][0]

    counted = {n: delta(mid, before, n) for n in mid if delta(mid, before, n)}
    assert delta(mid, before, "forwarded") == 1 and flow.counters.packets == 1, \
        f"the tagged frame did not hit its flow: {counted}"
    assert len(got) == 1
    data, tci = got[0]
    eth = Ether(data)
    assert tci is None and eth.type == 0x0800, "the frame must leave untagged, without PPPoE"
    assert (eth[IP].ttl, bytes(eth[UDP].payload)) == (63, bytes(l3[UDP].payload))
    assert stray == [], "a near miss was forwarded"
    assert delta(after, mid, "forwarded") == 0
    assert delta(after, mid, "miss") == (3 if sid else 2)
    assert delta(after, mid, "l2_unsupported") == 1  # the priority tag
