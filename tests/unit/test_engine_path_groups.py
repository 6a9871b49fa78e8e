"""A path change resolves each group of connections with the same path key once and looks
at the members of a group only when its answer changed (pathgroups.py)."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from pyflow.control.engine import Engine, EngineConfig
from pyflow.control.model import Conn, CtEvent, EventType, Tuple
from tests.support.fakes import (
    CLIENT_MAC,
    GW2_MAC,
    GW_MAC,
    LIVE,
    TCP,
    Clock,
    FakeConntrack,
    FakeDevices,
    FakeFlows,
    FakePaths,
    masq_conn,
)

CONFIG = EngineConfig(idle_timeout_s=30, conntrack_timeout_s=120)
MARKED = 0x40  # a mark that routes through the second gateway (MarkedPaths)


class MarkedPaths(FakePaths):
    """FakePaths whose gateway is GW2_MAC for connections carrying MARKED, and whose LAN
    hosts can each have a MAC of their own (client_macs)."""

    def __init__(self):
        super().__init__()
        self.client_macs: dict[str, bytes] = {}

    def egress(self, family, src, dst, *, iif, mark):
        eg = super().egress(family, src, dst, iif=iif, mark=mark)
        if dst in self.client_macs:
            return replace(eg, dmac=self.client_macs[dst])
        if mark & MARKED and eg.dmac == GW_MAC:
            return replace(eg, dmac=GW2_MAC)
        return eg


def conn_of(client: str, sport: int) -> Conn:
    """client:sport -> 198.19.0.50:443, masqueraded to a port of its own per client and port."""
    nat_port = 20000 + int(client.rsplit(".", 1)[1]) * 1000 + sport % 1000
    return Conn(socket.AF_INET, TCP, Tuple(client, "198.19.0.50", sport, 443),
                Tuple("198.19.0.50", "198.19.0.1", 443, nat_port), status=LIVE, tcp_state=3)


@pytest.fixture
def rig():
    ct, paths, flows = FakeConntrack(), MarkedPaths(), FakeFlows()
    eng = Engine(ct, paths, flows, FakeDevices(), CONFIG, clock=Clock())
    return eng, ct, paths, flows


def offer_all(eng, ct, conns):
    for c in conns:
        ct.table[c.ident] = c
    eng.handle([CtEvent(EventType.UPDATE, c) for c in conns])


class Unlooked(dict):
    """A dict that fails the test when walked (its entries may still be read and removed)."""

    def items(self):
        raise AssertionError("walked")

    values = __iter__ = items


def reply_dmac(eng, conn) -> bytes:
    return bytes(eng.offloaded[conn.ident].actions[1].dmac)


def test_a_change_resolves_each_group_once_and_rewrites_only_the_group_it_moved(rig):
    eng, ct, paths, flows = rig
    a = [conn_of("198.18.0.10", 40000 + i) for i in range(50)]
    b = [conn_of("198.18.0.11", 40000 + i) for i in range(30)]
    offer_all(eng, ct, a + b)
    assert len(eng.offloaded) == 80 and len(eng.groups) == 2
    calls = paths.calls
    eng.paths_changed()  # nothing moved
    assert paths.calls - calls == 2 * 2  # two directions per group, not per connection
    assert eng.stats.rewritten == 0
    paths.client_macs["198.18.0.11"] = bytes.fromhex("0200000000bb")  # one client moved
    calls = paths.calls
    untouched = eng.groups.groups[(socket.AF_INET, "198.18.0.10", "198.19.0.50", 0)]
    untouched.members = Unlooked(untouched.members)
    eng.offloaded = Unlooked(eng.offloaded)
    eng.paths_changed()  # neither the table nor the unmoved group's members are walked
    assert paths.calls - calls == 2 * 2
    assert eng.stats.rewritten == len(b)
    assert all(reply_dmac(eng, c) == bytes.fromhex("0200000000bb") for c in b)
    assert all(reply_dmac(eng, c) == CLIENT_MAC for c in a)
    assert len(flows.entries) == 2 * 80


def test_a_group_that_lost_its_path_goes_whole_and_the_other_stays(rig):
    eng, ct, paths, flows = rig
    a = [conn_of("198.18.0.10", 40000 + i) for i in range(5)]
    b = [conn_of("198.18.0.11", 40000 + i) for i in range(3)]
    offer_all(eng, ct, a + b)
    paths.client_macs["198.18.0.11"] = None  # its neighbour entry failed
    paths.egress = _not_yet_for(paths, "198.18.0.11")
    eng.paths_changed()
    assert set(eng.offloaded) == {c.ident for c in a}
    assert eng.stats.removed == {"path_lost": 3} and len(eng.returning) == 3
    assert len(eng.groups) == 1 and len(flows.entries) == 2 * 5


def _not_yet_for(paths, host):
    from pyflow.control.model import NotYet

    plain = paths.egress

    def egress(family, src, dst, *, iif, mark):
        if dst == host:
            raise NotYet()
        return plain(family, src, dst, iif=iif, mark=mark)

    return egress


def test_members_written_along_different_paths_are_compared_one_by_one(rig):
    eng, ct, paths, _ = rig
    old = masq_conn(sport=40001)
    offer_all(eng, ct, [old])
    paths.gw_mac = GW2_MAC  # the gateway changed with no notification handled yet
    new = masq_conn(sport=40002)
    offer_all(eng, ct, [new])  # same group, written along the new path
    (group,) = eng.groups.groups.values()
    assert group.path is None and len(group.members) == 2
    eng.paths_changed()
    assert eng.stats.rewritten == 1  # the old one only
    assert all(bytes(eng.offloaded[c.ident].actions[0].dmac) == GW2_MAC for c in (old, new))
    assert group.path is eng.offloaded[old.ident].path is eng.offloaded[new.ident].path


def test_a_new_mark_moves_the_connection_to_its_group(rig):
    eng, ct, _, _ = rig
    conn = masq_conn(sport=40003)
    offer_all(eng, ct, [conn])
    marked = replace(conn, mark=MARKED)
    offer_all(eng, ct, [marked])  # the mark changed: its path is the marked one's now
    assert [list(g.members) for g in eng.groups.groups.values()] == [[conn.ident]]
    assert next(iter(eng.groups.groups)) == (conn.family, conn.orig.src, conn.reply.src, MARKED)
    eng.paths_changed()
    assert bytes(eng.offloaded[conn.ident].actions[0].dmac) == GW2_MAC
    eng.remove(conn.ident, "test", tell_conntrack=False)
    assert not eng.groups.groups
