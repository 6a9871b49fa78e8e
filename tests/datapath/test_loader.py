"""pyflow.datapath.loader against real devices: veth pairs in namespaces this test creates.

The kernel's view is read independently of the loader wherever it matters:
``ip -j -d link`` for XDP, ``tc -j filter/qdisc`` for TC, ``bpftool map dump``
for the devmap, and rtnetlink events (in kernel order) to prove that a device
never went without a hook while it was being re-attached or switched.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from csrc import build_bpf
from pyflow.datapath import abi, bpfobject, bpfsource, netdev
from pyflow.datapath.loader import (
    PIN_TC,
    PIN_XDP,
    TC_HANDLE,
    TC_PARENT_INGRESS,
    TC_PRIO,
    Datapath,
)
from pyflow.errors import DatapathError, DeviceError
from tests import netns
from tests.support.datapath import devmap, ingress_filters, link_xdp, our_filter, qdisc_kinds

pytestmark = pytest.mark.root

XDP_ATTACHED_DRV, XDP_ATTACHED_SKB = 1, 2
ATTACHED = {"native": XDP_ATTACHED_DRV, "generic": XDP_ATTACHED_SKB}
RTM_NEWLINK, RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER = 16, 36, 37, 44, 45
_pins = itertools.count()


class RtnlRecorder:
    """Records link and tc rtnetlink events of a namespace, in the kernel's order.

    The reader thread makes its own socket inside the namespace (pyroute2's sync
    sockets belong to the thread that made them). It stops at a sentinel: an
    alias set on ``sentinel_if`` after the work, so every event of the work is in.
    """

    def __init__(self, ns: str, sentinel_if: str) -> None:
        self.ns, self.sentinel_if = ns, sentinel_if
        self.token = f"pft-end-{next(_pins)}"
        self.events: list = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_TC

        with netns.inside(self.ns):
            mon = IPRoute()
            mon.bind(groups=RTMGRP_LINK | RTMGRP_TC)
            self._ready.set()
            deadline = time.monotonic() + 120
            try:
                while time.monotonic() < deadline:
                    for msg in mon.get():
                        self.events.append(msg)
                        if (msg["header"]["type"] == RTM_NEWLINK
                                and msg.get_attr("IFLA_IFALIAS") == self.token):
                            return
            finally:
                mon.close()

    def __enter__(self) -> RtnlRecorder:
        self._thread.start()
        assert self._ready.wait(10), "event reader did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        netns.run(self.ns, ["ip", "link", "set", "dev", self.sentinel_if, "alias", self.token])
        self._thread.join(30)
        assert not self._thread.is_alive(), "sentinel event never arrived"

    def hooks(self, ifindex: int, xdp: int, tc: bool) -> list[tuple[str, int, bool]]:
        """Replay the device's hook state (XDP prog id, our TC filter present) event by event."""
        out = []
        for m in self.events:
            t = m["header"]["type"]
            if dict.get(m, "index") != ifindex:  # nlmsg.get() would look at attributes first
                continue
            if t == RTM_NEWLINK:
                x = m.get_attr("IFLA_XDP")
                xdp = (x.get_attr("IFLA_XDP_PROG_ID") or 0) if x is not None else 0
                out.append(("link", xdp, tc))
            elif t in (RTM_NEWTFILTER, RTM_DELTFILTER):
                if (m["handle"] == TC_HANDLE and m["info"] >> 16 == TC_PRIO
                        and m["parent"] == TC_PARENT_INGRESS):
                    tc = t == RTM_NEWTFILTER
                    out.append(("newfilter" if tc else "delfilter", xdp, tc))
            elif t == RTM_DELQDISC and m["handle"] == 0xFFFF0000:
                tc = False
                out.append(("delqdisc", xdp, tc))
        return out


