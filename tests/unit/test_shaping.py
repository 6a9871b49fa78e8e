"""Traffic shaping seen from rtnetlink and the attach policy it leads to, without a kernel:
qdisc and filter messages built byte by byte as the kernel sends them (pyflow.netlink.qdisc),
the shaping they add up to (pyflow.daemon.shaping) and the mode each device then gets
(pyflow.datapath.attach.switch). The kernel's side: tests/daemon/test_shaping_ns.py and
tests/lab/guest/test_sqm.py."""

from __future__ import annotations

import struct

import pytest

from pyflow.daemon import shaping
from pyflow.datapath import netdev
from pyflow.datapath.attach import switch
from pyflow.errors import DeviceError
from pyflow.netlink import qdisc, uapi
from pyflow.netlink.wire import U32, nest, nla, request

ROOT, INGRESS = uapi.TC_H_ROOT, uapi.TC_H_INGRESS


def tcmsg(mtype: int, ifindex: int, parent: int, kind: str, *attrs: bytes, handle: int = 0) -> bytes:
    body = qdisc.TCMSG.pack(0, 0, 0, ifindex, handle, parent, 0)
    body += nla(uapi.TCA_KIND, kind.encode() + b"\0") + b"".join(attrs)
    return request(mtype, 0, 1, body)


def parse_q(msg: bytes) -> qdisc.Qdisc | None:
    return qdisc.parse_qdisc(msg, 0, len(msg))


def cake(ifindex: int, rate: int) -> bytes:
    opts = nest(uapi.TCA_OPTIONS, nla(uapi.TCA_CAKE_BASE_RATE64, struct.pack("=Q", rate)),
                nla(3, U32.pack(0)))  # TCA_CAKE_DIFFSERV_MODE: ignored
    return tcmsg(uapi.RTM_NEWQDISC, ifindex, ROOT, "cake", opts, handle=0x80010000)


def tbf(ifindex: int, rate: int, rate64: int | None = None) -> bytes:
    ratespec = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, rate)
    parms = ratespec + bytes(12) + struct.pack("=III", 1000, 2000, 0)
    inner = nla(uapi.TCA_TBF_PARMS, parms)
    if rate64 is not None:
        inner += nla(uapi.TCA_TBF_RATE64, struct.pack("=Q", rate64))
    return tcmsg(uapi.RTM_NEWQDISC, ifindex, 0x10001, "tbf", nest(uapi.TCA_OPTIONS, inner))


def mirred_filter(ifindex: int, kind: str, eaction: int, target: int, *, other_first: bool = False) -> bytes:
    parms = qdisc.TC_MIRRED.pack(1, 0, 4, 1, 1, eaction, target)  # action TC_ACT_STOLEN
    mirred = nest(2, nla(uapi.TCA_ACT_KIND, b"mirred\0"),
                  nest(uapi.TCA_ACT_OPTIONS, nla(uapi.TCA_MIRRED_PARMS, parms)))
    gact = nest(1, nla(uapi.TCA_ACT_KIND, b"gact\0"), nest(uapi.TCA_ACT_OPTIONS, nla(2, bytes(20))))
    acts = (gact + mirred) if other_first else mirred
    opts = nest(uapi.TCA_OPTIONS, nla(1, U32.pack(0x10001)),  # classid, an attribute before the list
                nest(qdisc.ACTION_LISTS[kind], acts))
    return tcmsg(uapi.RTM_NEWTFILTER, ifindex, 0xFFFFFFF2, kind, opts, handle=0x800)


# ---- decoding -------------------------------------------------------------------------------

def test_cake_rate_and_whether_it_shapes():
    q = parse_q(cake(3, 500_000))
    assert q == qdisc.Qdisc(3, "cake", 0x80010000, ROOT, 500_000)
    assert q.limits_rate and not q.at_ingress_hook
    unlimited = parse_q(cake(3, 0))
    assert unlimited is not None and not unlimited.limits_rate  # cake as a line-rate AQM


def test_tbf_rate_from_parms_or_rate64():
    q = parse_q(tbf(4, 375_000))
    assert q is not None and q.rate == 375_000 and q.limits_rate
    fast = parse_q(tbf(4, 0xFFFFFFFF, rate64=10**10))
    assert fast is not None and fast.rate == 10**10


@pytest.mark.parametrize("kind,shapes", [("htb", True), ("hfsc", True), ("fq_codel", False),
                                         ("pfifo_fast", False), ("mq", False), ("fq", False)])
def test_kinds(kind, shapes):
    q = parse_q(tcmsg(uapi.RTM_NEWQDISC, 2, ROOT, kind))
    assert q is not None and q.limits_rate is shapes


def test_ingress_and_clsact_sit_at_the_hook():
    q = parse_q(tcmsg(uapi.RTM_NEWQDISC, 2, INGRESS, "ingress", handle=0xFFFF0000))
    assert q is not None and q.at_ingress_hook and not q.limits_rate


def test_malformed_qdiscs_read_as_nothing_or_without_rate():
    assert qdisc.parse_qdisc(b"\0" * 20, 0, 20) is None  # shorter than nlmsghdr + tcmsg
    no_kind = request(uapi.RTM_NEWQDISC, 0, 1, qdisc.TCMSG.pack(0, 0, 0, 2, 0, ROOT, 0))
    assert parse_q(no_kind) is None
    cut_parms = nest(uapi.TCA_OPTIONS, nla(uapi.TCA_TBF_PARMS, bytes(6)))
    short = tcmsg(uapi.RTM_NEWQDISC, 2, ROOT, "tbf", cut_parms)
    q = parse_q(short)
    assert q is not None and q.rate is None and q.limits_rate  # tbf shapes whatever its rate


