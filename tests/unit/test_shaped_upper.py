"""A shaper on a device above the managed one the datapath redirects to (SQM on pppoe-wan
or wan.7 over a managed wan): a redirect to wan would skip it, so such a connection is
refused (shaped_upper) and stays on the kernel path, and offloaded ones leave the fast path
when the shaper appears. The namespace and planner are test_lower_paths' fakes."""

from __future__ import annotations

import pytest

from pyflow.control import model, pppoe
from pyflow.control.model import NoPath
from tests.support.fakes import masq_conn, offer
from tests.unit.test_lower_paths import CONC_MAC, LAN1, PPP, WAN, WAN7, LayeredPaths, engine


def pppoe_over_vlan() -> LayeredPaths:
    return LayeredPaths(LAN1, PPP, sessions=[pppoe.Session(0x1234, CONC_MAC, "wan.7")])


@pytest.mark.parametrize("shaped", [PPP, WAN7])
def test_a_shaped_upper_layer_refuses_the_path(shaped):
    eng = engine(pppoe_over_vlan(), (LAN1, WAN))
    eng.shaping_changed({shaped})
    offer(eng, eng.ct, masq_conn())
    assert not eng.offloaded and eng.stats.refused == {model.SHAPED_UPPER: 1}
    with pytest.raises(NoPath) as info:
        eng.planner.resolve(masq_conn())
    assert info.value.code == model.SHAPED_UPPER
    assert model.SHAPED_UPPER in model.NO_PATH_CODES


def test_unshaped_or_shaped_at_or_below_the_managed_layer_is_offloaded():
    # the managed port itself shapes: the TC redirect goes through its qdisc; a device of
    # another path shapes: nothing to do with this one
    for managed, shaped in (((LAN1, WAN), set()), ((LAN1, WAN), {WAN}), ((LAN1, WAN), {99}),
                            ((LAN1, WAN7), {WAN})):
        eng = engine(pppoe_over_vlan(), managed)
        eng.shaping_changed(shaped)
        offer(eng, eng.ct, masq_conn())
        assert len(eng.offloaded) == 1 and not eng.stats.refused, (managed, shaped)


def test_a_shaper_appearing_above_takes_offloaded_flows_back_and_going_brings_them_back():
    eng = engine(pppoe_over_vlan(), (LAN1, WAN))
    offer(eng, eng.ct, masq_conn())
    assert len(eng.offloaded) == 1
    eng.shaping_changed({PPP})
    assert not eng.offloaded and not eng.flows.entries
    assert masq_conn().ident not in eng.ct.marked  # handed back to conntrack
    eng.shaping_changed(set())
    assert len(eng.offloaded) == 1 and len(eng.flows.entries) == 2


def test_a_refused_flow_is_offloaded_once_the_shaper_goes():
    eng = engine(pppoe_over_vlan(), (LAN1, WAN))
    eng.shaping_changed({WAN7})
    offer(eng, eng.ct, masq_conn())
    assert not eng.offloaded
    eng.shaping_changed(())
    assert len(eng.offloaded) == 1


def test_a_change_inside_a_pass_is_not_answered_from_its_memo():
    eng = engine(pppoe_over_vlan(), (LAN1, WAN))
    with eng._pass():
        eng.planner.resolve(masq_conn())  # memoised unshaped
        eng.shaping_changed({PPP})
        with pytest.raises(NoPath):
            eng.planner.resolve(masq_conn())


def test_the_shaped_set_covers_devices_not_managed():
    """From one qdisc dump: every device with a rate limiter on its egress or its ingress
    redirected (sqm's IFB), named or not; AQMs and cake without a bandwidth do not shape."""
    from pyflow.daemon import shaping
    from pyflow.netlink import qdisc, uapi

    root = uapi.TC_H_ROOT
    qs = [qdisc.Qdisc(PPP, "cake", 0x80010000, root, rate=125000),    # sqm on pppoe-wan
          qdisc.Qdisc(WAN7, "htb", 0x10000, root),
          qdisc.Qdisc(WAN, "fq_codel", 0, root),                      # an AQM at line rate
          qdisc.Qdisc(LAN1, "cake", 0x80020000, root, rate=None),     # cake unlimited
          qdisc.Qdisc(30, "ingress", 0xFFFF0000, uapi.TC_H_INGRESS)]
    redirects = [qdisc.Redirect(30, "u32", "egress redirect", 31)]
    sh = shaping.from_dumps(qs, redirects, {WAN: "wan", LAN1: "lan1"})
    assert sh.shaped_ifindexes == frozenset({PPP, WAN7, 30})
    assert sh.devices == {}  # of the managed devices, none shapes: XDP stays allowed
    assert sh != shaping.Shaping()  # a change the daemon's periodic read acts on