# ---- attach in each mode ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["native", "generic", "tc"])
def test_attach_each_mode(make_dp, ns, mode):
    dp = make_dp()
    st = dp.attach("pft-a", mode)
    ifindex = netns.ifindex(ns, "pft-a")
    assert (st.ifname, st.ifindex, st.mode, st.slot) == ("pft-a", ifindex, mode, 0)
    if mode == "tc":
        assert link_xdp(ns, "pft-a") == (0, 0)
        f = our_filter(ns, "pft-a")
        assert f is not None, ingress_filters(ns, "pft-a")
        assert f["options"]["prog"]["id"] == dp.tc_prog_id == st.prog_id
        assert f["options"]["direct-action"] is True
        assert f["options"]["bpf_name"] == bpfsource.TC_FUNC
        assert "clsact" in qdisc_kinds(ns, "pft-a")
    else:
        assert link_xdp(ns, "pft-a") == (ATTACHED[mode], dp.xdp_prog_id)
        assert st.prog_id == dp.xdp_prog_id
        assert our_filter(ns, "pft-a") is None
    assert [(s.ifname, s.mode, s.prog_id, s.slot) for s in dp.status()] == [("pft-a", mode, st.prog_id, 0)]
    # without the kernel read: the same devices and modes, no program id
    assert [(s.ifname, s.mode, s.prog_id, s.slot) for s in dp.status(live=False)] == [("pft-a", mode, 0, 0)]
    # the programs are pinned next to the maps
    for pin in (PIN_XDP, PIN_TC, abi.MAP_FLOWS, abi.MAP_STATS, abi.MAP_TX_PORTS):
        assert os.path.exists(f"{dp.pin_dir}/{pin}")


# ---- atomic re-attach ----------------------------------------------------------------

def _upgraded(make_dp) -> Datapath:
    """A second instance on the same pin dir that loads programs of its own, as an upgraded
    daemon does: without the load record, nothing says the pinned programs are its own."""
    state = Path(make_dp.state_file)
    state.with_name(state.stem + ".progs.json").unlink()
    return make_dp()


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_xdp_reattach_replaces_without_gap(make_dp, ns, mode):
    """Two instances on one pin dir (as a restarting daemon would be) take turns
    replacing each other's program 20 times. A poller reading the link as fast as
    it can and the kernel's own event stream must never show the device without
    a program; every swap changes the id (A <-> B); the same instance
    re-attaching keeps its program (nothing to swap)."""
    from pyroute2 import IPRoute

    a, b = make_dp(), _upgraded(make_dp)
    assert a.xdp_prog_id != b.xdp_prog_id
    a.attach("pft-a", mode)
    ifindex = netns.ifindex(ns, "pft-a")
    samples: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with netns.inside(ns):
            ipr = IPRoute()
            try:
                while not stop.is_set() and len(samples) < 200_000:
                    x = ipr.link("get", index=ifindex)[0].get_attr("IFLA_XDP")
                    samples.append((x.get_attr("IFLA_XDP_PROG_ID") or 0) if x is not None else 0)
            finally:
                ipr.close()

    poller = threading.Thread(target=poll, daemon=True)
    with RtnlRecorder(ns, "pft-b") as rec:
        poller.start()
        while not samples:
            time.sleep(0.001)
        for i in range(20):
            (b if i % 2 == 0 else a).attach("pft-a", mode)
            time.sleep(0.002)  # let the poller see each program
        stop.set()
        poller.join(10)
    assert len(samples) > 20
    assert 0 not in samples, "the poller saw the device without an XDP program"
    assert set(samples) == {a.xdp_prog_id, b.xdp_prog_id}
    ids = [x for _, x, _ in rec.hooks(ifindex, a.xdp_prog_id, False)]
    assert 0 not in ids, "the kernel reported the device without an XDP program"
    swaps = [x for x, prev in zip(ids, [a.xdp_prog_id, *ids], strict=False) if x != prev]
    assert swaps == [b.xdp_prog_id, a.xdp_prog_id] * 10
    assert link_xdp(ns, "pft-a") == (ATTACHED[mode], a.xdp_prog_id)
    a.attach("pft-a", mode)  # same program again: stays, no event storm needed
    assert link_xdp(ns, "pft-a") == (ATTACHED[mode], a.xdp_prog_id)


