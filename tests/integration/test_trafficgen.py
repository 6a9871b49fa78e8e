"""The benchmark's traffic generator and sink (tests/bench/trafficgen.py), checked for function.

The generator sends frames from a packet socket on the sender's veth through a NATing
kernel router (tests/bench/benchnet.py) to the sink. Small bursts with pauses, NAPI not threaded (the
router's work runs inline), so nothing is lost: every frame must arrive, NATed, with the
flow spread asked for. With the sink passing frames to a socket echo, conntrack must see a
reply for every flow.
"""

from __future__ import annotations

import os

import pytest

from tests import netns
from tests.bench import benchnet, trafficgen
from tests.bench.benchnet import GEN_IF, LAN, SNK_IF, V4, V6
from tests.support.traffic import wait_for

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root (BPF, network namespaces)", allow_module_level=True)

BURST, BURSTS = 64, 5


@pytest.fixture(scope="module")
def programs():
    return trafficgen.Generator(), trafficgen.Sink(), trafficgen.Sink()


def _send(gen, net, family, bursts=BURSTS):
    trafficgen.bursts(gen, net.gen, net.ifindex[GEN_IF], family, frames=BURST * bursts, burst=BURST,
                      pause=0.01)


def _configure(gen, net, flows):
    gen.configure(src_mac=net.mac[GEN_IF], dst_mac=net.mac[LAN], src4=V4["gen"], dst4=V4["snk"],
                  src6=V6["gen"], dst6=V6["snk"], flows=flows)


@pytest.mark.parametrize("family", [4, 6])
def test_generator_frames_arrive_natted_with_the_asked_flow_spread(programs, family):
    gen, sink, _ = programs
    flows = 10
    with benchnet.network(threaded=False) as net:
        _configure(gen, net, flows)
        sink.configure(mode=trafficgen.SINK_DROP, src4=V4["up"], dst4=V4["snk"], src6=V6["up"],
                       dst6=V6["snk"], record=True)
        sink.clear_flows()
        before = sink.counts()
        with netns.inside(net.snk):
            sink.attach(SNK_IF)
        try:
            _send(gen, net, family)
            sent = BURST * BURSTS
            wait_for(lambda: sink.counts()["packets"] - before["packets"] >= sent, 2.0)
            after = sink.counts()
        finally:
            with netns.inside(net.snk):
                sink.detach()
        assert after["packets"] - before["packets"] == sent
        # source = the router's uplink address (masquerade), destination = the sink
        assert after["matched"] - before["matched"] == sent
        size = trafficgen.V4_FRAME if family == 4 else trafficgen.V6_FRAME
        assert after["bytes"] - before["bytes"] == sent * size
        seen = sink.flows()
        assert len(seen) == flows, seen
        assert set(seen.values()) == {sent // flows}
        assert {dport for _s, dport in seen} == {trafficgen.DPORT_BASE}
        # conntrack made one entry per flow: the router really saw distinct connections
        listing = netns.run(net.rt, "conntrack -L -p udp").stdout
        assert len([line for line in listing.splitlines() if "dport=" in line]) == flows


def test_flow_numbering_spans_destination_ports():
    assert trafficgen.flow_ports(0) == (trafficgen.SPORT_BASE, trafficgen.DPORT_BASE)
    last = trafficgen.PORTS_PER_DPORT - 1
    assert trafficgen.flow_ports(last) == (trafficgen.SPORT_BASE + last, trafficgen.DPORT_BASE)
    assert trafficgen.flow_ports(last + 1) == (trafficgen.SPORT_BASE, trafficgen.DPORT_BASE + 1)
    gen = trafficgen.Generator()
    with pytest.raises(ValueError, match="flows must be"):
        gen.configure(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02", src4=V4["gen"],
                      dst4=V4["snk"], src6=V6["gen"], dst6=V6["snk"], flows=0)


@pytest.mark.parametrize("family", [4, 6])
def test_echo_behind_a_passing_sink_gives_every_flow_a_reply_in_conntrack(programs, family):
    gen, sink, back = programs
    flows = 100
    with benchnet.network(threaded=True) as net:
        _configure(gen, net, flows)
        sink.configure(mode=trafficgen.SINK_PASS, src4=V4["up"], dst4=V4["snk"], src6=V6["up"],
                       dst6=V6["snk"])
        back.configure(mode=trafficgen.SINK_DROP, src4=V4["snk"], dst4=V4["gen"], src6=V6["snk"],
                       dst6=V6["gen"])
        s0, b0 = sink.counts(), back.counts()
        with netns.inside(net.snk):
            sink.attach(SNK_IF)
        with netns.inside(net.gen):
            back.attach(GEN_IF)
        echo = trafficgen.Echo(net.snk, [trafficgen.DPORT_BASE], max_seconds=30)
        try:
            # exactly one frame per flow, paced by the sender
            trafficgen.paced(gen, net.gen, net.ifindex[GEN_IF], family, frames=flows, rate=5000, chunk=50)
            wait_for(lambda: back.counts()["packets"] - b0["packets"] >= flows, 3.0)
            s1, b1 = sink.counts(), back.counts()
        finally:
            answered = echo.stop()
            with netns.inside(net.snk):
                sink.detach()
            with netns.inside(net.gen):
                back.detach()
        assert s1["matched"] - s0["matched"] == flows
        assert answered == flows
        # replies come back through the router, un-NATed: from the receiver to the sender
        assert b1["matched"] - b0["matched"] == flows
        listing = netns.run(net.rt, "conntrack -L -p udp").stdout
        entries = [line for line in listing.splitlines() if "dport=" in line]
        assert len(entries) == flows
        assert not [line for line in entries if "UNREPLIED" in line]
