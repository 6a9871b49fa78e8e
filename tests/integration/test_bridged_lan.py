"""A bridged LAN, both ways an operator may manage it, and a client moving between its ports
during a download (tests/support/bridged.py has the topology).

- bridge mode: pyflow on the bridge pft-br and on pft-wan. The bridge forwards every
  frame by its FDB, so a move changes nothing pyflow wrote.
- port mode: pyflow on the bridge's ports pft-lan1, pft-lan2 and on pft-wan. Flows go
  straight to the port the client's MAC is learned on and come in from it; the FDB move
  rewrites them, and nothing more leaves on the old port.

Either way the download stays byte-exact and on the fast path after the move: the flow's
counters grow after it and the forward chain's counter shows most bytes bypassed it.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pyflow.control.engine import EngineConfig
from pyflow.control.paths import PathWatcher
from pyflow.control.runner import ControlConfig
from tests import netns
from tests.support.bridged import BRIDGE, CLIENT_MAC, LAN1, LAN2, V4, V6, WAN, BridgedRouter, bridged_lan
from tests.support.traffic import payload, tcp_transfer, wait_for

pytestmark = pytest.mark.root

MIB = 1 << 20
MODES = {"bridge": (BRIDGE, WAN), "ports": (LAN1, LAN2, WAN)}


class _Arrivals:
    """Arrival times of the TCP segments from server port ``port`` seen on a client device."""

    def __init__(self, ns: str, ifname: str, port: int):
        with netns.inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.port, self.times = port, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:  # the device went down (an unplugged port): nothing arrives there
                time.sleep(0.01)
                continue
            ethertype = int.from_bytes(frame[12:14], "big")
            if ethertype == 0x0800 and frame[23] == 6:
                l4 = 14 + (frame[14] & 0x0F) * 4
            elif ethertype == 0x86DD and frame[20] == 6:
                l4 = 54
            else:
                continue
            if int.from_bytes(frame[l4:l4 + 2], "big") == self.port:
                self.times.append(time.monotonic())

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.times


def _counters(r: BridgedRouter, off) -> int:
    """Packets of both of a connection's entries (0 for an entry not in the map)."""
    c = r.cp.flows.read_counters().as_dict()
    return sum(c[kb][0] for kb in off.key_bytes if kb in c)


