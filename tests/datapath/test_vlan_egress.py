"""VLAN egress on TC, on the wire: GSO super-packets gain their tags.

The TC hook hands egress VLAN tags to the kernel (bpf_skb_vlan_push) instead of
writing them into the frame data, because a GSO super-packet can gain a tag
only that way (the packet table's test runs cannot show skb metadata). Here a
real sender makes UDP GSO super-packets, pyflow's TC hook forwards them with a
tag (802.1Q, or 802.1ad outer + 802.1Q inner), and a packet socket on the far
side reads every frame with its tag (PACKET_AUXDATA: the receiving stack moves
the outer tag into metadata, as every Linux receiver does).

Two egress set-ups, because the kernel inserts the tag at two places:
- offloads on (veth's default): the super-packet and its metadata tag cross the
  veth as they are, as towards a NIC with VLAN insertion and segmentation;
- offloads off (tx checksum, segmentation and VLAN insertion off on the egress):
  the kernel cuts the segments and writes the tags into each one in software,
  with full checksums, which this test verifies.
The host kernel has no 802.1Q module, so the far side has no VLAN device; the
kernel lab's side-by-side runs TCP through a real 802.1Q uplink.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.datapath import abi
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.pins import remove_pin_dir
from tests.support.datapath import line

pytestmark = pytest.mark.root

SOL_UDP, UDP_SEGMENT = 17, 103
SOL_PACKET, PACKET_AUXDATA, PACKET_OUTGOING = 263, 8, 4
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40
ETH_P_ALL, ETH_P_8021Q, ETH_P_8021AD = 0x0003, 0x8100, 0x88A8
GSO_SIZE, SEGS, SENDS = 1000, 4, 20
SPORT, DPORT = 40000, 5000
OUTER_TCI = (3 << 13) | 42  # priority 3, VLAN 42
INNER_TCI = 7
_pins = itertools.count()


@pytest.fixture(scope="module")
def topo():
    """h1 (198.18.1.2) -- pft-r1 [r] pft-r2 -- h2, pyflow in TC mode on pft-r1, the
    router's own forwarding off: whatever reaches h2 went through the fast path."""
    pin_dir = f"/sys/fs/bpf/pft-vlan-{os.getpid()}-{next(_pins)}"
    with line(far_side=False) as (h1, r, h2):
        with netns.inside(r):
            dp = Datapath(pin_dir)
            try:
                dp.attach("pft-r1", "tc")
                yield h1, r, h2, dp
            finally:
                dp.close()
                remove_pin_dir(pin_dir)


def _tpacket_auxdata(anc) -> tuple[int, int, int]:
    """(tp_status, tp_vlan_tci, tp_vlan_tpid) from a recvmsg's ancillary data."""
    for level, typ, val in anc:
        if level == SOL_PACKET and typ == PACKET_AUXDATA:
            status, _len, _snap, _mac, _net, tci, tpid = struct.unpack_from("IIIHHHH", val)
            return status, tci, tpid
    raise AssertionError("no PACKET_AUXDATA on a received frame")


def _is_ours(frame: bytes) -> bool:
    """A frame of the test's flow (with or without tags); h2's own IPv6 chatter is not."""
    eth = Ether(frame)
    return IP in eth and UDP in eth and eth[UDP].dport == DPORT


def _capture(ns: str, ifname: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ifname, 0))
        s.settimeout(0.5)
        return s
    return netns.call(ns, make)


def _sender(ns: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("198.18.1.2", SPORT))
        s.setsockopt(SOL_UDP, UDP_SEGMENT, GSO_SIZE)
        return s
    return netns.call(ns, make)


@pytest.mark.parametrize("offloads", ["on", "off"])
@pytest.mark.parametrize("tags", ["802.1q", "802.1ad+802.1q"])
def test_gso_superpackets_leave_tagged(topo, tags, offloads):
    h1, r, h2, dp = topo
    netns.run(r, f"ethtool -K pft-r2 tx {offloads} txvlan {offloads} tx-vlan-stag-hw-insert {offloads}")
    qinq = tags == "802.1ad+802.1q"
    key = abi.FlowKey(netns.ifindex(r, "pft-r1"), abi.PROTO_UDP, "198.18.1.2", "198.18.2.2", SPORT, DPORT)
    act = abi.FlowAction(out_ifindex=netns.ifindex(r, "pft-r2"), tx_port=0, mtu=1500,
                         in_mac=netns.mac(r, "pft-r1"), dmac=netns.mac(h2, "pft-h2"),
                         smac=netns.mac(r, "pft-r2"), nat_saddr="198.18.2.1", nat_sport=41000,
                         vlan_outer_tci=OUTER_TCI, vlan_outer_tpid=ETH_P_8021AD if qinq else ETH_P_8021Q,
                         vlan_inner_tci=INNER_TCI if qinq else None)
    k = dp.flows.Key.from_buffer_copy(abi.key_bytes(key))
    dp.flows[k] = dp.flows.Leaf.from_buffer_copy(abi.value_bytes(act, key))
    before = dp.reason_counts()

    cap = _capture(h2, "pft-h2")
    tx = _sender(h1)
    sent = [bytes((i * 31 + j) & 0xFF for j in range(GSO_SIZE * SEGS)) for i in range(SENDS)]
    frames = []
    try:
        for p in sent:
            tx.sendto(p, ("198.18.2.2", DPORT))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                data, anc, _, (_, _, pkttype, *_) = cap.recvmsg(65536, socket.CMSG_SPACE(64))
            except TimeoutError:
                break
            if pkttype != PACKET_OUTGOING and _is_ours(data):
                frames.append((data, _tpacket_auxdata(anc)))
    finally:
        tx.close()
        cap.close()
    after = dp.reason_counts()
    flow = dp.flows[k]
    del dp.flows[k]

    skbs = after["forwarded"][0] - before["forwarded"][0]
    assert flow.counters.packets == SENDS * SEGS, f"segments counted: {flow.counters.packets}"
    assert skbs < SENDS * SEGS, f"the hook saw {skbs} skbs for {SENDS * SEGS} segments: no GSO to test"

    payload = b""
    for data, (status, tci, tpid) in frames:
        assert status & TP_STATUS_VLAN_VALID and status & TP_STATUS_VLAN_TPID_VALID, hex(status)
        assert (tci, tpid) == (OUTER_TCI, ETH_P_8021AD if qinq else ETH_P_8021Q)
        eth = Ether(data)
        if qinq:  # the inner tag stays in the data
            assert (eth.type, eth.payload.vlan, eth.payload.prio) == (ETH_P_8021Q, INNER_TCI, 0)
        ip = eth[IP]
        assert (ip.src, ip.dst, ip.ttl, ip[UDP].sport, ip[UDP].dport) == \
            ("198.18.2.1", "198.18.2.2", 63, 41000, DPORT)
        if offloads == "off":
            # software segmentation: every frame a single segment with full checksums
            assert len(ip[UDP].payload) == GSO_SIZE
            rebuilt = IP(bytes(ip))
            del rebuilt.chksum
            del rebuilt[UDP].chksum
            rebuilt = IP(bytes(rebuilt))
            assert (rebuilt.chksum, rebuilt[UDP].chksum) == (ip.chksum, ip[UDP].chksum)
        payload += bytes(ip[UDP].payload)
    assert payload == b"".join(sent), f"{len(frames)} frames, {len(payload)} of {len(b''.join(sent))} bytes"
    if offloads == "off":
        assert len(frames) == SENDS * SEGS
