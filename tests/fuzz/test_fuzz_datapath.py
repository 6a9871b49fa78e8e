"""Datapath fuzz test: malformed and mutated frames through both hooks, judged by a model.

A few dozen base frames are built with scapy (exact hits on installed flows, with
and without NAT, untagged / VLAN / QinQ / PPPoE, plus the kernel's kind of
traffic: FIN/RST, TTL 1, misses, ARP, PPPoE discovery, options, fragments,
extension headers ...). Families of mutations derived from them with byte
operations (truncation at every byte, wrong length fields, bad versions, IPv4
options, fragments, IPv6 extension headers, VLAN/QinQ/PPPoE variants and
garbage tags, random byte flips, random garbage frames, stacks of these) run
through BPF_PROG_TEST_RUN on the XDP and the TC build; every TC run of every
seventh frame is repeated with a GSO context.

Per frame: the verdict (redirect or pass) must be the model's
(reference.py), a forwarded frame must be byte for byte the model's rewrite,
and a passed one must come back unchanged. Per family: the reason counts and
bytes in the stats map, and every flow's counters and closing flag, must equal
what the model predicted.

Reproduce: the RNG is seeded with PYFLOW_FUZZ_SEED (default SEED below) and the
family name; every failure message names seed, family, index and the frame.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pytest
from redirects import RedirectCheck
from reference import FORWARDED, Model, ipv4_header_checksum, model_flow
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, LLC, Dot1AD, Dot1Q, Dot3, Ether
from scapy.layers.ppp import PPP, PPPoE, PPPoED
from scapy.packet import Packet, Raw

from pyflow.datapath import abi
from pyflow.errors import DatapathError
from tests.support.packets import (
    CLIENT4,
    CLIENT6,
    CPORT,
    DNAT4,
    DNAT6,
    EMPTY_SLOT,
    IFINDEX,
    IN_MAC,
    NAT_PORT,
    OTHER_MAC,
    PPP_IFINDEX,
    PUB_PORT,
    PUBLIC4,
    PUBLIC6,
    ROUTER4,
    ROUTER6,
    SERVER4,
    SERVER6,
    SNAT4,
    SNAT6,
    SPORT,
    TX_SLOT,
    action,
    eth,
    key_of,
    payload,
    pppoe,
    skb_ctx,
    tcp4,
    tcp6,
    udp4,
    udp6,
    vlan,
)
from tests.support.testrun import VERDICTS, first_difference

SEED = int(os.environ.get("PYFLOW_FUZZ_SEED", "1624"))
GSO_EVERY = 7  # every 7th frame also runs on TC as a GSO super-packet
MIN_FRAMES = 100_000  # frames that must run through both hooks, over all families
SHOW_FAILURES = 8

ETH_P_8021AD = abi.ETH_P_8021AD
ETH_P_8021Q = abi.ETH_P_8021Q
_U16 = struct.Struct("!H")


# ---- base frames and the flows they hit -------------------------------------------------


@dataclass
class Layout:
    """Where a frame's headers sit, so that mutations can aim at fields. Offsets count
    from the first byte; a tag's offset is its TCI (TPID 2 bytes before, encapsulated
    type 2 after); the 2 bytes before l3 are the ethertype or the PPP protocol."""

    tags: list[int]
    pppoe: int | None
    l3: int
    fam: int | None  # 4, 6, or None for a frame that is not IP
    l4: int | None   # TCP/UDP header, None if the IP payload is something else
    l4p: int | None

    def copy(self) -> Layout:
        return Layout(list(self.tags), self.pppoe, self.l3, self.fam, self.l4, self.l4p)

    def shift(self, at: int, delta: int) -> None:
        """Bytes were inserted (delta > 0) or removed at offset `at`."""
        self.tags = [t + delta if t >= at else t for t in self.tags]
        if self.pppoe is not None and self.pppoe >= at:
            self.pppoe += delta
        if self.l3 >= at:
            self.l3 += delta
        if self.l4 is not None and self.l4 >= at:
            self.l4 += delta


@dataclass(frozen=True)
class Base:
    name: str
    frame: bytes
    layout: Layout


def _base(name: str, l2: list[Packet], l3: Packet | None, rest: Packet | bytes = b"",
          trailer: bytes = b"") -> Base:
    tags: list[int] = []
    pppoe_off = None
    off = 0
    for part in l2:
        if isinstance(part, Ether):
            off = 14
        elif isinstance(part, (Dot1Q, Dot1AD)):
            tags.append(off)
            off += 4
        elif isinstance(part, PPPoE):
            pppoe_off = off
            off += 8  # session header + PPP protocol
    if not l2:  # a frame that is not Ethernet II (802.3 with a length field)
        return Base(name, bytes(rest) + trailer, Layout([], None, 14, None, None, None))
    stack = l2[0]
    for part in l2[1:]:
        stack = stack / part
    if l3 is None:
        return Base(name, bytes(stack / rest) + trailer, Layout(tags, pppoe_off, off, None, None, None))
    frame = bytes(stack / l3) + trailer
    fam = 4 if IP in l3 else 6
    ip = l3[IP] if fam == 4 else l3[IPv6]
    l4 = l4p = None
    if TCP in l3 or UDP in l3:
        l4p = 6 if TCP in l3 else 17
        l4hdr = l3[TCP] if l4p == 6 else l3[UDP]
        l4 = off + len(bytes(ip)) - len(bytes(l4hdr))
    return Base(name, frame, Layout(tags, pppoe_off, off, fam, l4, l4p))


@dataclass(frozen=True)
class Corpus:
    bases: tuple[Base, ...]   # a few dozen frames, hits and the kernel's kind
    matrix: tuple[Base, ...]  # hits for every ingress x egress encapsulation
    flows: tuple[tuple[abi.FlowKey, abi.FlowAction], ...]  # installed for every family


# Ingress encapsulations (VLAN / QinQ / PPPoE, as key fields) and egress ones (action fields)
# for the encapsulation matrix: every pair gets its own flow, for IPv4/TCP and IPv6/UDP.
MATRIX_IN: tuple[tuple[str, tuple[tuple[int, int], ...], int], ...] = (
    ("untagged", (), 0),
    ("q30", ((30, ETH_P_8021Q),), 0),
    ("ad300+q31", ((300, ETH_P_8021AD), (31, ETH_P_8021Q)), 0),
    ("q301+q32", ((301, ETH_P_8021Q), (32, ETH_P_8021Q)), 0),
    ("pppoe", (), 0x2001),
    ("q33+pppoe", ((33, ETH_P_8021Q),), 0x2002),
    ("ad302+q34+pppoe", ((302, ETH_P_8021AD), (34, ETH_P_8021Q)), 0x2003),
)
MATRIX_OUT: tuple[tuple[str, dict], ...] = (
    ("untagged", {}),
    ("q40", dict(vlan_outer_tci=40)),
    ("ad41+q42", dict(vlan_outer_tci=41, vlan_outer_tpid=ETH_P_8021AD, vlan_inner_tci=42)),
    ("q43(prio 3)+q44", dict(vlan_outer_tci=(3 << 13) | 43, vlan_inner_tci=44)),
    ("pppoe", dict(pppoe_sid=0x3001)),
    ("q45+pppoe (ppp device)", dict(vlan_outer_tci=45, pppoe_sid=0x3002, ppp_ifindex=PPP_IFINDEX)),
    ("ad46+q47+pppoe", dict(vlan_outer_tci=46, vlan_outer_tpid=ETH_P_8021AD, vlan_inner_tci=47,
                            pppoe_sid=0x3003)),
)


def _matrix(flows: list[tuple[abi.FlowKey, abi.FlowAction]]) -> list[Base]:
    out = []
    port = 41000
    for in_name, tags, sid in MATRIX_IN:
        for out_name, encap in MATRIX_OUT:
            for l3 in (tcp4(sport=port), udp6(sport=port, n=24)):
                nat = (SNAT4 if IP in l3 else SNAT6) if port % 2 else {}
                l2: list[Packet] = [eth()] + [vlan(vid, tpid) for vid, tpid in tags]
                if sid:
                    l2.append(pppoe(sid, l3))
                key = key_of(l3, vlan_outer=tags[0][0] if tags else 0,
                             vlan_inner=tags[1][0] if len(tags) > 1 else 0, pppoe_sid=sid,
                             tpid=tags[0][1] if tags else ETH_P_8021Q)
                flows.append((key, action(**nat, **encap)))
                out.append(_base(f"{in_name} in, {out_name} out, {'tcp4' if IP in l3 else 'udp6'}", l2, l3))
            port += 1
    return out


@cache
def corpus() -> Corpus:
    """The base frames and the flows installed for every family."""
    bases: list[Base] = []
    flows: list[tuple[abi.FlowKey, abi.FlowAction]] = []

    def hit(name: str, l2: list[Packet], l3: Packet, act: abi.FlowAction, trailer: bytes = b"",
            **key: int) -> None:
        flows.append((key_of(l3, **key), act))
        bases.append(_base(name, l2, l3, trailer=trailer))

    def other(name: str, l2: list[Packet], l3: Packet | None, rest: Packet | bytes = b"") -> None:
        bases.append(_base(name, l2, l3, rest))

    # exact hits, with and without NAT, L2 variants in and out
    hit("t4 snat", [eth()], tcp4(), action(**SNAT4))
    hit("u4 dnat", [eth()], udp4(dst=PUBLIC4, dport=PUB_PORT), action(**DNAT4))
    hit("u4 checksum 0, snat+dnat", [eth()],
        IP(src=CLIENT4, dst=PUBLIC4) / UDP(sport=CPORT + 1, dport=PUB_PORT, chksum=0) / payload(40),
        action(**SNAT4, **DNAT4))
    hit("t4 vlan in", [eth(), vlan(10)], tcp4(sport=CPORT + 2), action(), vlan_outer=10)
    hit("t4 qinq in, vlan out", [eth(), vlan(100, ETH_P_8021AD), vlan(10)], tcp4(sport=CPORT + 3),
        action(**SNAT4, vlan_outer_tci=30), vlan_outer=100, vlan_inner=10, tpid=ETH_P_8021AD)
    hit("u4 q+q in, ad+q out", [eth(), vlan(100), vlan(11)], udp4(sport=CPORT + 4),
        action(vlan_outer_tci=200, vlan_outer_tpid=ETH_P_8021AD, vlan_inner_tci=7),
        vlan_outer=100, vlan_inner=11)
    l3 = tcp4(src=SERVER4, dst=ROUTER4, sport=SPORT, dport=NAT_PORT)
    hit("t4 pppoe in", [eth(), pppoe(0x1234, l3)], l3, action(nat_daddr=CLIENT4, nat_dport=CPORT),
        pppoe_sid=0x1234)
    l3 = tcp4(src=SERVER4, dst=ROUTER4, sport=SPORT, dport=NAT_PORT + 1)
    hit("t4 vlan+pppoe in, pppoe out", [eth(), vlan(10), pppoe(0x1234, l3)], l3,
        action(nat_daddr=CLIENT4, nat_dport=CPORT + 1, pppoe_sid=0x99, ppp_ifindex=PPP_IFINDEX),
        vlan_outer=10, pppoe_sid=0x1234)
    l3 = udp4(src=SERVER4, dst=ROUTER4, sport=SPORT, dport=NAT_PORT + 2)
    hit("u4 qinq+pppoe in, untagged out", [eth(), vlan(100, ETH_P_8021AD), vlan(10), pppoe(0x1234, l3)],
        l3, action(nat_daddr=CLIENT4), vlan_outer=100, vlan_inner=10, pppoe_sid=0x1234, tpid=ETH_P_8021AD)
    hit("u4 pppoe out (ppp device)", [eth()], udp4(sport=CPORT + 5),
        action(**SNAT4, pppoe_sid=7, ppp_ifindex=PPP_IFINDEX))
    # TC redirects a GSO super-packet of this one to its PPP device, anything else to no port
    hit("t4 pppoe out, only a ppp device", [eth()], tcp4(sport=CPORT + 15),
        action(**SNAT4, out_ifindex=0, pppoe_sid=0x42, ppp_ifindex=PPP_IFINDEX))
    hit("t6 snat+dnat", [eth()], tcp6(dst=PUBLIC6, dport=PUB_PORT), action(**SNAT6, **DNAT6))
    hit("u6 snat, pppoe out", [eth()], udp6(), action(**SNAT6, pppoe_sid=9))
    l3 = tcp6(src=SERVER6, dst=ROUTER6, sport=SPORT, dport=NAT_PORT)
    hit("t6 pppoe in, vlan out", [eth(), pppoe(0x1234, l3)], l3,
        action(nat_daddr=CLIENT6, nat_dport=CPORT, vlan_outer_tci=10), pppoe_sid=0x1234)
    l3 = tcp6(src=SERVER6, dst=ROUTER6, sport=SPORT, dport=NAT_PORT + 1)
    hit("t6 vlan+pppoe in, untagged out", [eth(), vlan(10), pppoe(0x1234, l3)], l3,
        action(nat_daddr=CLIENT6, nat_dport=CPORT), vlan_outer=10, pppoe_sid=0x1234)
    hit("u6 vlan in", [eth(), vlan(20)], udp6(sport=CPORT + 6), action(), vlan_outer=20)
    hit("t4 mtu 150", [eth()], tcp4(sport=CPORT + 7, n=200), action(**SNAT4, mtu=150))
    hit("t6 no egress", [eth()], tcp6(sport=CPORT + 8), action(tx_port=EMPTY_SLOT, out_ifindex=0))
    # the hooks redirect through different things: a flow can lack only one of them
    hit("u4 no xdp slot", [eth()], udp4(sport=CPORT + 9), action(**SNAT4, tx_port=EMPTY_SLOT))
    hit("t4 no tc egress", [eth()], tcp4(sport=CPORT + 10), action(nat_sport=NAT_PORT, out_ifindex=0))
    hit("t4 tcp options", [eth()],
        IP(src=CLIENT4, dst=SERVER4, ttl=9, tos=0xB9, flags="DF")
        / TCP(sport=CPORT + 11, dport=SPORT, flags="PA",
              options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]) / payload(100),
        action(**SNAT4, **DNAT4))
    hit("t4 ttl 2", [eth()], tcp4(sport=CPORT + 12, ttl=2), action(**SNAT4))
    hit("u4 1500 bytes, vlan in, pppoe out", [eth(), vlan(10)], udp4(sport=CPORT + 14, n=1500 - 28),
        action(**SNAT4, mtu=1500, pppoe_sid=0x1234), vlan_outer=10)
    hit("u4 padded minimum frame", [eth()], udp4(sport=CPORT + 13, n=2), action(**SNAT4, pppoe_sid=9),
        trailer=bytes(16))

    # the kernel's: flows there but checks fail, misses, and what the parser refuses
    other("t4 fin", [eth()], tcp4(flags="FA"))
    other("t4 rst", [eth()], tcp4(flags="R"))
    other("t6 rst+ack", [eth()], tcp6(dst=PUBLIC6, dport=PUB_PORT, flags="RA"))
    other("t4 ttl 1", [eth()], tcp4(ttl=1))
    other("t4 other mac", [eth(OTHER_MAC)], tcp4())
    other("t4 miss", [eth()], tcp4(sport=CPORT + 100))
    other("u6 miss (vlan)", [eth(), vlan(21)], udp6(sport=CPORT + 6))
    other("u6 checksum 0", [eth()], IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=CPORT, dport=SPORT, chksum=0)
          / payload(20))
    other("three tags", [eth(), vlan(1), vlan(2), vlan(3)], tcp4())
    other("arp", [eth("ff:ff:ff:ff:ff:ff")], None, ARP(psrc=CLIENT4, pdst=ROUTER4))
    other("pppoe discovery", [eth()], None, PPPoED(code=0x09))
    other("pppoe lcp", [eth()], None, PPPoE(sessionid=0x1234) / PPP(proto=0xC021) / Raw(b"\x09\x01\x00\x08"
                                                                                         + bytes(4)))
    other("802.3 llc", [], None, Dot3(dst=IN_MAC, src="02:00:00:00:00:01") / LLC() / payload(40))
    other("ipv4 options", [eth()], IP(src=CLIENT4, dst=SERVER4, options=[b"\x94\x04\x00\x00"])
          / TCP(sport=CPORT, dport=SPORT, flags="A") / payload(8))
    other("ipv4 MF", [eth()], IP(src=CLIENT4, dst=SERVER4, flags="MF") / TCP(sport=CPORT, dport=SPORT)
          / payload(16))
    other("ipv4 offset", [eth()], IP(src=CLIENT4, dst=SERVER4, frag=100, proto=6) / payload(40))
    other("ipv6 hop-by-hop", [eth()], IPv6(src=CLIENT6, dst=PUBLIC6) / IPv6ExtHdrHopByHop()
          / TCP(sport=CPORT, dport=PUB_PORT) / payload(8))
    other("ipv6 fragment header", [eth()], IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrFragment()
          / UDP(sport=CPORT, dport=SPORT) / payload(8))
    other("icmp", [eth()], IP(src=CLIENT4, dst=SERVER4) / ICMP() / payload(24))
    other("icmpv6", [eth()], IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest())
    other("gre", [eth(), vlan(10)], IP(src=CLIENT4, dst=SERVER4, proto=47) / payload(24))
    other("ipv4 bad header checksum", [eth()], IP(src=CLIENT4, dst=SERVER4, chksum=0x1234)
          / TCP(sport=CPORT, dport=SPORT, flags="A") / payload(8))
    matrix = _matrix(flows)
    return Corpus(tuple(bases), tuple(matrix), tuple(flows))


# ---- byte-level mutations ------------------------------------------------------------------
#
# Each operation changes a bytearray in place (and the layout, when it moves headers) and
# returns a short label, or None when it does not apply to this frame.

Op = Callable[[bytearray, Layout, random.Random], "str | None"]


def _u16(b: bytearray, off: int) -> int:
    """A 16-bit field, 0 where an earlier cut removed it."""
    return (b[off] << 8) | b[off + 1] if off + 2 <= len(b) else 0


def _put16(b: bytearray, off: int, v: int) -> None:
    if off + 2 <= len(b):
        _U16.pack_into(b, off, v & 0xFFFF)


def _fix4(b: bytearray, L: Layout) -> None:
    """Make the IPv4 header checksum right again (over IHL words when they are there)."""
    if L.fam != 4 or L.l3 + 20 > len(b):
        return
    hl = (b[L.l3] & 15) * 4
    if hl < 20 or L.l3 + hl > len(b):
        hl = 20
    b[L.l3 + 10:L.l3 + 12] = b"\0\0"
    _put16(b, L.l3 + 10, ipv4_header_checksum(b[L.l3:L.l3 + hl]))


def _l3len(b: bytearray, L: Layout) -> int:
    if L.fam == 4:
        return _u16(b, L.l3 + 2)
    return 40 + _u16(b, L.l3 + 4)


def _set_pppoe_len(b: bytearray, L: Layout, l3len: int) -> None:
    if L.pppoe is not None:
        _put16(b, L.pppoe + 4, l3len + 2)


def _set_l3len(b: bytearray, L: Layout, l3len: int) -> None:
    """Set the IP length field (and the PPPoE length with it), checksum fixed."""
    if L.fam == 4:
        _put16(b, L.l3 + 2, l3len)
        _fix4(b, L)
    else:
        _put16(b, L.l3 + 4, l3len - 40)
    _set_pppoe_len(b, L, l3len)


def _len_choice(r: random.Random, real: int, frame_room: int, low: tuple[int, ...]) -> int:
    return r.choice(low + (real - 1, real, real + 1, frame_room, frame_room + 1, frame_room - 1,
                           r.randrange(0x10000), real + r.randint(-40, 40)))


def op_ip4_tot_len(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam != 4 or L.l3 + 20 > len(b):
        return None
    hdrs = (L.l4 - L.l3 + (20 if L.l4p == 6 else 8)) if L.l4 is not None else 20
    v = _len_choice(r, _u16(b, L.l3 + 2), len(b) - L.l3, (0, 1, 19, 20, 21, hdrs - 1, hdrs)) & 0xFFFF
    _put16(b, L.l3 + 2, v)
    label = f"tot_len={v}"
    if r.random() < 0.3:
        _set_pppoe_len(b, L, v)
        label += ",pppoe"
    if r.random() < 0.85:
        _fix4(b, L)
        return label
    return label + ",stale-csum"


def op_ip4_ihl(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam != 4 or L.l3 >= len(b):
        return None
    ihl = r.randrange(16)
    b[L.l3] = (b[L.l3] & 0xF0) | ihl
    _fix4(b, L)
    return f"ihl={ihl}"


def op_ip_version(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam is None or L.l3 >= len(b):
        return None
    v = r.choice((0, 1, 4, 5, 6, 7, 15, r.randrange(16)))
    b[L.l3] = (v << 4) | (b[L.l3] & 15)
    _fix4(b, L)
    return f"version={v}"


IPV4_OPTION_FILL = (b"\x01", b"\x00", b"\x94\x04\x00\x00", b"\x07\x07\x04\x00\x00\x00\x00")


def op_ip4_options(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """IPv4 options: inserted with every length adjusted, or only claimed by the IHL."""
    if L.fam != 4 or L.l3 + 20 > len(b):
        return None
    words = r.randint(1, 10)
    if r.random() < 0.2:
        b[L.l3] = 0x40 | (5 + words)
        _fix4(b, L)
        return f"ihl={5 + words} without options"
    fill = r.choice(IPV4_OPTION_FILL)
    opts = (fill * 40)[:words * 4] if r.random() < 0.7 else r.randbytes(words * 4)
    b[L.l3 + 20:L.l3 + 20] = opts
    L.shift(L.l3 + 20, len(opts))
    b[L.l3] = 0x40 | (5 + words)
    _set_l3len(b, L, _u16(b, L.l3 + 2) + len(opts))
    return f"options {opts.hex()}"


def op_ip4_frag(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam != 4 or L.l3 + 20 > len(b):
        return None
    off = r.randrange(1, 0x2000)
    v = r.choice((0x2000, 0x4000, 0x8000, 0x6000, off, 0x2000 | off, 0x4000 | off, 0x8000 | 1, 0))
    _put16(b, L.l3 + 6, v)
    _fix4(b, L)
    return f"frag_off={v:#06x}"


def op_ip_proto(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam is None or L.l3 + (20 if L.fam == 4 else 40) > len(b):
        return None
    p = r.choice((6, 17, 1, 47, 50, 58, 0, 43, 44, 60, 59, 132, r.randrange(256)))
    b[L.l3 + (9 if L.fam == 4 else 6)] = p
    _fix4(b, L)
    return f"proto={p}"


def op_ttl(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam is None or L.l3 + (20 if L.fam == 4 else 40) > len(b):
        return None
    t = r.choice((0, 1, 2, 3, 64, 255, r.randrange(256)))
    b[L.l3 + (8 if L.fam == 4 else 7)] = t
    _fix4(b, L)
    return f"ttl={t}"


def op_ip6_plen(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.fam != 6 or L.l3 + 40 > len(b):
        return None
    hdrs = (L.l4 - L.l3 - 40 + (20 if L.l4p == 6 else 8)) if L.l4 is not None else 0
    v = _len_choice(r, _u16(b, L.l3 + 4), len(b) - L.l3 - 40, (0, 1, 7, 8, hdrs - 1, hdrs)) & 0xFFFF
    _put16(b, L.l3 + 4, v)
    if r.random() < 0.3:
        _set_pppoe_len(b, L, 40 + v)
        return f"plen={v},pppoe"
    return f"plen={v}"


def op_ip6_ext(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Insert an 8-byte IPv6 extension header in front of the L4 header, lengths fixed."""
    if L.fam != 6 or L.l3 + 40 > len(b):
        return None
    kind = r.choice((0, 43, 44, 60, 135, 139, 140, 51))
    at = L.l3 + 40
    ext = bytes((b[L.l3 + 6], 0)) + (bytes(6) if r.random() < 0.7 else r.randbytes(6))
    b[at:at] = ext
    b[L.l3 + 6] = kind
    L.shift(at, 8)
    _set_l3len(b, L, 40 + _u16(b, L.l3 + 4) + 8)
    return f"ext {kind}"