@pytest.mark.parametrize("how", ["roam", "unplug"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", list(MODES))
def test_client_moves_to_another_port_during_a_download(mode, family, how):
    """roam: the client's frames simply appear on the other port (the FDB entry moves);
    unplug: its old port loses carrier first, so the bridge forgets the MAC and, in port
    mode, the flow leaves the fast path until the MAC is learned on the new port: it must
    come back then, without a conntrack event."""
    size, port = 48 * MIB, 5301 + family
    addrs = V4 if family == 4 else V6
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, offload_mark=0x100)
    with bridged_lan() as lan:
        r = BridgedRouter(lan, MODES[mode], cfg)
        try:
            assert all(s.mode == "tc" for s in r.modes.values()), r.modes  # auto on virtual devices
            seen: dict = {}
            with netns.inside(lan.r):
                watch = PathWatcher()  # in the router: when did the bridge see the move

            def move():
                try:
                    off = wait_for(lambda: r.offloaded_with(port), 5.0)
                    seen["before"] = off
                    time.sleep(0.3)
                    seen["pkts_before"] = _counters(r, off) if off else 0
                    watch.poll(0)  # what came before the move
                    lan.move_client(2, unplug=how == "unplug")
                    # the first client packet on pft-lan2 moves the FDB entry (it is sent at
                    # once: the download's ACKs), the watcher dates it
                    deadline = time.monotonic() + 3
                    while time.monotonic() < deadline and "fdb_at" not in seen:
                        for kind, _i, addr in watch.poll(0.05):
                            if kind == "fdb" and addr == CLIENT_MAC:
                                seen["fdb_at"] = time.monotonic()
                    lan2 = lan.ifindex(LAN2)
                    if mode == "ports":
                        # until the reply direction's entry leaves on pft-lan2
                        def moved():
                            o = r.offloaded_with(port)
                            return o if o is not None and o.actions[1].out_ifindex == lan2 else None
                        seen["after"] = wait_for(moved, 3.0, interval=0.002)
                        seen["moved_at"] = time.monotonic()
                    time.sleep(0.8)
                    off = r.offloaded_with(port)
                    seen["after_later"] = off
                    seen["pkts_after"] = _counters(r, off) if off else 0
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    seen["error"] = exc

            fwd_before, fast_before = lan.nft_bytes(), r.forwarded_bytes()
            old_port = _Arrivals(lan.cl, "pft-c1", port)  # what still reaches the client's old port
            th = threading.Thread(target=move, daemon=True)
            res = tcp_transfer(lan.sv, addrs["sv"], port, lan.cl, addrs["sv"], port, payload(size, port),
                               upload=False, pace=0.004, timeout=60,
                               gate=lambda: th.start() or wait_for(lambda: r.offloaded_with(port), 5.0))
            th.join(10)
            watch.close()
            old_port_times = old_port.stop()
            assert "error" not in seen, seen.get("error")
            assert res.received == size and res.received_sha == res.sent_sha
            assert seen.get("before") is not None, f"not offloaded before the move: {r.engine.stats.refused}"
            assert "fdb_at" in seen, "the router's bridge never saw the client on pft-lan2"
            assert "pkts_after" in seen, f"transfer ended before the move was over ({res.seconds:.1f} s)"
            off = seen["after_later"]
            assert off is not None, f"not offloaded after the move: removed {r.engine.stats.removed}"
            # the fast path carries it after the move: its entries count packets since then
            assert seen["pkts_after"] > 0
            if mode == "ports":
                assert seen.get("after") is not None, "flows not rewritten to pft-lan2"
                ms = (seen["moved_at"] - seen["fdb_at"]) * 1000
                print(f"ports mode, {how}: flows on the new port {ms:.1f} ms after the FDB change")
                # (10 ms for frames already queued on the veth when the entry was rewritten)
                late = [t for t in old_port_times if t > seen["moved_at"] + 0.01]
                assert not late, f"{len(late)} download segments reached the old port after the rewrite"
                assert off.actions[0].out_ifindex == lan.ifindex(WAN)
                if how == "unplug":  # rewritten, or taken off and offloaded again
                    assert r.engine.stats.rewritten + r.engine.stats.reoffloaded >= 1
                # traffic from the client is keyed on the port it now arrives on
                assert off.keys[0].ifindex == lan.ifindex(LAN2)
            else:
                assert seen["after_later"] is seen["before"] or r.engine.stats.reoffloaded > 0
                # TC on the bridge: the client's packets, passed up by the bridge, hit on its
                # ingress; the server's are redirected to its egress, where the bridge's FDB
                # picks the port per packet
                br = lan.ifindex(BRIDGE)
                assert off.keys[0].ifindex == br and off.actions[1].out_ifindex == br
            fwd = lan.nft_bytes() - fwd_before
            fast = r.forwarded_bytes() - fast_before
            print(f"{mode} {how} IPv{family}: forward chain {fwd} bytes, fast path {fast} bytes "
                  f"({fast / max(fwd + fast, 1):.1%}); stats {r.engine.stats}")
            assert fwd < size * 0.2, (fwd, fast)
        finally:
            r.close()


def test_a_forgotten_fdb_entry_sends_flows_back_and_they_return():
    """Port mode: the bridge forgets the client's MAC (deleted here; ageing does the same
    once the offloaded frames stop refreshing it, see the README); the flows go back to
    the kernel path, where the client's next frame teaches the bridge again, and return to
    the fast path without a conntrack event."""
    size, port = 48 * MIB, 5311
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, offload_mark=0x100)
    with bridged_lan() as lan:
        r = BridgedRouter(lan, MODES["ports"], cfg)
        seen: dict = {}

        def forget():
            try:
                wait_for(lambda: r.offloaded_with(port), 5.0)
                time.sleep(0.3)
                lan.sh("r", f"bridge fdb del {CLIENT_MAC} dev {LAN1} master")
                seen["back"] = wait_for(lambda: r.engine.stats.reoffloaded, 5.0)
                seen["off"] = r.offloaded_with(port)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                seen["error"] = exc

        try:
            th = threading.Thread(target=forget, daemon=True)
            res = tcp_transfer(lan.sv, V4["sv"], port, lan.cl, V4["sv"], port, payload(size, port),
                               upload=False, pace=0.004, timeout=60,
                               gate=lambda: th.start() or wait_for(lambda: r.offloaded_with(port), 5.0))
            th.join(10)
            assert "error" not in seen, seen.get("error")
            assert res.received == size and res.received_sha == res.sent_sha
            stats = r.engine.stats
            assert stats.removed.get("path_lost", 0) >= 1, f"not taken off: {stats.removed}"
            assert seen.get("back"), f"not offloaded again ({res.seconds:.1f} s): {stats}"
            assert seen["off"] is not None and seen["off"].actions[1].out_ifindex == lan.ifindex(LAN1)
        finally:
            r.close()


