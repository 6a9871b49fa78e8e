"""Refusals are counted under fixed codes (metric labels), never under their message
text: a path's refusal names addresses and devices, which belong in the log only."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from pyflow.control import model
from pyflow.control import paths as P
from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import NO_PATH_CODES, NoPath
from pyflow.control.stats import EngineCounters, LoopStats
from pyflow.daemon.metrics import registry_for
from pyflow.daemon.stats import Stats
from tests.support import fakes

README = Path(__file__).resolve().parents[2] / "README.md"
POLICY_CODES = ("protocol", "dying", "no_reply_yet", "tcp_not_established", "helper",
                "excluded_by_mark", "gone", "kernel_offloaded", "unconfirmed", "tcp_not_assured",
                "seq_adjust", "nat_clash")
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]*:[0-9a-f:]+:")

ETH0 = P.LinkInfo(ifindex=2, ifname="eth0", arptype=P.ARPHRD_ETHER, flags=0x11043, mtu=1500,
                  mac=b"\x02\0\0\0\0\x02", kind=None, link=None, link_netnsid=None)


def _route(rtype: int = P.RTN_UNICAST, oif: int = 2, encap: int = 0) -> P.RouteReply:
    return P.RouteReply(socket.AF_INET, rtype, 254, oif, None, 0, None, 0, encap, False)


class LocalPaths(fakes.FakePaths):
    """The WAN side's destination is local to this host, as the real resolver says it."""

    def egress(self, family, src, dst, *, iif, mark):
        if self.device_of(family, dst, mark=mark) == fakes.WAN:
            P.plan_egress(family, socket.inet_pton(family, dst), _route(P.RTN_LOCAL), {2: ETH0}.get)
        return super().egress(family, src, dst, iif=iif, mark=mark)


def test_a_path_refusal_is_counted_by_code_and_its_text_logged(caplog):
    ct, flows = fakes.FakeConntrack(), fakes.FakeFlows()
    eng = Engine(ct, LocalPaths(), flows, fakes.FakeDevices(managed=(fakes.LAN, fakes.WAN)),
                 EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120), clock=fakes.Clock())
    with caplog.at_level(logging.DEBUG, logger="pyflow.control.engine"):
        fakes.offer(eng, ct, fakes.masq_conn())
    assert not eng.offloaded
    assert eng.stats.refused == {model.LOCAL_DESTINATION: 1}
    assert any("198.19.0.50 is local to this host" in r.getMessage() for r in caplog.records)
    # and what a scrape shows carries no address
    stats = Stats.of(LoopStats(engine=EngineCounters(refused=dict(eng.stats.refused))), Stats().devices)
    text = generate_latest(registry_for(lambda: stats)).decode()
    refusals = [line for line in text.splitlines() if line.startswith("pyflow_offload_refusals_total")]
    assert refusals == ['pyflow_offload_refusals_total{reason="local_destination"} 1.0']
    assert not ADDRESS.search(" ".join(refusals))


@pytest.mark.parametrize("route, links, code", [
    (_route(P.RTN_LOCAL), {2: ETH0}, model.LOCAL_DESTINATION),
    (_route(P.RTN_BLACKHOLE), {2: ETH0}, model.ROUTE_TYPE),
    (_route(encap=1), {2: ETH0}, model.ENCAP_ROUTE),
    (_route(oif=0), {2: ETH0}, model.NO_OUTPUT_DEVICE),
    (_route(oif=7), {2: ETH0}, model.DEVICE_GONE),
    (_route(), {2: P.LinkInfo(**{**vars(ETH0), "flags": 0x1002})}, model.DEVICE_DOWN),
    (_route(), {2: P.LinkInfo(**{**vars(ETH0), "arptype": 65534})}, model.NOT_ETHERNET),
    (_route(), {2: P.LinkInfo(**{**vars(ETH0), "mac": None})}, model.NO_MAC),
])
def test_plan_refusals_carry_a_fixed_code_and_keep_their_text(route, links, code):
    with pytest.raises(NoPath) as info:
        P.plan_egress(socket.AF_INET, socket.inet_pton(socket.AF_INET, "198.18.200.1"), route, links.get)
    assert info.value.code == code
    assert str(info.value) and not str(info.value).startswith("(")  # the text, not the args tuple


def test_route_lookup_errnos_map_to_codes():
    import errno
    for err, code in ((errno.ENETUNREACH, model.NO_ROUTE), (errno.EHOSTUNREACH, model.UNREACHABLE),
                      (errno.EACCES, model.PROHIBITED), (errno.EINVAL, model.BLACKHOLE),
                      (errno.EXDEV, model.RP_FILTER), (errno.ENODEV, model.DEVICE_GONE),
                      (errno.EAGAIN, model.THROW_ROUTE), (errno.ENOMEM, model.LOOKUP_FAILED)):
        assert P._refusal(err, "198.18.200.1", 3).code == code


def test_a_copy_keeps_code_and_text():
    exc = NoPath("198.18.200.1 is local to this host", model.LOCAL_DESTINATION)
    copy = type(exc)(*exc.args)  # how the planner's memo answers again
    assert (copy.code, str(copy)) == (model.LOCAL_DESTINATION, "198.18.200.1 is local to this host")
    assert NoPath("x").code == model.NO_PATH


def test_every_code_is_a_word_listed_in_the_readme():
    text = README.read_text()
    metrics = text[text.index("### Metrics"):text.index("## How a connection is offloaded")]
    for code in (*NO_PATH_CODES, *POLICY_CODES):
        assert re.fullmatch(r"[a-z0-9_]+", code), code
        assert f"`{code}`" in metrics, f"{code} is not listed in the README's metrics section"