def test_tc_reattach_replaces_without_gap(make_dp, ns):
    """The same for TC: the filter is replaced in place (one RTM_NEWTFILTER per
    swap, never a delete), and a poller never finds it missing."""
    from pyroute2 import IPRoute

    a, b = make_dp(), _upgraded(make_dp)
    assert a.tc_prog_id != b.tc_prog_id
    a.attach("pft-a", "tc")
    ifindex = netns.ifindex(ns, "pft-a")
    present: list[bool] = []
    stop = threading.Event()

    def poll() -> None:
        with netns.inside(ns):
            ipr = IPRoute()
            try:
                while not stop.is_set() and len(present) < 200_000:
                    msgs = ipr.get_filters(ifindex, parent=TC_PARENT_INGRESS)
                    present.append(any(m["handle"] == TC_HANDLE and m["info"] >> 16 == TC_PRIO
                                       for m in msgs))
            finally:
                ipr.close()

    poller = threading.Thread(target=poll, daemon=True)
    with RtnlRecorder(ns, "pft-b") as rec:
        poller.start()
        while not present:
            time.sleep(0.001)
        for i in range(20):
            (b if i % 2 == 0 else a).attach("pft-a", "tc")
            time.sleep(0.002)
            expect = b.tc_prog_id if i % 2 == 0 else a.tc_prog_id
            assert our_filter(ns, "pft-a")["options"]["prog"]["id"] == expect
        stop.set()
        poller.join(10)
    assert len(present) > 20 and all(present), "the poller found the TC filter missing"
    steps = rec.hooks(ifindex, 0, True)
    assert [s[0] for s in steps if s[0] != "link"] == ["newfilter"] * 20
    assert "clsact" in qdisc_kinds(ns, "pft-a")


def test_mode_switch_never_leaves_the_device_bare(make_dp, ns):
    """Every switch between the three modes, in the kernel's event order: after
    the first hook is in, at every event the device has our XDP program or our
    TC filter (new hook first, old one after; native <-> generic bridged by TC)."""
    dp = make_dp()
    ifindex = netns.ifindex(ns, "pft-a")
    sequence = ["tc", "native", "generic", "tc", "generic", "native", "tc"]
    with RtnlRecorder(ns, "pft-b") as rec:
        for mode in sequence:
            st = dp.attach("pft-a", mode)
            assert st.mode == mode
            xdp = link_xdp(ns, "pft-a")
            f = our_filter(ns, "pft-a")
            if mode == "tc":
                assert xdp == (0, 0) and f is not None
            else:
                assert xdp == (ATTACHED[mode], dp.xdp_prog_id) and f is None
                assert "clsact" not in qdisc_kinds(ns, "pft-a")  # ours, removed with the filter
    steps = rec.hooks(ifindex, 0, False)
    first = next(i for i, (_, x, t) in enumerate(steps) if x or t)
    bare = [s for s in steps[first:] if not s[1] and not s[2]]
    assert not bare, f"device without a hook at {bare} in {steps}"
    assert [s.slot for s in dp.status()] == [0]


# ---- auto -----------------------------------------------------------------------

def test_auto_picks_tc_for_veth_and_software_devices(make_dp, ns):
    """veth: packets from local sockets arrive as skbs; native XDP on a veth must
    copy each one into an XDP buffer, which measured slower than the kernel path
    for bulk TCP (4.2 vs 5.3 Gbit/s, docs/testing.md) while a TC ingress redirect
    matched it. So auto chooses tc, and says why. ifb is virtual too (a link
    kind); lo has neither a kind nor a bus device: tc by the last rule."""
    dp = make_dp()
    st = dp.attach("pft-a", "auto")
    assert st.mode == "tc" and "veth" in st.reason and "skb" in st.reason
    assert our_filter(ns, "pft-a") is not None and link_xdp(ns, "pft-a") == (0, 0)
    assert dp.attach("pft-i", "auto").mode == "tc"
    lo = dp.attach("lo", "auto")
    assert lo.mode == "tc" and "bus device" in lo.reason
    assert {s.ifname: s.reason for s in dp.status()}["pft-a"] == st.reason


def test_auto_rule_for_nics():
    """A device with a parent bus device and no link kind is a NIC: native."""
    nic = netdev.DeviceFacts("eth1", 5, None, "pci", "0000:03:00.0", "mlx5_core", None, 1500, None, 0)
    mode, why = netdev.choose_mode(nic)
    assert mode == "native" and "pci" in why and "mlx5_core" in why
    veth = netdev.DeviceFacts("v0", 6, "veth", None, None, "veth", None, 1500, None, 0)
    assert netdev.choose_mode(veth)[0] == "tc"


