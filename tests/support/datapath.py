"""pyflow.datapath.loader against real devices: the kernel's view read without the loader,
and the fixtures the loader tests share (a namespace with veths, a pin directory, a
factory of Datapath instances, a routed three-namespace line).

The readers use iproute2 and bpftool, never the loader, so a test compares what the
loader reports with what the kernel holds.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import pytest

from pyflow.datapath import abi
from pyflow.datapath.loader import TC_PRIO, Datapath
from tests import netns
from tests.pins import remove_pin_dir

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


@pytest.fixture
def routed(pin_dir, tmp_path):
    """h1 (198.18.1.2) -- pft-r1 [r] pft-r2 -- h2 (198.18.2.2), with forwarding OFF on
    the router: whatever reaches h2 went through the fast path."""
    with netns.namespaces("h1", "r", "h2") as (h1, r, h2):
        netns.veth(h1, "pft-h1", r, "pft-r1")
        netns.veth(r, "pft-r2", h2, "pft-h2")
        netns.addr(h1, "pft-h1", "198.18.1.2/24")
        netns.addr(r, "pft-r1", "198.18.1.1/24")
        netns.addr(r, "pft-r2", "198.18.2.1/24")
        netns.addr(h2, "pft-h2", "198.18.2.2/24")
        netns.run(h1, "ip route add default via 198.18.1.1")
        netns.run(h2, "ip route add default via 198.18.2.1")
        netns.run(r, "sysctl -qw net.ipv4.ip_forward=0")
        # local sockets leave CHECKSUM_PARTIAL that XDP loses -> tx csum off;
        # an XDP redirect into a veth is delivered only with NAPI (GRO) on the peer
        netns.run(h1, "ethtool -K pft-h1 tx off")
        netns.run(h2, "ethtool -K pft-h2 gro on")
        netns.run(h1, ["ip", "neigh", "replace", "198.18.1.1", "lladdr", netns.mac(r, "pft-r1"),
                       "dev", "pft-h1", "nud", "permanent"])
        with netns.inside(r):
            dp = Datapath(pin_dir, state_file=str(tmp_path / "state.json"))
            try:
                yield h1, r, h2, dp
            finally:
                dp.close()