AGEING_S = 3.0


def test_fdb_entries_of_offloaded_flows_do_not_age_out():
    """Port mode with a 3 s ageing time: the bridge never sees the client's offloaded frames,
    so pyflow refreshes the client's FDB entry (fdbkeep.FdbKeeper). A download of more than
    three ageing times stays on the fast path throughout: the entry is never deleted or
    moved, the connection never taken off, byte-exact."""
    size, port = 16 * MIB, 5321
    cfg = ControlConfig(engine=EngineConfig(), keepalive_period_s=0.2, offload_mark=0x100)
    with bridged_lan() as lan:
        lan.sh("r", f"ip link set {BRIDGE} type bridge ageing_time {int(AGEING_S * 100)}")
        r = BridgedRouter(lan, MODES["ports"], cfg)
        seen: dict = {"gaps": [], "fdb_changes": []}
        with netns.inside(lan.r):
            watch = PathWatcher()
        done = threading.Event()

        def observe():
            try:
                seen["first"] = off = wait_for(lambda: r.offloaded_with(port), 5.0)
                watch.poll(0)  # what came before the offload
                seen["start"] = time.monotonic()
                while not done.is_set():
                    for kind, _i, addr in watch.poll(0.1):
                        if kind == "fdb" and addr == CLIENT_MAC:
                            seen["fdb_changes"].append(time.monotonic() - seen["start"])
                    now = r.offloaded_with(port)
                    if now is not off:
                        seen["gaps"].append(time.monotonic())
                        off = now
                seen["end"] = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                seen["error"] = exc

        try:
            th = threading.Thread(target=observe, daemon=True)
            fwd_before = lan.nft_bytes()
            # 64 KiB every 50 ms: about 13 s, more than three ageing times
            res = tcp_transfer(lan.sv, V4["sv"], port, lan.cl, V4["sv"], port, payload(size, port),
                               upload=False, pace=0.05, timeout=60,
                               gate=lambda: th.start() or wait_for(lambda: r.offloaded_with(port), 5.0))
            seen["done_at"] = time.monotonic() - 0.1  # (its FIN takes it off from here)
            time.sleep(0.05)
            done.set()
            th.join(10)
            watch.close()
            fwd = lan.nft_bytes() - fwd_before
            keeper = r.engine.fdb
            print(f"download {res.seconds:.1f} s, ageing {AGEING_S} s: FDB refreshes {keeper.counts}, "
                  f"rounds {keeper.rounds}, forward chain {fwd} bytes; stats {r.engine.stats}")
            assert "error" not in seen, seen.get("error")
            assert res.received == size and res.received_sha == res.sent_sha
            assert seen.get("first") is not None, f"not offloaded: {r.engine.stats.refused}"
            lasted = seen["end"] - seen["start"]
            assert lasted > 3 * AGEING_S, f"the download lasted {lasted:.1f} s, not three ageing times"
            assert not seen["fdb_changes"], f"the client's FDB entry changed at {seen['fdb_changes']} s"
            assert r.engine.stats.removed.get("path_lost", 0) == 0, r.engine.stats.removed
            # on the fast path throughout: the same connection record until its FIN took it off
            # at the end of the transfer
            early = [t - seen["start"] for t in seen["gaps"] if t < seen["done_at"]]
            assert not early, f"the connection left the fast path at {early} s"
            assert keeper.counts["refreshed"] >= 2, keeper.counts
            assert fwd < size * 0.2, fwd
        finally:
            r.close()