def test_auto_facts_of_this_hosts_devices():
    """Read-only: the host's own devices classify by the rule (nothing is attached)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.link("dump"):
            facts = netdev.facts_from_msg(msg)
            mode, _ = netdev.choose_mode(facts)
            expect = "native" if facts.parent_bus and not facts.kind else "tc"
            assert mode == expect, facts
            if facts.parent_bus:
                assert facts.driver, f"no driver found for {facts}"


def test_auto_falls_back_to_tc_when_the_driver_lacks_native_xdp(make_dp, ns, monkeypatch):
    """The rule says native for NICs, but a NIC driver may lack native XDP: the
    kernel's EOPNOTSUPP makes auto fall back to tc, and the reason says so. No
    such NIC here, so the rule is made to call the ifb a NIC."""
    monkeypatch.setattr(netdev, "choose_mode", lambda facts: ("native", "pretend NIC"))
    dp = make_dp()
    st = dp.attach("pft-i", "auto")
    assert st.mode == "tc"
    assert "no native XDP" in st.reason and "EOPNOTSUPP" in st.reason
    assert our_filter(ns, "pft-i") is not None and link_xdp(ns, "pft-i") == (0, 0)


# ---- tx-port slots ---------------------------------------------------------------------

def test_devmap_slots_follow_attach_and_detach(make_dp, ns):
    dp = make_dp()
    a, b, i = (netns.ifindex(ns, n) for n in ("pft-a", "pft-b", "pft-i"))
    assert dp.attach("pft-a", "native").slot == 0
    # a redirect target in tc mode still gets its slot: XDP elsewhere redirects into it
    assert dp.attach("pft-b", "tc").slot == 1
    assert devmap(dp.pin_dir) == {0: a, 1: b}
    dp.detach("pft-a")
    assert devmap(dp.pin_dir) == {1: b}
    assert dp.attach("pft-i", "tc").slot == 0  # lowest free slot
    assert devmap(dp.pin_dir) == {0: i, 1: b}
    assert dp.slot_of("pft-i") == 0 and dp.slot_of("pft-a") is None
    # a device that is only a redirect target
    assert dp.reserve_tx_port("pft-a") == 2
    assert devmap(dp.pin_dir) == {0: i, 1: b, 2: a}
    only = [s for s in dp.status() if s.ifname == "pft-a"]
    assert [(s.mode, s.slot, s.prog_id) for s in only] == [(None, 2, 0)]
    assert link_xdp(ns, "pft-a") == (0, 0)
    with pytest.raises(DeviceError, match="pft-b: attached"):
        dp.release_tx_port("pft-b")
    dp.release_tx_port("pft-a")
    assert devmap(dp.pin_dir) == {0: i, 1: b}
    dp.detach_all()
    assert devmap(dp.pin_dir) == {}
    assert dp.status() == []


# ---- detach --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["native", "generic", "tc"])
def test_detach_leaves_nothing(make_dp, ns, mode):
    dp = make_dp()
    dp.attach("pft-a", mode)
    dp.detach("pft-a")
    assert link_xdp(ns, "pft-a") == (0, 0)
    assert ingress_filters(ns, "pft-a") == []
    assert "clsact" not in qdisc_kinds(ns, "pft-a")
    assert devmap(dp.pin_dir) == {}
    assert dp.status() == []
    state = json.loads(Path(make_dp.state_file).read_text())
    assert state["devices"] == {} and state["slots"] == {}
    with pytest.raises(DeviceError, match=r"^pft-a: pyflow is not attached$"):
        dp.detach("pft-a")


def test_detach_removes_only_ours(make_dp, ns):
    """A foreign filter on the same clsact survives detach (and so does the
    qdisc that holds it); a foreign XDP program is never replaced."""
    netns.run(ns, "tc qdisc add dev pft-a clsact")
    netns.run(ns, "tc filter add dev pft-a ingress prio 5 u32 match u32 0 0 flowid 1:1")
    dp = make_dp()
    dp.attach("pft-a", "tc")
    assert len(ingress_filters(ns, "pft-a")) == 3  # u32 hash table + its rule + ours
    dp.detach("pft-a")
    left = ingress_filters(ns, "pft-a")
    assert left and all(f["kind"] == "u32" for f in left)
    assert "clsact" in qdisc_kinds(ns, "pft-a")

    from bcc import BPF

    other = BPF(text=b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = other.load_func(b"other_xdp", BPF.XDP)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=netns.ifindex(ns, "pft-b"),
                 xdp={"attrs": [("IFLA_XDP_FD", fn.fd), ("IFLA_XDP_FLAGS", 1 << 1)]})
    foreign = link_xdp(ns, "pft-b")
    assert foreign[1]
    with pytest.raises(DeviceError, match=r"^pft-b: runs another XDP program \(id \d+\), not replacing it$"):
        dp.attach("pft-b", "native")
    assert link_xdp(ns, "pft-b") == foreign
    assert devmap(dp.pin_dir) == {} and dp.status() == []
    other.cleanup()


# ---- adoption by a second process -------------------------------------------------------

def _flow(dp: Datapath, ns: str):
    key = abi.FlowKey(netns.ifindex(ns, "pft-a"), abi.PROTO_UDP, "198.18.1.2", "198.18.2.2", 40000, 5000)
    act = abi.FlowAction(out_ifindex=netns.ifindex(ns, "pft-b"), tx_port=1, mtu=1500,
                         in_mac="02:00:00:00:00:01", dmac="02:00:00:00:00:02", smac="02:00:00:00:00:03")
    k = dp.flows.Key.from_buffer_copy(abi.key_bytes(key))
    v = dp.flows.Leaf.from_buffer_copy(abi.value_bytes(act, key))
    return k, v


@pytest.mark.parametrize("first,second", [("prebuilt", "prebuilt"), ("bcc", "prebuilt"), ("prebuilt", "bcc")])
def test_second_instance_adopts(make_dp, ns, first, second):
    """A restart adopts maps, attachments and slots, also when it changes the build."""
    a = make_dp(build=first)
    a.attach("pft-a", "native")
    a.attach("pft-b", "tc")
    a.reserve_tx_port("pft-i")
    k, v = _flow(a, ns)
    a.flows[k] = v
    before = a.status()
    a_xdp, a_tc = a.xdp_prog_id, a.tc_prog_id
    a.close()  # the process goes away; its programs keep running

    b = make_dp(build=second)
    assert bytes(b.flows[k]) == bytes(v), "the flow written by the first instance is visible"
    assert b.status() == before
    assert {s.ifname: s.prog_id for s in b.status() if s.mode} == {"pft-a": a_xdp, "pft-b": a_tc}
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, a_xdp)
    assert devmap(b.pin_dir) == {s.slot: s.ifindex for s in before}
    # the new instance takes over atomically, same slot; a prebuilt restart of the same
    # object reuses the pinned programs (tests/datapath/test_prebuilt_adopt.py)
    st = b.attach("pft-a", "native")
    assert st.prog_id == b.xdp_prog_id and st.slot == 0
    assert (b.xdp_prog_id == a_xdp) == (first == second == "prebuilt")
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, b.xdp_prog_id)
    b.detach_all()
    assert link_xdp(ns, "pft-a") == (0, 0) and our_filter(ns, "pft-b") is None


def test_adoption_without_state_file_finds_attachments_and_slots(make_dp, ns):
    """State file lost (but pins kept): the attachments are found on the devices
    by program id (the pinned programs) and the slots are those the devmap holds."""
    a = make_dp()
    a.attach("pft-a", "generic")
    a.attach("pft-b", "tc")
    # adoption walks devices by ifindex (pft-b first): fresh slots would be the other way round
    slots = {s.ifname: s.slot for s in a.status()}
    assert slots == {"pft-a": 0, "pft-b": 1}
    assert netns.ifindex(ns, "pft-b") < netns.ifindex(ns, "pft-a")
    a.close()
    os.unlink(make_dp.state_file)
    b = make_dp()
    got = {s.ifname: (s.mode, s.slot) for s in b.status()}
    assert got == {"pft-a": ("generic", slots["pft-a"]), "pft-b": ("tc", slots["pft-b"])}
    assert all("adopted" in s.reason for s in b.status())


def test_adoption_forgets_what_is_gone(make_dp, ns):
    """A deleted device loses its attachment and its slot. A device whose program
    was removed by hand is no longer attached but keeps its slot as a plain
    redirect target: flows entering elsewhere may still leave through it."""
    a = make_dp()
    a.attach("pft-a", "native")
    a.attach("pft-i", "tc")
    a.close()
    netns.run(ns, "ip link del pft-i")
    netns.run(ns, "ip link set dev pft-a xdp off")  # someone removed it by hand
    b = make_dp()
    assert [(s.ifname, s.mode, s.slot) for s in b.status()] == [("pft-a", None, 0)]
    assert devmap(b.pin_dir) == {0: netns.ifindex(ns, "pft-a")}
    b.release_tx_port("pft-a")
    assert b.status() == [] and devmap(b.pin_dir) == {}


# ---- errors ---------------------------------------------------------------------------

def test_error_missing_device_and_bad_mode(make_dp, ns):
    dp = make_dp()
    with pytest.raises(DeviceError, match=r"^no such device: eth9$"):
        dp.attach("eth9", "tc")
    with pytest.raises(DeviceError, match=r"^unknown attach mode 'fast' for pft-a: "):
        dp.attach("pft-a", "fast")
    with pytest.raises(DeviceError, match=r"^no such device: eth9$"):
        dp.reserve_tx_port("eth9")
    assert dp.status() == [] and devmap(dp.pin_dir) == {}


@pytest.mark.parametrize("ifname", ["lo", "pft-i"])
def test_error_native_xdp_without_driver_support(make_dp, ns, ifname):
    """lo and ifb have no native XDP (dummy, the usual example, is not built into
    this kernel). The kernel's extack text reaches the message; nothing changes."""
    dp = make_dp()
    dp.attach("pft-a", "tc")
    before, before_map = dp.status(), devmap(dp.pin_dir)
    with pytest.raises(DeviceError) as exc:
        dp.attach(ifname, "native")
    msg = str(exc.value)
    assert msg.startswith(f"{ifname}: cannot attach XDP in native mode: ")
    assert "does not support XDP in native mode" in msg and "EOPNOTSUPP" in msg
    assert "\n" not in msg
    assert dp.status() == before and devmap(dp.pin_dir) == before_map
    assert link_xdp(ns, ifname) == (0, 0) and "clsact" not in qdisc_kinds(ns, ifname)


