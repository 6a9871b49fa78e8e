"""Bridge FDB entries of offloaded flows kept fresh (pyflow.control.fdbkeep, BridgePorts.refresh):
decoded ageing time and entry age, each outcome of a refresh, and the keeper's rounds (only
entries whose MAC an active connection uses, once per MAC, bounded per tick). The kernel's
side runs in tests/integration/test_bridged_lan.py."""

from __future__ import annotations

import functools
import struct
from types import SimpleNamespace

from pyflow.control import fdbkeep
from pyflow.control.bridge import AF_BRIDGE, BridgeInfo, BridgePorts, FdbEntry, parse_bridge, parse_fdb
from pyflow.control.engine import Engine
from pyflow.control.fdbkeep import FdbKeeper
from pyflow.netlink import uapi as U
from pyflow.netlink.wire import U32, nest, nla, request

BR, L1, L2 = 5, 6, 7
MAC, MAC2 = bytes.fromhex("02005e100101"), bytes.fromhex("02005e100102")


def test_ageing_time_and_entry_age_are_decoded() -> None:
    body = struct.pack("=BxHiII", 0, U.ARPHRD_ETHER, BR, 0, 0) + nla(U.IFLA_IFNAME, b"br-lan\0")
    body += nest(U.IFLA_LINKINFO, nla(U.IFLA_INFO_KIND, b"bridge\0"),
                 nest(U.IFLA_INFO_DATA, nla(U.IFLA_BR_AGEING_TIME, U32.pack(300))))
    info = parse_bridge(request(U.RTM_NEWLINK, 0, 1, body))
    assert info is not None and info.ageing_s == 3.0
    fdb = struct.pack("=BxxxiHBB", AF_BRIDGE, L1, U.NUD_REACHABLE, U.NTF_MASTER, 0) + nla(U.NDA_LLADDR, MAC)
    fdb += nla(U.NDA_CACHEINFO, struct.pack("=IIII", 0, 700, 150, 0))
    entry = parse_fdb(request(U.RTM_NEWNEIGH, 0, 1, fdb))
    assert entry is not None and entry.updated_s == 1.5


class _Rt:
    def __init__(self, err: int = 0):
        self.sent: list[tuple[int, bytes]] = []
        self.err = err

    def ack(self, mtype: int, _flags: int, body: bytes, _timeout: float) -> int:
        self.sent.append((mtype, body))
        return self.err


def _ports(entry: FdbEntry | None, *, filtering: bool = False) -> tuple[BridgePorts, _Rt]:
    bp = object.__new__(BridgePorts)  # no sockets: the kernel's answers are given here
    bp._bridges = {BR: BridgeInfo(BR, "br-lan", filtering, U.ETH_P_8021Q, 300.0)}
    bp._sync = lambda: None  # type: ignore[method-assign]
    bp._fdb = lambda _bridge, _mac, _vid: entry  # type: ignore[method-assign]
    bp._rt = rt = _Rt()  # type: ignore[assignment]
    bp.used = {(BR, MAC, 0): L1}
    return bp, rt


def _entry(port: int, *, state: int = U.NUD_REACHABLE, flags: int = U.NTF_MASTER,
           updated: float | None = 100.0, vid: int = 0) -> FdbEntry:
    return FdbEntry(port, BR, MAC, vid, state, flags, updated)


def test_a_learned_entry_still_on_its_port_is_refreshed_as_a_received_frame_would() -> None:
    bp, rt = _ports(_entry(L1))
    assert bp.refresh(BR, MAC, 0, L1, 75.0) == "refreshed"
    (mtype, body), = rt.sent
    family, ifindex, state, flags, _t = struct.unpack_from("=BxxxiHBB", body)
    assert (mtype, family, ifindex, state, flags) == (U.RTM_NEWNEIGH, AF_BRIDGE, L1, U.NUD_REACHABLE,
                                                      U.NTF_USE | U.NTF_MASTER)
    assert nla(U.NDA_LLADDR, MAC) in body and nla(U.NDA_VLAN, struct.pack("=H", 10)) not in body
    # under VLAN filtering the entry's VLAN is named (else every VLAN of the port is updated)
    bp, rt = _ports(_entry(L1, vid=10), filtering=True)
    assert bp.refresh(BR, MAC, 10, L1, 75.0) == "refreshed"
    assert rt.sent[0][1].endswith(nla(U.NDA_VLAN, struct.pack("=H", 10)))


