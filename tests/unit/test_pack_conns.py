"""Entries packed in C (placement.pack_conns, csrc/entries.c) are byte for byte the
Python packer's (placement.pack_entries of model.entry_fields), which stays the reference.

A table of connections (IPv4 and IPv6, TCP and UDP, no NAT, source NAT, destination NAT,
both, a port-only rewrite, address text that differs only in spelling) crossed with a
table of paths (plain Ethernet, 802.1Q, QinQ with an 802.1ad outer tag, PPPoE with and
without a PPP device, a different layering in each direction), in one batch with the
paths mixed: keys, values and each connection's two keys must be equal. Input C cannot
take is handed back (None), so the caller's Python packer raises what it always raised.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
from dataclasses import replace

import pytest

from pyflow.control.model import Conn, Egress, ManagedDevice, Tuple, entry_fields
from pyflow.control.placement import pack_conns, pack_entries
from pyflow.datapath.abi import ETH_P_8021AD, FLOW_SIZE, KEY_SIZE

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
V4, V6 = socket.AF_INET, socket.AF_INET6


def conn(family: int, proto: int, o: tuple, r: tuple) -> Conn:
    return Conn(family, proto, Tuple(*o), Tuple(*r))


CONNS = [
    # no NAT
    conn(V4, TCP, ("198.18.0.10", "198.19.0.50", 40000, 443), ("198.19.0.50", "198.18.0.10", 443, 40000)),
    conn(V6, UDP, ("2001:2:1::10", "2001:2:9::50", 5353, 53), ("2001:2:9::50", "2001:2:1::10", 53, 5353)),
    # masquerade: source address and port
    conn(V4, TCP, ("198.18.0.10", "198.19.0.50", 40000, 443), ("198.19.0.50", "198.19.255.1", 443, 61000)),
    # source address only, port kept
    conn(V4, UDP, ("198.18.0.11", "198.19.0.50", 40001, 53), ("198.19.0.50", "198.19.255.1", 53, 40001)),
    # source port only
    conn(V4, TCP, ("198.18.0.12", "198.19.0.50", 40002, 80), ("198.19.0.50", "198.18.0.12", 80, 1024)),
    # destination NAT (port forward)
    conn(V4, TCP, ("198.19.0.50", "198.19.255.1", 50000, 8080), ("198.18.0.20", "198.19.0.50", 80, 50000)),
    # both
    conn(V4, UDP, ("198.18.0.13", "198.19.255.1", 1, 65535), ("198.18.0.21", "198.19.255.2", 0, 7)),
    # IPv6 NAT66-like rewrite of both
    conn(V6, TCP, ("2001:2:1::10", "2001:2:9::50", 40000, 443), ("2001:2:8::1", "2001:2:9::ff", 8443, 40001)),
    # the same address spelt two ways: the text differs, so NAT is set (as the Python packer does)
    conn(V6, TCP, ("2001:2:1::10", "2001:2:9::50", 40000, 443),
         ("2001:2:9::50", "2001:2:1:0::10", 443, 40000)),
    # IPv4 in IPv6 text
    conn(V6, UDP, ("::ffff:198.18.0.1", "2001:2::1", 9, 10), ("2001:2::1", "::ffff:198.18.0.1", 10, 9)),
]

LAN_MAC, WAN_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
CLIENT_MAC, GW_MAC = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
PLAIN = Egress(ifindex=3, ifname="wan", smac=WAN_MAC, dmac=GW_MAC, mtu=1500)
LAN = Egress(ifindex=1, ifname="lan", smac=LAN_MAC, dmac=CLIENT_MAC, mtu=1500)
LAYERS = {
    "plain": PLAIN,
    "vlan": replace(PLAIN, ifindex=5, vlan_outer_tci=0x2064, mtu=1496),
    "qinq": replace(PLAIN, ifindex=6, vlan_outer_tci=0x0123, vlan_outer_tpid=ETH_P_8021AD,
                    vlan_inner_tci=0xE045),
    "qinq-1q": replace(PLAIN, ifindex=7, vlan_outer_tci=4095, vlan_inner_tci=1),
    "pppoe": replace(PLAIN, ifindex=8, pppoe_sid=0x1234, mtu=1492),
    "pppoe-dev": replace(PLAIN, ifindex=9, pppoe_sid=1, ppp_ifindex=42, mtu=1492),
    "vlan-pppoe": replace(PLAIN, ifindex=10, vlan_outer_tci=7, pppoe_sid=0xFFFE, ppp_ifindex=43, mtu=1492),
    "lan-vlan": replace(LAN, ifindex=11, vlan_outer_tci=200, smac=bytes.fromhex("020000000011")),
}


def path(eg_o: Egress, eg_r: Egress) -> tuple:
    return (None, None, eg_o, eg_r, ManagedDevice(eg_o.ifindex, eg_o.ifindex + 100, eg_o.smac),
            ManagedDevice(eg_r.ifindex, eg_r.ifindex + 200, eg_r.smac))


# each direction's egress with each layering, the other side plain LAN or itself encapsulated
PATHS = [path(eg, LAN) for eg in LAYERS.values()] + [path(LAN, eg) for eg in LAYERS.values()] + [
    path(LAYERS["qinq"], LAYERS["lan-vlan"]), path(LAYERS["pppoe-dev"], LAYERS["vlan"])]


def reference(conns: list[Conn], paths: list[tuple]) -> tuple[bytes, bytes, list]:
    keys, values, kbs = pack_entries(entry_fields(c, p) for c, p in zip(conns, paths, strict=True))
    return b"".join(keys), b"".join(values), kbs


def packed(conns: list[Conn], paths: list[tuple]) -> tuple[bytes, bytes, list]:
    out = pack_conns(conns, paths)
    assert out is not None, "C refused a batch the Python packer packs"
    keys, values, kbs = out
    return b"".join(keys), b"".join(values), kbs


def assert_same(conns: list[Conn], paths: list[tuple]) -> None:
    want_k, want_v, want_kbs = reference(conns, paths)
    got_k, got_v, got_kbs = packed(conns, paths)
    assert len(got_k) == 2 * len(conns) * KEY_SIZE and len(got_v) == 2 * len(conns) * FLOW_SIZE
    for i in range(2 * len(conns)):  # entry by entry first: a failure names the entry
        c, d = conns[i // 2], ("orig", "reply")[i % 2]
        k, v = slice(i * KEY_SIZE, (i + 1) * KEY_SIZE), slice(i * FLOW_SIZE, (i + 1) * FLOW_SIZE)
        assert got_k[k] == want_k[k], (c, d, "key")
        assert got_v[v] == want_v[v], (c, d, "value")
    assert got_kbs == want_kbs


@pytest.mark.parametrize("p", PATHS, ids=lambda p: f"{p[2].ifindex}-{p[3].ifindex}")
def test_every_connection_on_each_path(p):
    assert_same(CONNS, [p] * len(CONNS))


def test_paths_mixed_in_one_batch():
    pairs = list(itertools.product(CONNS, PATHS))
    random.Random(7).shuffle(pairs)
    assert_same([c for c, _ in pairs], [p for _, p in pairs])


def test_random_connections():
    rnd = random.Random(11)
    conns, paths = [], []
    for _ in range(600):
        if rnd.random() < 0.5:
            addr = [str(ipaddress.IPv4Address(rnd.getrandbits(32))) for _ in range(4)]
            family = V4
        else:
            addr = [str(ipaddress.IPv6Address(rnd.getrandbits(128))) for _ in range(4)]
            family = V6
        port = [rnd.randrange(65536) for _ in range(4)]
        if rnd.random() < 0.3:  # no NAT
            addr[2], addr[3], port[2], port[3] = addr[1], addr[0], port[1], port[0]
        conns.append(conn(family, rnd.choice([TCP, UDP]), (addr[0], addr[1], port[0], port[1]),
                          (addr[2], addr[3], port[2], port[3])))
        paths.append(rnd.choice(PATHS))
    assert_same(conns, paths)


def test_one_connection_and_none():
    assert_same(CONNS[:1], PATHS[:1])
    assert pack_conns([], []) == ([b""], [b""], [])


BAD = [
    # not an address; two families in one key
    conn(V4, TCP, ("198.18.0.300", "198.19.0.50", 1, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),
    conn(V4, TCP, ("198.18.0.1", "2001:2::1", 1, 2), ("2001:2::1", "198.18.0.1", 2, 1)),
    conn(V4, TCP, ("198.18.0.1", "198.19.0.50", 65536, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),  # port
    conn(V4, TCP, ("198.18.0.1", "198.19.0.50", -1, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),
    conn(V4, 256, ("198.18.0.1", "198.19.0.50", 1, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),  # protocol
    conn(V4, TCP, ("198.18.0.1\0", "198.19.0.50", 1, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),  # a NUL
    conn(V4, TCP, ("198.18.0.1", "198.19.0.50", 1, 2), ("198.19.0.50\0198.18.0.2", "198.18.0.1", 2, 1)),
    conn(V4, TCP, (ipaddress.ip_address("198.18.0.1"), "198.19.0.50", 1, 2),  # type: ignore[arg-type]
         ("198.19.0.50", "198.18.0.1", 2, 1)),
    conn(V4, TCP, ("198.18.0.1", "198.19.0.50", 1.0, 2), ("198.19.0.50", "198.18.0.1", 2, 1)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_input_c_cannot_take_goes_back_to_the_python_packer(bad):
    batch = [CONNS[0], bad, CONNS[2]]
    assert pack_conns(batch, [PATHS[0]] * 3) is None


def test_a_path_the_packer_refuses_goes_back_to_it():
    broken = path(replace(PLAIN, vlan_inner_tci=5), LAN)  # an inner tag without an outer one
    assert pack_conns(CONNS[:2], [PATHS[0], broken]) is None
    with pytest.raises(ValueError):
        reference(CONNS[:2], [PATHS[0], broken])


def test_lengths_must_match():
    with pytest.raises(ValueError):
        pack_conns(CONNS[:2], PATHS[:1])
