"""The OpenWrt-shaped router (openwrt.py) in `make lab`: the topology itself, and pyflow
carrying one IPv4 TCP upload from a bridged LAN client over VLAN 7 and PPPoE, byte-exact and
off the forward chain. The full side-by-side with the kernel's flowtable is test_openwrt.py
(`make lab-parity`)."""

from __future__ import annotations

import json

import pytest

from tests.lab.guest.lab import lab_log, require_modules
from tests.lab.guest.openwrt import PPP, PPP_MTU, V4, V6, WAN_VLAN, missing_tools, openwrt

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def topo():
    require_modules("pppoe", "8021q", "bridge")
    why = missing_tools()
    if why:
        pytest.skip(why)
    lab_log("openwrt: building the topology and dialing PPPoE")
    with openwrt() as t:
        lab_log(f"openwrt: session {t.session}, {t.timings}")
        yield t


def test_the_router_is_shaped_like_openwrt(topo):
    sess = topo.session
    assert sess is not None and sess.sid > 0 and sess.device == WAN_VLAN, sess
    link = json.loads(topo.sh("rt", ["ip", "-j", "-d", "link", "show", PPP]).stdout)[0]
    assert link["mtu"] == PPP_MTU, link
    for role in ("c1", "c2"):
        for addr in (V4["inet"], V6["inet"]):
            res = topo.sh(role, ["ping", "-c", "1", "-W", "5", addr], check=False)
            assert res.returncode == 0, (role, addr, res.stdout, res.stderr, topo.ppp_logs())
    res = topo.sh("c1", ["ping", "-c", "1", "-W", "5", "-I", V4["c1_vlan"], V4["inet"]], check=False)
    assert res.returncode == 0, res.stdout
    vlan_fdb = json.loads(topo.sh("rt", ["bridge", "-j", "fdb", "show", "br", "br-lan"]).stdout)
    assert any(e.get("vlan") == 20 and e.get("ifname") == "lan1" for e in vlan_fdb), vlan_fdb
    assert topo.fdb_port() == "lan1"
    topo.roam("lan2")
    assert topo.fdb_port() == "lan2"
    topo.roam("lan1")
    assert topo.fdb_port() == "lan1"


def test_a_redial_gets_a_new_session(topo):
    old, new = topo.redial()
    assert new.sid != old.sid and new.ac_mac == old.ac_mac, (old, new)
    res = topo.sh("c2", ["ping", "-c", "1", "-W", "5", V6["inet"]], check=False)
    assert res.returncode == 0, res.stdout