@pytest.mark.parametrize("kind", sorted(qdisc.ACTION_LISTS))
def test_mirred_redirect_found_in_each_classifier(kind):
    msg = mirred_filter(3, kind, uapi.TCA_EGRESS_REDIR, 9, other_first=True)
    assert qdisc.parse_filter(msg, 0, len(msg)) == [qdisc.Redirect(3, kind, "egress redirect", 9)]


def test_filters_without_mirred_give_nothing():
    header = tcmsg(uapi.RTM_NEWTFILTER, 3, 0xFFFFFFF2, "u32")  # a dump's per-priority header entry
    assert qdisc.parse_filter(header, 0, len(header)) == []
    unknown = tcmsg(uapi.RTM_NEWTFILTER, 3, 0xFFFFFFF2, "route", nest(uapi.TCA_OPTIONS, nla(1, bytes(4))))
    assert qdisc.parse_filter(unknown, 0, len(unknown)) == []
    msg = mirred_filter(3, "matchall", uapi.TCA_EGRESS_MIRROR, 9)
    cut = msg[:-8]  # the mirred parameters cut short: skipped, nothing raised
    assert qdisc.parse_filter(cut, 0, len(cut)) == []


def test_rates_print_as_tc_prints_them():
    assert qdisc.format_rate(500_000) == "4Mbit"
    assert qdisc.format_rate(62_500) == "500Kbit"
    assert qdisc.format_rate(125_000_000) == "1Gbit"
    assert qdisc.format_rate(None) == ""


# ---- the shaping of devices ---------------------------------------------------------------

NAMES = {2: "lan", 3: "wan", 9: "ifb4wan"}


def sqm_wan() -> shaping.Shaping:
    """sqm-scripts on wan: cake on its egress, its ingress redirected to ifb4wan (shaped too)."""
    qs = [parse_q(cake(3, 500_000)), parse_q(tcmsg(uapi.RTM_NEWQDISC, 3, INGRESS, "ingress")),
          parse_q(cake(9, 2_500_000)), parse_q(tcmsg(uapi.RTM_NEWQDISC, 2, ROOT, "fq_codel"))]
    msg = mirred_filter(3, "u32", uapi.TCA_EGRESS_REDIR, 9)
    return shaping.from_dumps([q for q in qs if q], qdisc.parse_filter(msg, 0, len(msg)), NAMES)


def test_sqm_scripts_wan_reads_as_shaped_both_ways():
    sh = sqm_wan()
    assert sh.of("wan") == shaping.DeviceShaping(("cake 4Mbit",), "egress redirect to ifb4wan (u32)")
    assert sh.of("ifb4wan").egress == ("cake 20Mbit",)
    assert not sh.of("lan").shaped  # fq_codel without a rate is no shaper
    reason = sh.kernel_path_reason("wan")
    assert reason and "ifb4wan" in reason and "kernel" in reason
    assert sh.kernel_path_reason("lan") is None


def test_xdp_ruled_out_only_while_a_managed_device_shapes_its_egress():
    sh = sqm_wan()
    assert sh.no_xdp_reason(["lan"]) is None
    reason = sh.no_xdp_reason(["lan", "wan"])
    assert reason is not None and reason.startswith("egress shaped on wan (cake 4Mbit)")
    assert sh.shaped_egress(["wan", "lan", "ifb4wan"]) == ["ifb4wan", "wan"]


def test_devices_not_asked_about_are_left_out():
    sh = shaping.from_dumps([parse_q(cake(7, 1000))], [], NAMES)  # type: ignore[list-item]
    assert sh.devices == {}


# ---- the mode each device gets -------------------------------------------------------------

NIC = netdev.DeviceFacts("eth1", 5, None, "pci", "0000:03:00.0", "mlx5_core", None, 1500, None, 0)
VETH = netdev.DeviceFacts("v0", 6, "veth", None, None, "veth", None, 1500, None, 0)
WHY = "egress shaped on wan (cake 4Mbit): ..."


@pytest.fixture
def hw_on(monkeypatch):
    """hw-tc-offload on for every device, without an ethtool request."""
    on = (True, "hw-tc-offload is on: flower rules in the NIC")
    monkeypatch.setattr(switch, "hw_choice", lambda ifname, *, asked, skip_hw: on)


def test_auto_takes_tc_and_no_hardware_when_shaped(hw_on):
    assert switch.choose(NIC, "auto", skip_hw=False).mode == "native"
    c = switch.choose(NIC, "auto", skip_hw=False, no_xdp=WHY)
    assert (c.mode, c.hw, c.fallback) == ("tc", False, False)
    assert c.reason == f"TC ingress instead of native XDP: {WHY}"
    veth = switch.choose(VETH, "auto", skip_hw=False, no_xdp=WHY)
    assert veth.mode == "tc" and WHY in veth.reason


@pytest.mark.parametrize("mode", ["native", "generic", "hw"])
def test_explicit_bypassing_modes_are_refused_in_one_line(mode, hw_on):
    with pytest.raises(DeviceError) as exc:
        switch.choose(NIC, mode, skip_hw=False, no_xdp=WHY)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"eth1: {mode}") and WHY in msg and "--mode tc" in msg


def test_software_flower_rules_go_through_the_qdisc_and_stay(hw_on):
    c = switch.choose(NIC, "hw", skip_hw=True, no_xdp=WHY)
    assert c.hw and c.mode == "tc"
    assert switch.choose(NIC, "tc", skip_hw=False, no_xdp=WHY).mode == "tc"
