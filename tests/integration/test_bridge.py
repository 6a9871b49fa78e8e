"""Bridge ports (pyflow.control.bridge.BridgePorts) and FDB changes (PathWatcher) on a real bridge.

One namespace holds a bridge pft-br with ports pft-l1 and pft-l2 (veth pairs whose other
ends, pft-p1 and pft-p2, stay outside the bridge). FDB entries are made with bridge(8)
(static ones: deterministic) or learned from a frame sent on a port's peer. This kernel has
no bridge VLAN filtering; the VLAN rules are tested on decoded messages in
tests/unit/test_bridge_ports.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyflow.control import model
from pyflow.control.bridge import BridgePort, BridgePorts
from pyflow.control.model import NoPath, NotYet
from pyflow.control.paths import PathWatcher
from tests import netns

pytestmark = pytest.mark.root

CLIENT = "02:00:5e:10:01:01"
OTHER = "02:00:5e:10:01:02"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass
class Lan:
    ns: str
    br: int
    l1: int
    l2: int

    def sh(self, cmd: str) -> None:
        netns.run(self.ns, cmd)


@pytest.fixture
def lan() -> Iterator[Lan]:
    ns = netns.create(netns.unique("brp"))
    try:
        for cmd in ("ip link add pft-br type bridge", "ip link set pft-br up",
                    "ip link add pft-l1 type veth peer name pft-p1",
                    "ip link add pft-l2 type veth peer name pft-p2",
                    "ip link set pft-l1 master pft-br", "ip link set pft-l2 master pft-br",
                    "ip link set pft-l1 up", "ip link set pft-l2 up",
                    "ip link set pft-p1 up", "ip link set pft-p2 up"):
            netns.run(ns, cmd)
        yield Lan(ns, *(netns.ifindex(ns, d) for d in ("pft-br", "pft-l1", "pft-l2")))
    finally:
        netns.remove(ns)


def _fdb_changes(w: PathWatcher, expect: int = 1, timeout: float = 3.0) -> list[tuple[str, int, str | None]]:
    """The FDB changes the watcher reports about the client's MAC: until ``expect`` came (then
    0.2 s more, to see any extra one) or timeout passed (a loaded machine may deliver a learned
    frame late). Only the client's: the bridge also learns the ports' peers from their own
    frames (IPv6 DAD, router solicitations) whenever those happen to be sent."""
    out: list[tuple[str, int, str | None]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out += [c for c in w.poll(0.05) if c[0] == "fdb" and (c[2] or "").split()[0] == CLIENT]
        if len(out) >= expect:
            deadline = min(deadline, time.monotonic() + 0.2)
    return out


def test_port_follows_the_fdb_and_moves_are_reported_once(lan: Lan) -> None:
    with netns.inside(lan.ns):
        ports, watch = BridgePorts(), PathWatcher()
    try:
        with pytest.raises(NotYet):
            ports.port_of(lan.br, _mac(CLIENT), None)  # not learned: the bridge floods it
        lan.sh(f"bridge fdb add {CLIENT} dev pft-l1 master static")
        got = ports.port_of(lan.br, _mac(CLIENT), None)
        assert got == BridgePort(lan.l1, "pft-l1", None, mtu=1500)
        assert _fdb_changes(watch) == [("fdb", lan.br, CLIENT)]  # first seen

        lookups = ports.lookups
        assert ports.port_of(lan.br, _mac(CLIENT), None) == got
        assert ports.lookups == lookups  # answered from the cache

        lan.sh(f"bridge fdb replace {CLIENT} dev pft-l2 master static")  # the client roamed
        assert ports.port_of(lan.br, _mac(CLIENT), None).ifindex == lan.l2
        assert _fdb_changes(watch) == [("fdb", lan.br, CLIENT)]

        lan.sh(f"bridge fdb replace {CLIENT} dev pft-l2 master static")  # same port: nothing moved
        assert _fdb_changes(watch, expect=0, timeout=0.5) == []

        lan.sh(f"bridge fdb del {CLIENT} dev pft-l2 master")
        assert _fdb_changes(watch) == [("fdb", lan.br, CLIENT)]
        with pytest.raises(NotYet):
            ports.port_of(lan.br, _mac(CLIENT), None)
    finally:
        ports.close()
        watch.close()


def test_a_learned_move_is_reported_and_answered(lan: Lan) -> None:
    """A MAC learned from frames on pft-l1, then seen on pft-l2 (a client on another port)."""
    def send_from(ifname: str) -> None:
        with netns.inside(lan.ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((ifname, 0))
            # broadcast, from the client's MAC, a local-experimental EtherType
            s.send(b"\xff" * 6 + _mac(CLIENT) + b"\x88\xb5" + bytes(46))
        finally:
            s.close()

    with netns.inside(lan.ns):
        ports, watch = BridgePorts(), PathWatcher()
    try:
        send_from("pft-p1")
        assert _fdb_changes(watch) == [("fdb", lan.br, CLIENT)]
        assert ports.port_of(lan.br, _mac(CLIENT), None).ifindex == lan.l1
        send_from("pft-p1")  # the same port again: a refresh, not a change
        assert _fdb_changes(watch, expect=0, timeout=0.5) == []
        send_from("pft-p2")
        assert _fdb_changes(watch) == [("fdb", lan.br, CLIENT)]
        assert ports.port_of(lan.br, _mac(CLIENT), None).ifindex == lan.l2
    finally:
        ports.close()
        watch.close()


def test_refusals_have_fixed_codes(lan: Lan) -> None:
    with netns.inside(lan.ns):
        ports = BridgePorts()
    try:
        l1_mac = _mac(netns.run(lan.ns, "cat /sys/class/net/pft-l1/address").stdout.strip())
        with pytest.raises(NoPath) as exc:
            ports.port_of(lan.br, l1_mac, None)  # a port's own address: the host's
        assert exc.value.code == model.BRIDGE_LOCAL_MAC

        with pytest.raises(NoPath) as exc:
            ports.port_of(lan.l1, _mac(CLIENT), None)
        assert exc.value.code == model.NOT_A_BRIDGE

        with pytest.raises(NoPath) as exc:
            ports.port_of(999999, _mac(CLIENT), None)
        assert exc.value.code == model.DEVICE_GONE

        with pytest.raises(NoPath) as exc:
            ports.port_of(lan.br, _mac(CLIENT), 4095)
        assert exc.value.code == model.VLAN_UNSUPPORTED

        lan.sh(f"bridge fdb add {CLIENT} dev pft-l1 master static")
        lan.sh(f"bridge fdb add {OTHER} dev pft-l2 master static")
        assert ports.port_of(lan.br, _mac(CLIENT), None).ifindex == lan.l1

        lan.sh("ip link set pft-p1 down")  # pft-l1 loses carrier
        with pytest.raises(NoPath) as exc:
            ports.port_of(lan.br, _mac(CLIENT), None)
        assert exc.value.code == model.DEVICE_DOWN

        lan.sh("bridge link set dev pft-l2 state 0")  # spanning tree: disabled
        with pytest.raises(NoPath) as exc:
            ports.port_of(lan.br, _mac(OTHER), None)
        assert exc.value.code == model.BRIDGE_PORT_BLOCKED
        lan.sh("bridge link set dev pft-l2 state 3")
        assert ports.port_of(lan.br, _mac(OTHER), None).ifindex == lan.l2

        with pytest.raises(ValueError):
            ports.port_of(lan.br, b"\x02\x00", None)
    finally:
        ports.close()


def test_a_tagged_frame_keeps_its_tag_without_vlan_filtering(lan: Lan) -> None:
    with netns.inside(lan.ns):
        ports = BridgePorts()
    try:
        lan.sh(f"bridge fdb add {CLIENT} dev pft-l1 master static")
        # vlan_tpid 0: the tag keeps the protocol it entered the bridge with (the VLAN device's)
        assert ports.port_of(lan.br, _mac(CLIENT), 10) == BridgePort(lan.l1, "pft-l1", 10, 0, mtu=1500)
    finally:
        ports.close()