def op_ip_flow_fields(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Fields the datapath must carry unchanged: DSCP/ECN, IPv4 id, IPv6 class and label."""
    if L.fam is None or L.l3 + (20 if L.fam == 4 else 40) > len(b):
        return None
    if L.fam == 4:
        b[L.l3 + 1] = r.randrange(256)
        _put16(b, L.l3 + 4, r.randrange(0x10000))
        _fix4(b, L)
    else:
        b[L.l3] = 0x60 | r.randrange(16)
        b[L.l3 + 1:L.l3 + 4] = r.randbytes(3)
    return "tos/id/label"


def op_addr_port(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Change a byte of the 5-tuple: mostly a miss, sometimes the same key."""
    if L.fam is None:
        return None
    spots = list(range(L.l3 + 12, L.l3 + 20)) if L.fam == 4 else list(range(L.l3 + 8, L.l3 + 40))
    if L.l4 is not None:
        spots += range(L.l4, L.l4 + 4)
    at = r.choice(spots)
    if at >= len(b):
        return None
    b[at] ^= r.choice((1, 0x80, r.randrange(1, 256)))
    _fix4(b, L)
    return f"tuple byte {at}"


def op_udp_len(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.l4p != 17 or L.l4 is None or L.l4 + 8 > len(b):
        return None
    avail = _l3len(b, L) - (L.l4 - L.l3)
    v = r.choice((0, 1, 7, 8, 9, _u16(b, L.l4 + 4) - 1, _u16(b, L.l4 + 4) + 1, avail, avail + 1,
                  avail - 1, r.randrange(0x10000)))
    _put16(b, L.l4 + 4, v)
    return f"udp len={v & 0xFFFF}"


def op_l4_checksum(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """A zero UDP checksum (none over IPv4, invalid over IPv6) or any wrong one: the
    fast path must neither check nor repair an L4 checksum it did not break."""
    if L.l4 is None:
        return None
    at = L.l4 + (6 if L.l4p == 17 else 16)
    if at + 2 > len(b):
        return None
    v = r.choice((0, 0, 0xFFFF, 1, r.randrange(0x10000)))
    _put16(b, at, v)
    return f"l4 csum={v:#06x}"


def op_tcp_doff(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.l4p != 6 or L.l4 is None or L.l4 + 13 > len(b):
        return None
    d = r.randrange(16)
    b[L.l4 + 12] = (d << 4) | (b[L.l4 + 12] & 15)
    return f"doff={d}"


def op_tcp_flags(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.l4p != 6 or L.l4 is None or L.l4 + 14 > len(b):
        return None
    f = r.choice((0x01, 0x04, 0x11, 0x14, 0x02, 0x12, 0x18, 0x10, 0x00, 0xFF, 0xEA, r.randrange(256)))
    b[L.l4 + 13] = f
    return f"tcp flags={f:#04x}"


TPIDS = (ETH_P_8021Q, ETH_P_8021AD, 0x9100, 0x8100, 0x88A8)


def op_vlan_tci(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if not L.tags:
        return None
    t = r.choice(L.tags)
    old = _u16(b, t)
    v = r.choice((0, 5 << 13, (old & 0x0FFF) | (r.randrange(16) << 12), old + 1, old ^ 0x0FFF,
                  r.randrange(0x10000)))
    _put16(b, t, v)
    return f"tci@{t}={v & 0xFFFF:#06x}"


def _type_fields(L: Layout) -> list[int]:
    """Offsets of every 2-byte type field in the L2 header (ethertypes and TPIDs)."""
    out = [12] + [t + 2 for t in L.tags]
    if L.pppoe is not None:
        out.append(L.pppoe + 6)  # PPP protocol
    return out


def op_ethertype(b: bytearray, L: Layout, r: random.Random) -> str | None:
    at = r.choice(_type_fields(L))
    v = r.choice((0x0800, 0x86DD, 0x8100, 0x88A8, 0x8863, 0x8864, 0x0806, 0x88CC, 0x0021, 0x0057,
                  0xC021, 0x05DC, 0x0000, r.randrange(0x10000)))
    _put16(b, at, v)
    return f"type@{at}={v:#06x}"


def op_insert_tag(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """A VLAN tag (proper, priority-only, or garbage) inserted at a type field."""
    at = r.choice([12] + [t + 2 for t in L.tags])
    tpid = r.choice(TPIDS)
    tci = r.choice((10, 11, 20, 100, 0, r.randrange(0x10000)))
    tag = _U16.pack(tpid) + _U16.pack(tci) if r.random() < 0.85 else r.randbytes(4)
    b[at:at] = tag
    L.shift(at, 4)
    L.tags = sorted(L.tags + [at + 2])
    return f"tag {tag.hex()}@{at}"


def op_remove_tag(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if not L.tags:
        return None
    t = r.choice(L.tags)
    del b[t - 2:t + 2]
    L.tags.remove(t)
    L.shift(t + 2, -4)
    return f"tag@{t} removed"


def op_pppoe_field(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.pppoe is None or L.pppoe + 8 > len(b):
        return None
    p = L.pppoe
    which = r.randrange(5)
    if which == 0:
        b[p] = r.choice((0x11, 0x10, 0x21, 0x01, 0x00, r.randrange(256)))
        return f"pppoe ver/type={b[p]:#04x}"
    if which == 1:
        b[p + 1] = r.choice((0x00, 0x09, 0x07, 0xA7, r.randrange(256)))
        return f"pppoe code={b[p + 1]:#04x}"
    if which == 2:
        v = r.choice((0, 1, 0x1234, 0x1235, 0xFFFF, r.randrange(0x10000)))
        _put16(b, p + 2, v)
        return f"pppoe sid={v:#06x}"
    if which == 3:
        real = _u16(b, p + 4)
        v = r.choice((0, 1, 2, real - 1, real, real + 1, len(b) - p - 6, len(b) - p - 5, len(b) - p - 7,
                      r.randrange(0x10000))) & 0xFFFF
        _put16(b, p + 4, v)
        return f"pppoe len={v}"
    v = r.choice((0x0021, 0x0057, 0xC021, 0x8021, 0x0281, 0x0000, r.randrange(0x10000)))
    _put16(b, p + 6, v)
    return f"ppp proto={v:#06x}"


def op_pppoe_wrap(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Put the IP packet into a PPPoE session (or take it out of one)."""
    if L.fam is None:
        return None
    if L.pppoe is not None:
        p = L.pppoe
        del b[p - 2:p + 8]
        b[p - 2:p - 2] = _U16.pack(0x0800 if L.fam == 4 else 0x86DD)
        L.shift(p + 8, -8)
        L.pppoe = None
        return "pppoe removed"
    at = L.l3 - 2
    sid = r.choice((0x1234, 0x1234, 1, r.randrange(1, 0x10000)))
    l3len = _l3len(b, L) if L.l3 + 6 <= len(b) else 0
    hdr = struct.pack("!HBBHHH", 0x8864, 0x11, 0, sid, (l3len + 2) & 0xFFFF, 0x0021 if L.fam == 4 else 0x0057)
    del b[at:at + 2]
    b[at:at] = hdr
    L.shift(at + 2, 8)
    L.pppoe = at + 2
    return f"pppoe {sid:#06x} added"


DMACS = (IN_MAC, OTHER_MAC, "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01")


def op_macs(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if r.random() < 0.3:
        b[6:12] = r.randbytes(6)  # the source MAC matters to nothing
        return "smac"
    mac = r.choice(DMACS)
    b[0:6] = bytes(int(x, 16) for x in mac.split(":")) if r.random() < 0.9 else r.randbytes(6)
    return f"dmac {b[0:6].hex()}"


def op_trailer(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Bytes after the IP packet (Ethernet padding): they travel along unchanged."""
    n = r.randint(1, 64)
    b += bytes(n) if r.random() < 0.5 else r.randbytes(n)
    return f"trailer {n}"


def op_cut(b: bytearray, L: Layout, r: random.Random) -> str | None:
    n = r.randrange(len(b) + 1)
    del b[n:]
    return f"cut {n}"


def op_flip(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """XOR 1-4 random bytes, mostly in the headers."""
    spots = []
    for _ in range(r.randint(1, 4)):
        if not b:
            break
        at = r.randrange(min(len(b), 96)) if r.random() < 0.85 else r.randrange(len(b))
        b[at] ^= r.randrange(1, 256)
        spots.append(at)
    return "flip " + ",".join(map(str, spots))


# VLAN ids and PPPoE sessions some installed flow has: a frame moved onto one of them is a
# near miss of another flow (or a hit of it, when every other field agrees)
INSTALLED_VIDS = (10, 11, 20, 30, 31, 32, 33, 34, 100, 300, 301, 302)
INSTALLED_SIDS = (0x1234, 0x2001, 0x2002, 0x2003, 0x42, 7, 9)


def op_vid_of_another_flow(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if not L.tags:
        return None
    t = r.choice(L.tags)
    v = (_u16(b, t) & 0xF000) | r.choice(INSTALLED_VIDS)
    _put16(b, t, v)
    return f"vid@{t}={v & 0xFFF}"


def op_other_tpid(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """The outer tag's TPID swapped between 802.1Q and 802.1ad: the same VLAN ids in the other
    protocol, a near miss of the flow (the key holds the protocol), never a hit of it."""
    if not L.tags or len(b) < 14:
        return None
    at = L.tags[0] - 2
    old = _u16(b, at)
    if old not in (ETH_P_8021Q, ETH_P_8021AD):
        return None
    new = ETH_P_8021AD if old == ETH_P_8021Q else ETH_P_8021Q
    _put16(b, at, new)
    return f"outer tpid {old:#06x}->{new:#06x}"


def op_sid_of_another_flow(b: bytearray, L: Layout, r: random.Random) -> str | None:
    if L.pppoe is None or L.pppoe + 4 > len(b):
        return None
    v = r.choice(INSTALLED_SIDS + (_u16(b, L.pppoe + 2) + 1, _u16(b, L.pppoe + 2) - 1)) & 0xFFFF
    _put16(b, L.pppoe + 2, v)
    return f"sid={v:#06x}"


def op_pppoe_len_mismatch(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """A PPPoE length a few bytes either side of the IP packet's or of the frame's end."""
    if L.pppoe is None or L.pppoe + 6 > len(b):
        return None
    ip = _l3len(b, L) + 2 if L.fam is not None and L.l3 + 6 <= len(b) else 0
    room = len(b) - L.pppoe - 6
    v = r.choice((ip - 2, ip - 1, ip, ip + 1, ip + 2, room - 1, room, room + 1, 0, 1, 2, 0xFFFF)) & 0xFFFF
    _put16(b, L.pppoe + 4, v)
    return f"pppoe len={v} (ip {ip}, room {room})"


def op_cut_l2(b: bytearray, L: Layout, r: random.Random) -> str | None:
    """Cut the frame inside its L2 header (tags, PPPoE) or the first bytes of L3."""
    n = r.randrange(12, min(len(b), L.l3 + 24) + 1) if len(b) >= 12 else len(b)
    del b[n:]
    return f"cut {n} (l2)"


IPV4_OPS: tuple[Op, ...] = (op_ip4_tot_len, op_ip4_ihl, op_ip_version, op_ip4_options, op_ip4_frag,
                            op_ip_proto, op_ttl, op_addr_port, op_ip_flow_fields)
IPV6_OPS: tuple[Op, ...] = (op_ip6_plen, op_ip_version, op_ip6_ext, op_ip_proto, op_ttl, op_addr_port,
                            op_ip_flow_fields)
L4_OPS: tuple[Op, ...] = (op_udp_len, op_l4_checksum, op_tcp_doff, op_tcp_flags, op_addr_port)
L2_OPS: tuple[Op, ...] = (op_vlan_tci, op_ethertype, op_insert_tag, op_remove_tag, op_pppoe_field,
                          op_pppoe_wrap, op_macs, op_trailer)
STRUCTURED_OPS = IPV4_OPS + IPV6_OPS + L4_OPS + L2_OPS
ENCAP_OPS: tuple[Op, ...] = L2_OPS + (op_vid_of_another_flow, op_sid_of_another_flow, op_pppoe_len_mismatch,
                                      op_cut_l2, op_ip4_tot_len, op_ip6_plen, op_ttl, op_tcp_flags,
                                      op_other_tpid)


def _encapsulated(b: Base) -> bool:
    return bool(b.layout.tags) or b.layout.pppoe is not None


def _mutate(base: Base, ops: tuple[Op, ...], r: random.Random, count: int) -> tuple[str, bytes] | None:
    b = bytearray(base.frame)
    L = base.layout.copy()
    labels = []
    for _ in range(count):
        for _try in range(8):
            label = r.choice(ops)(b, L, r)
            if label is not None:
                labels.append(label)
                break
    if not labels:
        return None
    return f"{base.name}: " + "; ".join(labels), bytes(b)


# ---- families --------------------------------------------------------------------------------

Frames = list[tuple[str, bytes]]


def fam_truncate(c: Corpus, r: random.Random) -> Frames:
    """Every base cut at every byte; and cut at every byte from L3 on with every length
    field rewritten to fit, so that the parser meets each header cut as the IP, UDP and
    PPPoE lengths describe it."""
    out: Frames = []
    for base in c.bases:
        for n in range(len(base.frame) + 1):
            out.append((f"{base.name}: cut {n}", base.frame[:n]))
        L = base.layout
        if L.fam is None:
            continue
        for n in range(L.l3, len(base.frame)):
            b = bytearray(base.frame[:n])
            l3len = n - L.l3
            if L.fam == 4 and n >= L.l3 + 4:
                _set_l3len(b, L, l3len)
            elif L.fam == 6 and n >= L.l3 + 6 and l3len >= 40:
                _set_l3len(b, L, l3len)
            else:
                _set_pppoe_len(b, L, l3len)
            if L.l4p == 17 and L.l4 is not None and n >= L.l4 + 6:
                _put16(b, L.l4 + 4, n - L.l4)
            out.append((f"{base.name}: cut {n}, lengths fitted", bytes(b)))
    return out


def _family(ops: tuple[Op, ...], count: int, stack: tuple[int, int] = (1, 1),
            want: Callable[[Base], bool] = lambda b: True, matrix: bool = False):
    def gen(c: Corpus, r: random.Random) -> Frames:
        pool = [b for b in (c.matrix if matrix else c.bases) if want(b)]
        out: Frames = [(b.name, b.frame) for b in pool] if matrix else []
        while len(out) < count:
            m = _mutate(r.choice(pool), ops, r, r.randint(*stack))
            if m is not None:
                out.append(m)
        return out
    return gen


def fam_other_tpid(c: Corpus, r: random.Random) -> Frames:
    """Every tagged hit (bases and the encapsulation matrix) with its outer TPID swapped
    between 802.1Q and 802.1ad: misses, each one; then the same stacked with the VLAN-id,
    session and other encapsulation ops, so that a frame may also land on the ids of another
    flow in the other protocol."""
    pool = [b for b in c.bases + c.matrix if b.layout.tags]
    out: Frames = []
    for base in pool:
        m = _mutate(base, (op_other_tpid,), r, 1)
        assert m is not None, base.name
        out.append(m)
    while len(out) < 4000:
        b = r.choice(pool)
        frame = bytearray(b.frame)
        L = b.layout.copy()
        labels = [op_other_tpid(frame, L, r)]
        for _ in range(r.randint(1, 2)):
            op = r.choice((op_vid_of_another_flow, op_sid_of_another_flow, op_trailer, op_macs, op_ttl,
                           op_tcp_flags, op_remove_tag, op_insert_tag))
            labels.append(op(frame, L, r))
        out.append((f"{b.name}: " + "; ".join(x for x in labels if x), bytes(frame)))
    return out


def fam_hits(c: Corpus, r: random.Random) -> Frames:
    """The bases as they are, padded, or with a changed destination MAC: mostly forwards."""
    out: Frames = []
    for _ in range(40):
        for base in c.bases:
            out.append((base.name, base.frame))
    while len(out) < 4000:
        m = _mutate(r.choice(c.bases), (op_trailer, op_macs, op_ip_flow_fields, op_l4_checksum), r,
                    r.randint(1, 2))
        if m is not None:
            out.append(m)
    return out


def fam_garbage(c: Corpus, r: random.Random) -> Frames:
    """Random frames: pure noise, or noise behind an ethertype and IP version the
    parser will follow, sometimes with a right IPv4 header checksum."""
    out: Frames = []
    for i in range(8000):
        n = r.randrange(14) if r.random() < 0.1 else r.choice((r.randrange(14, 80), r.randrange(14, 400)))
        b = bytearray(r.randbytes(n))
        label = f"garbage {len(b)}"
        if len(b) >= 14 and r.random() < 0.7:
            b[0:6] = bytes.fromhex(IN_MAC.replace(":", "")) if r.random() < 0.7 else b[0:6]
            et = r.choice((0x0800, 0x86DD, 0x8100, 0x88A8, 0x8864, 0x8863))
            _put16(b, 12, et)
            L = Layout([], None, 14, 4 if et == 0x0800 else 6 if et == 0x86DD else None, None, None)
            if L.fam is not None and len(b) > 14:
                b[14] = (L.fam << 4) | (5 if r.random() < 0.6 else b[14] & 15)
                if r.random() < 0.5 and len(b) >= 14 + (20 if L.fam == 4 else 40):
                    b[23 if L.fam == 4 else 20] = r.choice((6, 17, b[23 if L.fam == 4 else 20]))
                    if r.random() < 0.5:
                        _set_l3len(b, L, len(b) - 14)
                    _fix4(b, L)
            label += f" type {et:#06x}"
        out.append((f"{label} #{i}", bytes(b)))
    return out


FAMILIES: dict[str, Callable[[Corpus, random.Random], Frames]] = {
    "truncate": fam_truncate,
    "hits": fam_hits,
    "ipv4": _family(IPV4_OPS, 20000, want=lambda b: b.layout.fam == 4),
    "ipv6": _family(IPV6_OPS, 12000, want=lambda b: b.layout.fam == 6),
    "l4": _family(L4_OPS, 14000, want=lambda b: b.layout.l4 is not None),
    "l2": _family(L2_OPS, 20000, stack=(1, 2)),
    "flips": _family((op_flip,), 14000),
    "garbage": fam_garbage,
    "encap_matrix": _family((op_trailer, op_ttl, op_l4_checksum, op_ip_flow_fields, op_tcp_flags,
                             op_ip4_tot_len, op_ip6_plen, op_udp_len, op_pppoe_field, op_vlan_tci,
                             op_macs, op_cut), 8000, stack=(0, 2), matrix=True),
    "stacked": _family(STRUCTURED_OPS + (op_cut, op_flip), 16000, stack=(2, 4)),
    # tagged and PPPoE frames (and PPPoE over VLAN): cut tags and session headers, VLAN ids and
    # sessions of other flows, PPPoE lengths either side of right, stacked with the L2 ops
    "encap": _family(ENCAP_OPS, 16000, stack=(1, 3), want=_encapsulated),
    "encap_matrix_l2": _family(ENCAP_OPS, 12000, stack=(1, 2), matrix=True,
                               want=_encapsulated),
    # the outer tag in the other protocol (802.1Q <-> 802.1ad), alone and with other ops
    "other_tpid": fam_other_tpid,
}


@cache
def frames_of(family: str, seed: int = SEED) -> Frames:
    return FAMILIES[family](corpus(), random.Random(f"{seed}/{family}"))


def gso_ctx_of(r: random.Random) -> tuple[int, int]:
    """(gso_segs, gso_size) of a GSO super-packet; segs 0 is counted as 1 by the datapath."""
    return r.choice((0, 1, 2, 3, 45)), r.choice((1, 100, 536, 1000, 1448, 1460, r.randrange(1, 4000)))


# ---- running and judging ---------------------------------------------------------------------


@dataclass
class Tally:
    stats: dict[str, list[int]] = field(default_factory=dict)    # reason -> [packets, bytes]
    flows: dict[tuple, list[int]] = field(default_factory=dict)  # model key -> [packets, bytes, closing]
    ran_both: int = 0
    runs: int = 0
    failures: list[str] = field(default_factory=list)
    failed: int = 0
    redirects: int = 0
    wrong_redirects: int = 0

    def fail(self, text: str) -> None:
        self.failed += 1
        if len(self.failures) < SHOW_FAILURES:
            self.failures.append(text)


def _describe(family: str, i: int, label: str, hook: str, gso, frame: bytes) -> str:
    g = f" gso(segs={gso[0]}, size={gso[1]})" if gso else ""
    return f"[seed {SEED} family {family} #{i} {hook}{g}] {label}\n    frame {frame.hex()}"


def _runs(i: int, r: random.Random):
    yield "xdp", None
    yield "tc", None
    if i % GSO_EVERY == 0:
        yield "tc", gso_ctx_of(r)


def run_family(dp, model: Model, family: str, frames: Frames, check: RedirectCheck | None = None) -> Tally:
    t = Tally()
    r = random.Random(f"{SEED}/{family}/gso")
    for i, (label, frame) in enumerate(frames):
        parsed = model.parse(frame)
        ran = 0
        for hook, gso in _runs(i, r):
            want = model.verdict(frame, hook, parsed, gso)
            try:
                res = dp.run(hook, frame, skb_ctx=skb_ctx(*gso) if gso else None)
            except DatapathError as exc:
                if want.reason is not None:
                    t.fail(_describe(family, i, label, hook, gso, frame)
                           + f"\n    test run refused the frame ({exc}); model: {want.reason}")
                continue
            t.runs += 1
            if want.reason is None:
                t.fail(_describe(family, i, label, hook, gso, frame)
                       + f"\n    test run accepted a frame the model says it refuses (retval {res.retval})")
                continue
            ran += gso is None
            pass_code, redirect_code = VERDICTS[hook]
            if res.retval == redirect_code and check is not None:
                t.redirects += 1
                why = check.wrong(frame, IFINDEX)
                if why is not None:
                    t.wrong_redirects += 1
                    t.fail(_describe(family, i, label, hook, gso, frame) + f"\n    wrong redirect: {why}")
            if want.reason == FORWARDED:
                if res.retval != redirect_code or res.data != want.output:
                    t.fail(_describe(family, i, label, hook, gso, frame)
                           + f"\n    model: forwarded; hook: retval {res.retval}, "
                           + (first_difference(res.data, want.output or b"") if res.retval == redirect_code
                              else "not redirected"))
            elif res.retval != pass_code or res.data != frame:
                t.fail(_describe(family, i, label, hook, gso, frame)
                       + f"\n    model: pass ({want.reason}); hook: retval {res.retval}"
                       + ("" if res.retval != pass_code else ", frame changed: "
                          + first_difference(res.data, frame)))
            s = t.stats.setdefault(want.reason, [0, 0])
            s[0] += 1
            s[1] += len(frame)
            if want.flow is not None:
                fl = t.flows.setdefault(want.flow, [0, 0, 0])
                fl[0] += want.packets
                fl[1] += want.l3len
                fl[2] |= want.closing
                if want.closing:
                    model.closing.add(want.flow)  # the flag persists in the map across frames
        t.ran_both += ran == 2
    return t


def diagnose_reasons(dp, model: Model, family: str, frames: Frames, limit: int = 5) -> list[str]:
    """Frame by frame, with the stats map read after every run: which frames were
    counted under another reason (or length) than the model's (slow; only after a failure)."""
    flows = corpus().flows
    dp.clear_flows()
    dp.install(flows)
    found: list[str] = []
    r = random.Random(f"{SEED}/{family}/gso")
    deadline = time.monotonic() + 60
    for i, (label, frame) in enumerate(frames):
        parsed = model.parse(frame)
        for hook, gso in _runs(i, r):
            want = model.verdict(frame, hook, parsed, gso)
            if want.reason is None:
                continue
            before = dp.stats()
            dp.run(hook, frame, skb_ctx=skb_ctx(*gso) if gso else None)
            after = dp.stats()
            got = stats_delta(before, after)
            if got != {want.reason: [1, len(frame)]}:
                found.append(_describe(family, i, label, hook, gso, frame)
                             + f"\n    counted {got}, model {want.reason} ({len(frame)} bytes)")
                if len(found) >= limit:
                    return found
        if time.monotonic() > deadline:
            found.append("(diagnosis stopped after 60 s)")
            break
    return found


def stats_delta(before, after) -> dict[str, list[int]]:
    return {abi.REASONS[i]: [a[0] - b[0], a[1] - b[1]]
            for i, (a, b) in enumerate(zip(after, before, strict=True)) if a != b}


def new_model(flows) -> Model:
    return Model(flows, ifindex=IFINDEX, tx_slots={TX_SLOT})


# ---- tests -------------------------------------------------------------------------------------


def test_model_reasons_are_the_abi_reasons():
    """The model names reasons as the ABI header does, and knows all of them."""
    from reference import REASONS

    assert list(REASONS) == abi.REASONS


def test_volume():
    """At least MIN_FRAMES frames run through both hooks: the families' frames that the
    model says both test runs accept (each family test checks that they do)."""
    model = new_model(corpus().flows)
    both = 0
    for family in FAMILIES:
        for _, frame in frames_of(family):
            p = model.parse(frame)
            both += all(model.verdict(frame, h, p).reason is not None for h in ("xdp", "tc"))
    assert both >= MIN_FRAMES, f"only {both} frames run through both hooks (seed {SEED})"


def test_bases_cover_every_reason():
    """The unmutated bases already reach every reason the test run can produce on some hook
    (l2_rewrite_failed only through the GSO runs), so the mutations start from each."""
    c = corpus()
    model = new_model(c.flows)
    seen = {model.verdict(b.frame, h).reason for b in c.bases for h in ("xdp", "tc")}
    assert set(abi.REASONS) - seen == {"l2_rewrite_failed"}


def test_matrix_bases_are_hits():
    """Every ingress x egress encapsulation base is a well-formed hit the model forwards."""
    c = corpus()
    model = new_model(c.flows)
    assert len(c.matrix) == 2 * len(MATRIX_IN) * len(MATRIX_OUT)
    for b in c.matrix:
        assert [model.verdict(b.frame, h).reason for h in ("xdp", "tc")] == ["forwarded"] * 2, b.name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz(datapath, family: str):
    flows = corpus().flows
    frames = frames_of(family)
    model = new_model(flows)
    datapath.clear_flows()
    datapath.install(flows)
    try:
        before = datapath.stats()
        t0 = time.monotonic()
        tally = run_family(datapath, model, family, frames, RedirectCheck(flows))
        elapsed = time.monotonic() - t0
        after = datapath.stats()
        counted = stats_delta(before, after)

        assert not tally.wrong_redirects, (f"{tally.wrong_redirects} wrong redirects: "
                                           + "\n".join(tally.failures))
        assert not tally.failed, (f"{tally.failed} of {len(frames)} frames judged wrong "
                                  f"(seed {SEED}, family {family}), first ones:\n"
                                  + "\n".join(tally.failures))
        expected = {k: tally.stats[k] for k in abi.REASONS if k in tally.stats}
        if counted != expected:
            detail = diagnose_reasons(datapath, model, family, frames)
            raise AssertionError(f"stats map (seed {SEED}, family {family}): counted {counted}, "
                                 f"model {expected}\n" + "\n".join(detail))

        by_key = {model_flow(k, a).key: k for k, a in flows}
        wrong = []
        for mkey, fkey in by_key.items():
            want = tally.flows.get(mkey, [0, 0, 0])
            f = datapath.flow(fkey)
            got = [f.counters.packets, f.counters.bytes, f.action.closing]
            if got != want:
                wrong.append(f"{fkey}: counters (packets, bytes, closing) {got}, model {want}")
        assert not wrong, f"flow counters (seed {SEED}, family {family}):\n" + "\n".join(wrong)
        print(f"{family}: {len(frames)} frames, {tally.ran_both} through both hooks, {tally.runs} runs, "
              f"{tally.redirects} redirects, {tally.wrong_redirects} wrong, "
              f"{elapsed:.1f} s; reasons {sorted((k, v[0]) for k, v in expected.items())}")
    finally:
        datapath.clear_flows()


def test_redirect_check_knows_a_hit_from_a_near_miss():
    """The independent redirect check accepts the corpus's hits and refuses each kind of
    near miss of a tagged / PPPoE hit, so that its 0 in the fuzz runs means something."""
    c = corpus()
    check = RedirectCheck(c.flows)
    model = new_model(c.flows)
    for b in c.matrix:
        assert check.wrong(b.frame, IFINDEX) is None, b.name
    base = next(b for b in c.bases if b.name == "u4 qinq+pppoe in, untagged out")
    assert model.verdict(base.frame, "xdp").reason == FORWARDED
    L = base.layout
    near = {
        "other ingress device": (base.frame, IFINDEX + 1),
        "other inner vid": (_patched(base.frame, L.tags[1], 11), IFINDEX),
        "outer tag 802.1q, not 802.1ad": (_patched(base.frame, L.tags[0] - 2, ETH_P_8021Q), IFINDEX),
        "vid 0": (_patched(base.frame, L.tags[0], 0), IFINDEX),
        "other session": (_patched(base.frame, L.pppoe + 2, 0x1235), IFINDEX),
        "pppoe length short": (_patched(base.frame, L.pppoe + 4,
                                        _u16(bytearray(base.frame), L.pppoe + 4) - 1), IFINDEX),
        "pppoe length past the frame": (_patched(base.frame, L.pppoe + 4, len(base.frame)), IFINDEX),
        "ppp protocol lcp": (_patched(base.frame, L.pppoe + 6, 0xC021), IFINDEX),
        "cut in the tag": (base.frame[:L.tags[1] + 1], IFINDEX),
        "cut in the session header": (base.frame[:L.pppoe + 5], IFINDEX),
        "other mac": (bytes.fromhex(OTHER_MAC.replace(":", "")) + base.frame[6:], IFINDEX),
    }
    for what, (frame, ifindex) in near.items():
        assert check.wrong(frame, ifindex) is not None, what


def _patched(frame: bytes, off: int, v: int) -> bytes:
    b = bytearray(frame)
    _put16(b, off, v)
    return bytes(b)