def test_no_refresh_for_a_moved_gone_static_or_recent_entry() -> None:
    for entry, outcome in ((_entry(L2), "moved"), (None, "gone"),
                           (_entry(L1, state=U.NUD_NOARP), "not_learned"),
                           (_entry(L1, state=U.NUD_PERMANENT), "not_learned"),
                           (_entry(L1, flags=U.NTF_MASTER | U.NTF_EXT_LEARNED), "not_learned"),
                           (_entry(L1, updated=10.0), "fresh")):
        bp, rt = _ports(entry)
        assert bp.refresh(BR, MAC, 0, L1, 75.0) == outcome
        assert not rt.sent, outcome  # above all, a moved MAC is never pulled back
        # a moved or vanished entry is forgotten: the next answer for the MAC records it again
        assert ((BR, MAC, 0) in bp.used) == (outcome not in ("moved", "gone"))
    bp, rt = _ports(_entry(L1))
    rt.err = 1
    assert bp.refresh(BR, MAC, 0, L1, 75.0) == "failed"


class _Bp:
    def __init__(self, used: dict, ageing: float = 8.0):
        self.used = used
        self.ageing = ageing
        self.calls: list[tuple] = []

    def ageing_s(self, _bridge: int) -> float:
        return self.ageing

    def refresh(self, bridge: int, mac: bytes, vid: int, port: int, fresh_s: float) -> str:
        self.calls.append((bridge, mac, vid, port, fresh_s))
        return "refreshed"


def _conn(dmac_reply: bytes, last_seen: int):
    path = (None, None, SimpleNamespace(dmac=b"\x02gw000"), SimpleNamespace(dmac=dmac_reply), None, None)
    return SimpleNamespace(hw=True, slot=-1, last_seen_ns=last_seen, path=path)


def _engine(bp: _Bp, offloaded: list, now: list[int]):
    eng = SimpleNamespace(planner=SimpleNamespace(paths=SimpleNamespace(bridge_ports=bp)),
                          offloaded=dict(enumerate(offloaded)), clock=lambda: now[0],
                          pacer=SimpleNamespace(interval_s=0.0), slots=SimpleNamespace(activity=None))
    eng.last_seen_ns = functools.partial(Engine.last_seen_ns, eng)  # the engine's own rule
    return eng


def test_keeper_rounds_refresh_each_active_mac_once() -> None:
    t, now = [100.0], [10**12]
    bp = _Bp({(BR, MAC, 0): L1, (BR, MAC2, 0): L2, (BR, bytes(6), 0): L2})
    conns = [_conn(MAC, now[0] - 1), _conn(MAC, now[0] - 1), _conn(MAC2, now[0] - 1)]
    eng = _engine(bp, conns, now)
    keeper = FdbKeeper(monotonic=lambda: t[0])
    keeper.tick(eng)  # type: ignore[arg-type]
    # one read/refresh per MAC in use (not per connection), none for a MAC no flow uses
    assert sorted(c[1] for c in bp.calls) == [MAC, MAC2] and keeper.interval_s == 2.0
    assert all(c[4] == 2.0 for c in bp.calls) and keeper.counts["refreshed"] == 2
    bp.calls.clear()
    t[0] += 1.0
    keeper.tick(eng)  # type: ignore[arg-type]
    assert not bp.calls  # a quarter of the ageing time has not passed
    # MAC2's connection carried nothing since the last round: only MAC is refreshed
    now[0] += 2 * 10**9
    conns[0].last_seen_ns = now[0]
    t[0] += 1.5
    keeper.tick(eng)  # type: ignore[arg-type]
    assert [c[1] for c in bp.calls] == [MAC] and keeper.rounds == 2


def test_keeper_work_per_tick_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(fdbkeep, "SCAN_PER_TICK", 10)
    monkeypatch.setattr(fdbkeep, "SEND_PER_TICK", 3)
    macs = [bytes([2, 0, 0, 0, 0, n]) for n in range(8)]
    now = [10**12]
    bp = _Bp({(BR, m, 0): L1 for m in macs})
    eng = _engine(bp, [_conn(macs[n % 8], now[0]) for n in range(25)], now)
    keeper = FdbKeeper(monotonic=lambda: 0.0)
    sent = []
    for _ in range(6):
        keeper.tick(eng)  # type: ignore[arg-type]
        sent.append(len(bp.calls))
    # 25 connections at 10 a tick: the third tick ends the walk, then 3 refreshes a tick
    assert sent == [0, 0, 3, 6, 8, 8]
    # nothing at all while no path went below a bridge
    idle = FdbKeeper()
    idle.tick(_engine(None, [], now))  # type: ignore[arg-type]
    assert idle.rounds == 0
