"""Admission parity with the kernel's flowtable (net/netfilter/nft_flow_offload.c): what it
refuses, pyflow refuses, each under a fixed code of its own; the conntrack decoder hands
the status bits those checks read through unchanged; and pyflow itself never sets
IPS_OFFLOAD, so that a connection the kernel flowtable carries is never carried twice."""

from __future__ import annotations

import socket

import pytest

from pyflow.control import conntrack
from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_DYING,
    IPS_HW_OFFLOAD,
    IPS_NAT_CLASH,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    IPS_SEQ_ADJUST,
    IPS_SRC_NAT,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    Tuple,
)
from pyflow.netlink import uapi
from pyflow.netlink.wire import BE32, attrs, nla
from tests.support.fakes import (
    LAN,
    LIVE,
    TCP,
    UDP,
    WAN,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
    offer,
)


@pytest.fixture
def rig():
    ct, flows = FakeConntrack(), FakeFlows()
    eng = Engine(ct, FakePaths(), flows, FakeDevices(managed=(LAN, WAN)),
                 EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120), clock=Clock())
    return eng, ct, flows


@pytest.mark.parametrize("conn, code", [
    (masq_conn(status=LIVE | IPS_OFFLOAD), "kernel_offloaded"),
    (masq_conn(status=LIVE | IPS_OFFLOAD | IPS_HW_OFFLOAD), "kernel_offloaded"),
    (masq_conn(proto=UDP, status=LIVE | IPS_OFFLOAD), "kernel_offloaded"),
    (masq_conn(status=IPS_SEEN_REPLY | IPS_ASSURED), "unconfirmed"),
    (masq_conn(proto=UDP, status=IPS_SEEN_REPLY), "unconfirmed"),
    (masq_conn(status=IPS_SEEN_REPLY | IPS_CONFIRMED), "tcp_not_assured"),
    (masq_conn(status=LIVE | IPS_SEQ_ADJUST), "seq_adjust"),
    (masq_conn(status=LIVE | IPS_NAT_CLASH), "nat_clash"),
    (masq_conn(proto=UDP, status=LIVE | IPS_NAT_CLASH), "nat_clash"),
    # the earlier refusals keep their codes when a later bit is set too
    (masq_conn(status=LIVE | IPS_DYING | IPS_OFFLOAD), "dying"),
    (masq_conn(state=4, status=LIVE | IPS_SEQ_ADJUST), "tcp_not_established"),
    (masq_conn(helper="ftp", status=LIVE | IPS_SEQ_ADJUST), "helper"),
])
def test_what_the_kernel_flowtable_refuses_is_refused_and_counted(rig, conn, code):
    eng, ct, flows = rig
    offer(eng, ct, conn)
    assert not eng.offloaded and not flows.entries
    assert eng.stats.refused == {code: 1}
    assert not ct.marked  # conntrack was not told anything


@pytest.mark.parametrize("conn", [
    masq_conn(),
    masq_conn(proto=UDP, status=IPS_SEEN_REPLY | IPS_CONFIRMED),  # UDP need not be assured
    masq_conn(status=LIVE | IPS_SRC_NAT | IPS_DST_NAT),  # NAT bits are no reason
])
def test_what_the_kernel_flowtable_admits_is_admitted(rig, conn):
    eng, ct, flows = rig
    offer(eng, ct, conn)
    assert conn.ident in eng.offloaded and len(flows.entries) == 2
    assert eng.stats.refused == {}


def test_a_connection_the_kernel_flowtable_takes_over_leaves_the_fast_path(rig):
    """Next to fw4's flow offloading: should the kernel flowtable set IPS_OFFLOAD on a
    connection pyflow carries, pyflow hands it over instead of doubling up."""
    eng, ct, flows = rig
    conn = masq_conn()
    offer(eng, ct, conn)
    assert conn.ident in eng.offloaded
    offer(eng, ct, masq_conn(status=LIVE | IPS_OFFLOAD))
    assert conn.ident not in eng.offloaded and not flows.entries
    assert eng.stats.removed == {"kernel_offloaded": 1}


def test_a_resync_skips_kernel_offloaded_entries(rig):
    eng, ct, flows = rig
    ours, theirs = masq_conn(sport=40001), masq_conn(sport=40002, status=LIVE | IPS_OFFLOAD)
    ct.table[ours.ident], ct.table[theirs.ident] = ours, theirs
    eng.resync()
    assert set(eng.offloaded) == {ours.ident}
    assert eng.stats.refused == {"kernel_offloaded": 1}


def _ct_message(status: int) -> bytearray:
    t = Tuple("198.18.0.1", "198.18.0.2", 1000, 80)
    c = Conn(socket.AF_INET, TCP, t, t)
    body = (conntrack._tuple_attr(uapi.CTA_TUPLE_ORIG, c) + conntrack._tuple_attr(uapi.CTA_TUPLE_REPLY, c)
            + nla(uapi.CTA_STATUS, BE32.pack(status)))
    return bytearray(conntrack._request(conntrack._MSG_NEW, 0, 0, socket.AF_INET, body))


@pytest.mark.parametrize("status", [LIVE | IPS_OFFLOAD | IPS_HW_OFFLOAD, LIVE | IPS_SEQ_ADJUST,
                                    LIVE | IPS_NAT_CLASH, IPS_SEEN_REPLY, 0xFFFFFFFF])
def test_the_decoder_passes_every_status_bit_through(status):
    msg = _ct_message(status)
    conn = conntrack._parse(msg, 0, len(msg))
    assert conn is not None and conn.status == status


def test_marking_a_connection_offloaded_never_touches_its_status(monkeypatch):
    """pyflow's own mark is the conntrack mark (offload_mark) and be-liberal: were it to
    set IPS_OFFLOAD, its own connections would read as the kernel flowtable's."""
    sent: list[bytes] = []

    def change(self, conn, change, what, msg_type=conntrack._MSG_NEW):
        sent.append(change)
        return True

    monkeypatch.setattr(conntrack.CtNetlink, "_change", change)
    ct = conntrack.CtNetlink.__new__(conntrack.CtNetlink)
    ct.offload_mark = 0x100
    conn = Conn(socket.AF_INET, TCP, Tuple("198.18.0.1", "198.18.0.2", 1000, 80),
                Tuple("198.18.0.2", "198.18.0.1", 80, 1000), status=LIVE,
                tcp_state=TCP_CONNTRACK_ESTABLISHED)
    assert ct.mark_offloaded(conn, True) and ct.mark_offloaded(conn, False)
    assert len(sent) == 2
    for change in sent:
        buf = bytearray(change)
        top = attrs(buf, 0, len(buf))
        assert uapi.CTA_STATUS not in top
        assert uapi.CTA_MARK in top