def test_error_failed_generic_to_native_switch_keeps_generic(make_dp, ns):
    """A switch that cannot complete leaves the old mode running (via the TC bridge)."""
    dp = make_dp()
    dp.attach("pft-i", "generic")
    with pytest.raises(DeviceError, match="^pft-i: cannot attach XDP in native mode"):
        dp.attach("pft-i", "native")
    assert link_xdp(ns, "pft-i") == (XDP_ATTACHED_SKB, dp.xdp_prog_id)
    assert our_filter(ns, "pft-i") is None and "clsact" not in qdisc_kinds(ns, "pft-i")
    assert [(s.mode, s.slot) for s in dp.status()] == [("generic", 0)]


@pytest.mark.parametrize("build,prefix", [
    ("bcc", "datapath compile failed: "),
    ("prebuilt", f"datapath load of {bpfobject.object_path()} failed: "),
])
def test_error_compile_failure_broken_define(ns, pin_dir, tmp_path, build, prefix):
    """A setting the datapath cannot live with (an empty devmap) fails the load with a
    one-line DatapathError naming the map and the kernel's reason, and no half-made pins
    stay behind."""
    with pytest.raises(DatapathError) as exc:
        Datapath(pin_dir, state_file=str(tmp_path / "s.json"), defines={"PYFLOW_MAX_TX_PORTS": 0},
                 build=build)
    assert str(exc.value).startswith(prefix)
    assert abi.MAP_TX_PORTS in str(exc.value) and "\n" not in str(exc.value)
    if build == "prebuilt":
        assert str(exc.value).endswith("(Invalid argument)")
    assert not os.path.exists(pin_dir)


