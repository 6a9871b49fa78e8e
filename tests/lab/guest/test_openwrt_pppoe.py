"""The OpenWrt-shaped router (openwrt.py) in `make lab`: the topology itself, and pyflow
carrying one IPv4 TCP upload from a bridged LAN client over VLAN 7 and PPPoE, byte-exact and
off the forward chain. The full side-by-side with the kernel's flowtable is test_openwrt.py
(`make lab-parity`)."""

from __future__ import annotations

import json

import pytest

from tests.lab.guest.lab import lab_log
from tests.lab.guest.openwrt import PPP, PPP_MTU, V4, V6, WAN_VLAN, lab_openwrt
from tests.lab.guest.openwrt_systems import PyflowDaemon
from tests.lab.guest.test_openwrt import MIB, tcp

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def topo():
    with lab_openwrt("openwrt") as t:
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


def test_pyflow_offloads_a_bridged_clients_upload_over_vlan_and_pppoe(topo, tmp_path):
    """c2 (behind lan2 of br-lan) uploads to the internet host: pyflowd manages lan1, lan2 and
    wan only, so it must resolve br-lan down to lan2 and pppoe-wan down to wan with VLAN 7
    and the session. Byte-exact, listed as offloaded, and under 5% of the bytes through the
    router's forward chain. 4 MiB: under emulation the offload comes about 100 KB into the
    upload (the conntrack events and the control plane run at a fraction of native speed),
    which a shorter transfer would count against the 5%."""
    lab_log("openwrt: starting pyflowd on lan1, lan2, wan")
    pyflow = PyflowDaemon(topo, tmp_path)
    try:
        lab_log(f"openwrt: pyflowd ready in {pyflow.start_s:.0f} s")
        out = tcp(topo, pyflow, family=4, client="c2", port=5051, upload=True, size=4 * MIB, timeout=240)
        lab_log(f"openwrt: pyflow upload over VLAN 7 + PPPoE: {out.slow_path_bytes} of {out.bytes} bytes "
                f"through the forward chain")
        stats = pyflow.stats()
    finally:
        pyflow.close()
    assert out.exact, out
    assert out.seen_offloaded and out.offloaded, (out, stats)


def test_a_redial_gets_a_new_session(topo):
    old, new = topo.redial()
    assert new.sid != old.sid and new.ac_mac == old.ac_mac, (old, new)
    res = topo.sh("c2", ["ping", "-c", "1", "-W", "5", V6["inet"]], check=False)
    assert res.returncode == 0, res.stdout
