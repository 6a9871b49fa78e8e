"""pyflow.datapath.loader against real devices: the kernel's view read without the loader,
and the fixtures the loader tests share (a namespace with veths, a pin directory, a
factory of Datapath instances, a routed three-namespace line).

The readers use iproute2 and bpftool, never the loader, so a test compares what the
loader reports with what the kernel holds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator

import pytest

from pyflow.datapath import abi
from pyflow.datapath.loader import TC_PRIO, Datapath
from tests import netns
from tests.pins import remove_pin_dir
from tests.support import topology
from tests.support.topology import Spec, Veth

_pins = itertools.count()


# ---- the kernel's view, read without the loader -------------------------------------

def link_xdp(ns: str, ifname: str) -> tuple[int, int]:
    """(IFLA_XDP_ATTACHED mode, prog id) of a device; (0, 0) without XDP."""
    data = json.loads(netns.run(ns, ["ip", "-j", "-d", "link", "show", "dev", ifname]).stdout)[0]
    xdp = data.get("xdp") or {}
    return xdp.get("mode", 0), xdp.get("prog", {}).get("id", 0)


def ingress_filters(ns: str, ifname: str) -> list[dict]:
    res = netns.run(ns, ["tc", "-j", "filter", "show", "dev", ifname, "ingress"], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    return [f for f in json.loads(res.stdout) if "options" in f]


def our_filter(ns: str, ifname: str) -> dict | None:
    for f in ingress_filters(ns, ifname):
        if f.get("pref") == TC_PRIO and f["kind"] == "bpf":
            return f
    return None


def qdisc_kinds(ns: str, ifname: str) -> list[str]:
    res = netns.run(ns, ["tc", "-j", "qdisc", "show", "dev", ifname])
    return [q["kind"] for q in json.loads(res.stdout)]


def devmap(pin_dir: str) -> dict[int, int]:
    """slot -> ifindex from the pinned devmap, through bpftool."""
    out = json.loads(netns.run(None, ["bpftool", "map", "dump", "pinned",
                                      f"{pin_dir}/{abi.MAP_TX_PORTS}", "-j"]).stdout)

    def num(hexbytes: list[str]) -> int:
        return int.from_bytes(bytes(int(b, 16) for b in hexbytes), "little")

    return {num(e["key"]): num(e["value"]) for e in out if isinstance(e["value"], list)}


# ---- fixtures (offered to tests/datapath by its conftest) ---------------------------------

@pytest.fixture
def pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/pft-{os.getpid()}-{next(_pins)}"
    yield path
    remove_pin_dir(path)


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace with veth pft-a <-> pft-b and an ifb (no native XDP); the test
    thread runs inside it."""
    with netns.namespaces("ld") as (name,):
        netns.veth(name, "pft-a", name, "pft-b")
        netns.run(name, "ip link add pft-i type ifb")
        netns.run(name, "ip link set pft-i up")
        with netns.inside(name):
            yield name


@pytest.fixture
def make_dp(ns, pin_dir, tmp_path):
    made: list[Datapath] = []
    state = str(tmp_path / "state.json")

    def make(**kw) -> Datapath:
        dp = Datapath(pin_dir, state_file=kw.pop("state_file", state), **kw)
        made.append(dp)
        return dp

    make.state_file = state  # type: ignore[attr-defined]
    yield make
    for dp in made:
        dp.close()


def line_spec(*, far_side: bool) -> Spec:
    """h1 (198.18.1.2) -- pft-r1 [r] pft-r2 -- h2, the router's own forwarding off: whatever
    reaches h2 went through the fast path. With ``far_side`` the far link is addressed too
    (198.18.2.0/24, h2 routing back through r), h1 sends with transmit checksum offload off
    (local sockets leave CHECKSUM_PARTIAL, which XDP loses) and h2 runs GRO (an XDP redirect
    into a veth is delivered only with NAPI on the peer); without it both ends keep veth's
    defaults, as a test of those offloads needs."""
    near = [("h1", "pft-h1", "198.18.1.2/24"), ("r", "pft-r1", "198.18.1.1/24")]
    far = [("r", "pft-r2", "198.18.2.1/24"), ("h2", "pft-h2", "198.18.2.2/24")] if far_side else []
    return Spec(
        namespaces={"h1": "h1", "r": "r", "h2": "h2"},
        veths=(Veth("h1", "pft-h1", "r", "pft-r1", ethtool=("tx off" if far_side else None, None)),
               Veth("r", "pft-r2", "h2", "pft-h2", ethtool=(None, "gro on" if far_side else None))),
        addrs=near + far,
        routes=(("h1", "default", "198.18.1.1"),) + ((("h2", "default", "198.18.2.1"),) if far_side else ()),
        sysctls=(("r", "net.ipv4.ip_forward=0"),),
    )


@contextlib.contextmanager
def line(*, far_side: bool) -> Iterator[tuple[str, str, str]]:
    """The namespaces (h1, r, h2) of :func:`line_spec`, h1 sending to r's MAC without ARP."""
    with topology.network(line_spec(far_side=far_side)) as net:
        topology.static_neighbour(net, "h1", "pft-h1", "198.18.1.1", "r", "pft-r1")
        yield net.ns["h1"], net.ns["r"], net.ns["h2"]


@pytest.fixture
def routed(pin_dir, tmp_path):
    """The line (line_spec) with a Datapath made in r: h1, r, h2 and the Datapath."""
    with line(far_side=True) as (h1, r, h2), netns.inside(r):
        dp = Datapath(pin_dir, state_file=str(tmp_path / "state.json"))
        try:
            yield h1, r, h2, dp
        finally:
            dp.close()