def test_error_prebuilt_define_that_is_no_map_size(ns, pin_dir, tmp_path):
    with pytest.raises(DatapathError, match="^PYFLOW_DEBUG is not a setting of the prebuilt datapath"):
        Datapath(pin_dir, state_file=str(tmp_path / "s.json"), defines={"PYFLOW_DEBUG": 1})
    assert not os.path.exists(pin_dir)


VERIFIER_REFUSES = """
#include "pyflow_abi.h"
#include "lib/maps.h"
PYFLOW_PROG("xdp") int pyflow_xdp(struct xdp_md *ctx)
{
	struct pyflow_flow_key key = {};
	struct pyflow_flow *flow = bpf_map_lookup_elem(&pyflow_flows, &key);

	return flow->counters.packets ? XDP_PASS : XDP_DROP; /* no NULL check: the verifier refuses */
}
PYFLOW_PROG("tc") int pyflow_tc(struct __sk_buff *skb) { return 0; }
char _license[] SEC("license") = "GPL";
"""


def test_error_prebuilt_verifier_refusal_names_the_program_and_the_log(ns, pin_dir, tmp_path, monkeypatch):
    """An object the verifier refuses: the error names the object and the program and
    ends with the verifier log's last lines; the maps pinned on the way are removed."""
    src = tmp_path / "refused.c"
    src.write_text(VERIFIER_REFUSES)
    obj = tmp_path / "refused.bpf.o"
    build_bpf.build(obj, source=src)
    monkeypatch.setenv("PYFLOW_BPF_OBJECT", str(obj))
    with pytest.raises(DatapathError) as exc:
        Datapath(pin_dir, state_file=str(tmp_path / "s.json"))
    msg = str(exc.value)
    assert msg.startswith(f"datapath load of {obj} failed: program pyflow_xdp refused by the verifier: ")
    assert "invalid mem access 'map_value_or_null'" in msg and "\n" not in msg
    assert not os.path.exists(pin_dir)


