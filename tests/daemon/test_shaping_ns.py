"""pyflowd and traffic shaping on the host kernel (htb, tbf, pfifo, ifb; this kernel has
no cake, fq_codel or matchall: the kernel lab's tests/lab/guest/test_sqm.py runs cake).

A real pyflowd in r1 of the integration topology, its uplink pft-r1-up shaped with htb at
SHAPED_MBIT: the shaping is seen and shown (pyflowctl devices, /metrics), XDP is ruled out
(auto takes TC and says why, an explicit XDP mode is refused and leaves nothing behind), a
qdisc change while it runs is noticed both ways, an ingress redirected to an IFB leaves the
device to the kernel path, and an offloaded upload through the shaped uplink runs at the
shaped rate, every segment through the htb class, counted on the fast path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests import netns
from tests.daemon.process import Pyflowd
from tests.support.topology import LAN, UP, UP2, V4, topology
from tests.support.traffic import payload, tcp_transfer, wait_for

pytestmark = pytest.mark.root

SHAPED_MBIT = 20
IFB = "pft-r1-ifb"
# pyflowd re-reads qdiscs every 2 s (pyflow.daemon.shaping.CHECK_INTERVAL_S); the loop applies
# the change at once: a change must show well within this
NOTICE_S = 10.0


def shape(topo, dev: str = UP, mbit: int = SHAPED_MBIT) -> None:
    """htb with one class at ``mbit`` and a short pfifo under it (this kernel has no fq_codel
    or sfq: the lab runs cake)."""
    topo.sh("r1", f"tc qdisc replace dev {dev} root handle 1: htb default 10")
    topo.sh("r1", f"tc class add dev {dev} parent 1: classid 1:10 htb rate {mbit}mbit ceil {mbit}mbit")
    topo.sh("r1", f"tc qdisc add dev {dev} parent 1:10 pfifo limit 100")


def unshape(topo, dev: str = UP) -> None:
    topo.sh("r1", f"tc qdisc del dev {dev} root", check=False)


def hook(topo, dev: str) -> str:
    link = netns.run(topo.r1, f"ip -d link show dev {dev}").stdout
    tc = netns.run(topo.r1, f"tc filter show dev {dev} ingress", check=False).stdout
    return "xdp" if "prog/xdp" in link else "tc" if "pyflow_tc" in tc else "none"


def devices(d) -> dict[str, dict]:
    return {x["name"]: x for x in d.json("devices")["devices"]}


@pytest.fixture(scope="module")
def env():
    with topology(nat=True) as topo:
        shape(topo)
        work = Path(tempfile.mkdtemp(prefix="pft-shaping-"))
        os.chmod(work, 0o755)
        d = Pyflowd(topo, work)
        try:
            d.start()
            yield topo, d
        finally:
            d.cleanup()
            topo.sh("r1", f"ip link del {IFB}", check=False)
            shutil.rmtree(work, ignore_errors=True)


def test_shaping_is_seen_and_auto_keeps_to_tc(env):
    topo, d = env
    devs = devices(d)
    up, lan = devs[UP], devs[LAN]
    assert up["shaping"]["egress"] == ["htb"] and up["shaping"]["ingress_redirect"] is None
    assert up["shaping"]["treatment"] == {"egress": "tc_only"}
    assert lan["shaping"] == {}
    why = f"egress shaped on {UP} (htb)"
    assert lan["xdp_ruled_out"].startswith(why)
    assert why in lan["reason"] and why in up["reason"]  # veth: TC anyway, and it says XDP is out too
    assert (hook(topo, LAN), hook(topo, UP)) == ("tc", "tc")
    human = d.ctl("devices").stdout
    assert "egress htb: tc only" in human and f"no XDP on any device: {why}" in human
    m = d.scrape()
    assert m[f'pyflow_shaped_devices{{device="{UP}",shaping="egress",treatment="tc_only"}}'] == 1
    assert not any(k.startswith("pyflow_shaped_devices") and LAN in k for k in m)


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_explicit_xdp_is_refused_and_nothing_changes(env, mode):
    topo, d = env
    res = d.ctl("add-device", UP2, "--mode", mode, check=False)
    assert res.returncode != 0
    assert f"{UP2}: {mode} XDP refused: egress shaped on {UP} (htb)" in res.stderr
    assert "--mode tc" in res.stderr and "\n" not in res.stderr.strip()
    assert hook(topo, UP2) == "none" and UP2 not in devices(d)


def test_a_qdisc_change_is_noticed_both_ways(env):
    topo, d = env
    try:
        unshape(topo)
        assert wait_for(lambda: devices(d)[LAN]["xdp_ruled_out"] is None, NOTICE_S)
        assert devices(d)[UP]["shaping"] == {}
        d.ctl("add-device", UP2, "--mode", "generic")
        assert hook(topo, UP2) == "xdp"
        # shaping comes back while UP2 runs XDP: it is taken off (its flows to the kernel path)
        shape(topo)
        assert wait_for(lambda: devices(d)[UP2]["state"] == "failed", NOTICE_S), devices(d)[UP2]
        row = devices(d)[UP2]
        assert row["error"].startswith(f"{UP2}: generic XDP refused: egress shaped on {UP} (htb)")
        assert hook(topo, UP2) == "none"
        assert devices(d)[LAN]["xdp_ruled_out"] is not None and hook(topo, LAN) == "tc"
        # and goes again: the explicit mode is back
        unshape(topo)
        assert wait_for(lambda: devices(d)[UP2]["state"] == "attached", NOTICE_S), devices(d)[UP2]
        assert devices(d)[UP2]["mode"] == "generic" and hook(topo, UP2) == "xdp"
    finally:
        d.ctl("del-device", UP2, check=False)
        shape(topo)
        wait_for(lambda: devices(d)[LAN]["xdp_ruled_out"] is not None, NOTICE_S)
    assert hook(topo, UP2) == "none"


def test_an_ingress_redirected_to_an_ifb_is_left_to_the_kernel_path(env):
    topo, d = env
    topo.sh("r1", f"ip link add {IFB} type ifb")
    topo.sh("r1", f"ip link set {IFB} up")
    topo.sh("r1", f"tc qdisc add dev {IFB} root tbf rate 10mbit burst 20k latency 50ms")
    topo.sh("r1", f"tc qdisc add dev {UP2} handle ffff: ingress")
    topo.sh("r1", f"tc filter add dev {UP2} parent ffff: protocol all prio 10 u32 match u32 0 0 "
                  f"flowid 1:1 action mirred egress redirect dev {IFB}")
    try:
        out = d.json("add-device", UP2)
        assert out["state"] == "kernel-path" and out["mode"] is None
        assert out["shaping"]["ingress_redirect"] == f"egress redirect to {IFB} (u32)"
        assert out["shaping"]["treatment"] == {"ingress_redirect": "kernel_path"}
        assert "left" not in (out["error"] or "") and IFB in out["reason"] and "kernel" in out["reason"]
        assert hook(topo, UP2) == "none"
        assert "ingress to pft-r1-ifb: kernel path" in d.ctl("devices").stdout
        m = wait_for(lambda: d.scrape().get(
            f'pyflow_shaped_devices{{device="{UP2}",shaping="ingress_redirect",treatment="kernel_path"}}'), 5)
        assert m == 1
        # the redirect goes: the device gets its hook
        topo.sh("r1", f"tc qdisc del dev {UP2} ingress")
        assert wait_for(lambda: devices(d)[UP2]["state"] == "attached", NOTICE_S), devices(d)[UP2]
        assert hook(topo, UP2) == "tc"
    finally:
        d.ctl("del-device", UP2, check=False)
        topo.sh("r1", f"tc qdisc del dev {UP2} ingress", check=False)
    assert hook(topo, UP2) == "none"


def htb_sent_bytes(topo, dev: str = UP) -> int:
    """Bytes the htb class 1:10 sent (this tc prints classes as text only)."""
    out = netns.run(topo.r1, f"tc -s class show dev {dev} classid 1:10").stdout
    m = re.search(r"Sent (\d+) bytes", out)
    assert m, out
    return int(m.group(1))


def test_an_offloaded_upload_keeps_the_shaped_rate(env):
    """cl -> sv through pft-r1-up (MTU 1400: 1348-byte segments, 1414-byte frames) shaped
    at SHAPED_MBIT by htb, offloaded by pyflow's TC hook on the LAN port."""
    topo, d = env
    port, size = 5201, 12 * (1 << 20)
    before = d.scrape()
    sent_before = htb_sent_bytes(topo)
    at_gate: list[tuple[float, int]] = []

    def gate():
        assert wait_for(lambda: d.flow_on(port), 10), "not offloaded"
        at_gate.append((time.monotonic(), htb_sent_bytes(topo)))

    t = tcp_transfer(topo.sv, V4["sv"], port, topo.cl, V4["sv"], port, payload(size, port), gate=gate,
                     gate_after=256 * 1024, timeout=60)
    end, sent_end = time.monotonic(), htb_sent_bytes(topo)
    assert t.received == size and t.sent_sha == t.received_sha
    # the rate out of the shaper once offloaded (the sender waited at the gate before)
    wire_mbit = (sent_end - at_gate[0][1]) * 8 / (end - at_gate[0][0]) / 1e6
    after = d.scrape()
    fast = after["pyflow_fastpath_packets_total"] - before.get("pyflow_fastpath_packets_total", 0)
    segments = size // 1348
    through_htb = sent_end - sent_before
    print(f"\nshaped {SHAPED_MBIT} Mbit/s (htb), offloaded upload: {wire_mbit:.2f} Mbit/s out of the "
          f"shaper after the gate ({t.received * 8 / t.seconds / 1e6:.2f} goodput overall, gate wait "
          f"included) in {t.seconds:.2f} s; fast path {fast:.0f} "
          f"packets for {segments} segments; {through_htb} bytes through the htb class")
    assert abs(wire_mbit - SHAPED_MBIT) <= 0.05 * SHAPED_MBIT
    # every data segment left through the shaper; most were forwarded by the fast path (it counts
    # packets as it sees them: a GRO super-packet is one)
    assert through_htb >= size
    assert fast > 0 and after["pyflow_offloads_total"] > before.get("pyflow_offloads_total", 0)
