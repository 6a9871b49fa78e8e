"""Tracking ensured, on a real kernel: a routed namespace whose ruleset has no ct rule
tracks nothing (conntrack hooks into a namespace only when something there uses it), so
without pyflowd's own table nothing could be offloaded. pyflowd, given nothing but the
devices, makes conntrack track; forwarded IPv4 and IPv6 TCP is offloaded byte-exact and
bypasses the forward chain (counted by a rule of the operator's table that does not use
conntrack); after pyflowd stops its table is gone and the operator's ruleset is as it was.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests import netns
from tests.daemon.process import Pyflowd
from tests.support.router import MIB
from tests.support.topology import LAN, UP, V4, V6, Topology, network, router_spec
from tests.support.traffic import payload, tcp_transfer, wait_for

# The operator's ruleset: a forward-chain counter of TCP, and nothing that uses conntrack
# (no ct match, no NAT): on such a box conntrack tracks nothing by itself.
NO_CT_RULES = """
table inet pft {
    counter fwd_tcp {
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        meta l4proto tcp counter name fwd_tcp
    }
}
"""
TABLE = "pyflow_conntrack"


def _ruleset(ns: str) -> list:
    """r1's ruleset as nft lists it, counter values left out (traffic changes them)."""
    out = json.loads(netns.run(ns, ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("packets", "bytes")}
        if isinstance(node, list):
            return [strip(n) for n in node]
        return node

    return [strip(item) for item in out if "metainfo" not in item]


def _tables(ns: str) -> set[str]:
    return {item["table"]["name"] for item in _ruleset(ns) if "table" in item}


def _entries(ns: str) -> int:
    return int(netns.run(ns, ["conntrack", "-C"]).stdout.strip() or 0)


@pytest.fixture
def box():
    """The control-plane topology without NAT, r1's ruleset without any ct rule."""
    if shutil.which("nft") is None or shutil.which("conntrack") is None:
        pytest.skip("needs the nft and conntrack commands")
    spec = replace(router_spec(nat=False), nft={"r1": NO_CT_RULES})
    with network(spec) as net:
        topo = Topology(**net.ns)
        work = Path(tempfile.mkdtemp(prefix="pft-tracking-"))
        d = Pyflowd(topo, work, devices=((LAN, "auto"), (UP, "auto")))
        try:
            yield topo, d
        finally:
            d.cleanup()
            shutil.rmtree(work, ignore_errors=True)


def _transfer(topo, d, family: int, port: int, size: int):
    addrs = V4 if family == 4 else V6
    seen: dict = {}

    def gate():
        seen["flow"] = wait_for(lambda: d.flow_on(port), 10)

    res = tcp_transfer(topo.sv, addrs["sv"], port, topo.cl, addrs["sv"], port, payload(size, port),
                       upload=True, gate=gate)
    return res, seen.get("flow")


def test_a_box_without_ct_rules_gets_its_flows_offloaded_and_its_ruleset_back(box):
    topo, d = box
    size = 8 * MIB
    before = _ruleset(topo.r1)
    # the premise: this box tracks nothing by itself
    res = tcp_transfer(topo.sv, V4["sv"], 5600, topo.cl, V4["sv"], 5600, payload(256 * 1024), upload=True)
    assert res.received_sha == res.sent_sha
    assert _entries(topo.r1) == 0, "conntrack tracks on r1 without any ct rule: the test proves nothing"

    d.start()
    try:
        st = d.json("status")["tracking"]
        assert st == {"wanted": True, "ensured": True, "on": True, "source": "pyflow", "error": None}
        assert TABLE in _tables(topo.r1)
        metrics = d.scrape()
        assert metrics["pyflow_conntrack_tracking"] == 1 and metrics["pyflow_conntrack_tracking_ensured"] == 1
        for family, port in ((4, 5601), (6, 5602)):
            fwd_before = topo.nft_counter("fwd_tcp")[1]
            fast_before = d.json("stats")["fast_path"]["bytes"]
            res, flow = _transfer(topo, d, family, port, size)
            assert flow is not None, f"IPv{family} connection never offloaded: {d.json('stats')['engine']}"
            assert res.received == size and res.received_sha == res.sent_sha
            fwd = topo.nft_counter("fwd_tcp")[1] - fwd_before
            fast = d.json("stats")["fast_path"]["bytes"] - fast_before
            print(f"IPv{family}: forward chain {fwd} bytes, fast path {fast} bytes of {size}")
            # the forward chain saw the handshake, the first 64 KiB and the close only
            assert fwd < size // 20, (family, fwd, fast)
            assert fast > size * 0.9, (family, fwd, fast)
    finally:
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.log.read_text()
    log = d.log.read_text()
    assert f"table inet {TABLE} added" in log and f"table inet {TABLE} removed" in log
    assert _ruleset(topo.r1) == before  # pyflowd's table gone, the operator's untouched


def test_opted_out_adds_nothing_and_says_tracking_is_off(box):
    topo, d = box
    d.write_config(devices=((LAN, "auto"), (UP, "auto")), extra="ensure_conntrack = false\n")
    before = _ruleset(topo.r1)
    d.start()
    try:
        st = d.json("status")["tracking"]
        assert st == {"wanted": False, "ensured": False, "on": False, "source": "none", "error": None}
        assert d.scrape()["pyflow_conntrack_tracking"] == 0
        assert _ruleset(topo.r1) == before
    finally:
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert "nothing will be offloaded" in d.log.read_text()


def test_a_restart_after_a_crash_replaces_the_table_and_the_last_device_removes_it(box):
    topo, d = box
    d.start()
    d.kill()  # SIGKILL: the table stays behind
    assert TABLE in _tables(topo.r1)
    d.write_config(devices=())
    d.start()  # no configured device: the predecessor's table goes
    try:
        assert TABLE not in _tables(topo.r1)
        assert d.json("status")["tracking"]["ensured"] is False
        d.ctl("add-device", LAN)
        names = [i["table"]["name"] for i in _ruleset(topo.r1) if "table" in i]
        assert names.count(TABLE) == 1 and d.json("status")["tracking"]["ensured"] is True
        d.ctl("del-device", LAN)
        assert TABLE not in _tables(topo.r1)
    finally:
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