def test_prebuilt_loads_without_a_compiler(tmp_path):
    """The default path needs no clang, LLVM or kernel headers: with PATH holding no
    compiler, a fresh process loads the object, pins its maps and runs a packet."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    code = (
        "import shutil, sys\n"
        "assert shutil.which('clang') is None and shutil.which('llc') is None\n"
        "from pyflow.datapath.loader import Datapath\n"
        f"dp = Datapath('/sys/fs/bpf/pft-nocc-{os.getpid()}', state_file='{tmp_path}/s.json')\n"
        "assert dp.build == 'prebuilt' and dp.xdp_prog_id and dp.tc_prog_id\n"
        "assert 'bcc' not in sys.modules, 'the prebuilt path imported bcc'\n"
        "dp.destroy()\n"
    )
    env = {"PATH": str(bindir), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_error_compile_failure_broken_source(ns, pin_dir, tmp_path, monkeypatch):
    """bcc: the compiler's first error line."""
    src = tmp_path / "ebpf"
    src.mkdir()
    (src / "pyflow_xdp.c").write_text("int pyflow_xdp(struct xdp_md *ctx) { return XDP_PASS }\n")
    monkeypatch.setattr(bpfsource, "EBPF_DIR", src)
    monkeypatch.setattr(bpfsource, "ENTRY_FILE", src / "pyflow_xdp.c")
    with pytest.raises(DatapathError, match=r"^datapath compile failed: .*error: expected ';'"):
        Datapath(pin_dir, state_file=str(tmp_path / "s.json"), build="bcc")
    assert not os.path.exists(pin_dir)


def test_error_call_from_another_namespace(make_dp, ns):
    dp = make_dp()
    with netns.namespaces("other") as (other,), netns.inside(other):
        with pytest.raises(DatapathError, match="belongs to network namespace"):
            dp.attach("pft-a", "tc")
    assert dp.attach("pft-a", "tc").mode == "tc"


# ---- traffic through the fast path ---------------------------------------------------------

N_PACKETS = 200
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)  # Linux values; Python 3.11 lacks the names
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _udp_socket(ns: str, addr: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr)
        return s
    return netns.call(ns, make)


@pytest.mark.parametrize("mode", ["native", "tc"])
def test_udp_through_the_fast_path(routed, mode):
    h1, r, h2, dp = routed
    r1, r2 = netns.ifindex(r, "pft-r1"), netns.ifindex(r, "pft-r2")
    dp.attach("pft-r1", mode)
    target = dp.attach("pft-r2", "tc")  # the egress: needs its devmap slot for XDP's redirect
    key = abi.FlowKey(r1, abi.PROTO_UDP, "198.18.1.2", "198.18.2.2", 40000, 5000)
    act = abi.FlowAction(out_ifindex=r2, tx_port=target.slot, mtu=1500, in_mac=netns.mac(r, "pft-r1"),
                         dmac=netns.mac(h2, "pft-h2"), smac=netns.mac(r, "pft-r2"))
    k = dp.flows.Key.from_buffer_copy(abi.key_bytes(key))
    dp.flows[k] = dp.flows.Leaf.from_buffer_copy(abi.value_bytes(act, key))

    rx = _udp_socket(h2, ("198.18.2.2", 5000))
    rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    # all packets are sent before any is read, and skbs built from XDP frames carry
    # a page each: the default buffer (208 KiB) overflows near packet 198
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    rx.settimeout(2.0)
    tx = _udp_socket(h1, ("198.18.1.2", 40000))
    try:
        payloads = [f"pft {mode} {i:05d}".encode() * 4 for i in range(N_PACKETS)]
        got, ttls = [], set()
        for p in payloads:
            tx.sendto(p, ("198.18.2.2", 5000))
        deadline = time.monotonic() + 10
        while len(got) < N_PACKETS and time.monotonic() < deadline:
            try:
                data, anc, _, _ = rx.recvmsg(2048, socket.CMSG_SPACE(4))
            except TimeoutError:
                break
            got.append(data)
            for level, typ, val in anc:
                if level == socket.IPPROTO_IP and typ == socket.IP_TTL:
                    ttls.add(int.from_bytes(val[:4], sys.byteorder))
    finally:
        rx.close()
        tx.close()
    reasons = {name: packets for name, (packets, _) in dp.reason_counts().items()}
    udp = [ln for ln in netns.run(h2, "cat /proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
    assert sorted(got) == sorted(payloads), f"{len(got)} of {N_PACKETS} arrived; router {reasons}; h2 {udp}"
    assert ttls == {63}, "one router hop: TTL 64 -> 63"
    flow = dp.flows[k]
    assert flow.counters.packets == N_PACKETS
    assert flow.counters.bytes == sum(20 + 8 + len(p) for p in payloads)
    assert reasons["forwarded"] == N_PACKETS, "stats: reason 'forwarded' counts every packet"


# ---- bpffs and clean removal ---------------------------------------------------------------

def test_bpffs_is_mounted_when_missing():
    """In a private mount namespace (the host's mount stays), unmount bpffs and let
    the loader find it missing in /proc/mounts and mount it again."""
    code = ("from pyflow.datapath.loader import bpffs_mounted, ensure_bpffs\n"
            "assert not bpffs_mounted(), 'still mounted'\n"
            "ensure_bpffs()\n"
            "assert bpffs_mounted()\n"
            "print('remounted')\n")
    script = ("while grep -q ' /sys/fs/bpf bpf ' /proc/mounts; do umount /sys/fs/bpf || exit 3; done; "
              f"exec {sys.executable} -c \"$0\"")
    res = netns.run(None, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, code],
                    check=False)
    assert res.returncode == 0 and res.stdout.strip() == "remounted", res.stderr
    assert open("/proc/mounts").read().count(" /sys/fs/bpf bpf ") >= 1


def test_destroy_removes_hooks_pins_and_state(make_dp, ns):
    dp = make_dp()
    dp.attach("pft-a", "native")
    dp.attach("pft-b", "tc")
    dp.destroy()
    assert link_xdp(ns, "pft-a") == (0, 0) and ingress_filters(ns, "pft-b") == []
    assert "clsact" not in qdisc_kinds(ns, "pft-b")
    assert not os.path.exists(dp.pin_dir)
    assert not os.path.exists(make_dp.state_file)
    with pytest.raises(DatapathError, match="is closed"):
        dp.attach("pft-a", "tc")
