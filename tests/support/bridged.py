"""A router whose LAN is a bridge, and a client that can move between its ports.

    client [pft-cbr: pft-c1 | pft-c2] ---- pft-lan1 \\
                                                     pft-br (router) ---- pft-wan ---- pft-sv0 server
                                     ---- pft-lan2 /

- LAN 198.18.1.0/24, 2001:2:1::/64: the router's address on its bridge pft-br (over
  ports pft-lan1 and pft-lan2), the client's on a bridge of its own, pft-cbr, with a
  fixed MAC. The client's bridge has one of pft-c1 (peer of pft-lan1) and pft-c2 (peer of
  pft-lan2) as its port at a time: moving it is the client roaming to another port or
  radio, its MAC unchanged, as the router's bridge sees it.
- WAN 198.18.3.0/24, 2001:2:3::/64: the router masquerades what leaves on pft-wan.
- The router's forward chain counts established TCP (counter fwd_tcp), so a test sees
  how many bytes the kernel path carried.

Built with tests.support.topology (GRO on, transmit checksum offload off on every veth
end; the client's bridge gets the same, it sends the client's packets).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyflow.control.runner import ControlConfig, ControlPlane
from pyflow.datapath.loader import Datapath
from tests import netns
from tests.pins import pin_dir
from tests.support.topology import TEST_OFFLOADS, Spec, Veth, network

CLIENT_MAC = "02:00:5e:10:02:02"
V4 = {"cl": "198.18.1.2", "r_lan": "198.18.1.1", "r_wan": "198.18.3.1", "sv": "198.18.3.2"}
V6 = {"cl": "2001:2:1::2", "r_lan": "2001:2:1::1", "r_wan": "2001:2:3::1", "sv": "2001:2:3::2"}
BRIDGE, LAN1, LAN2, WAN = "pft-br", "pft-lan1", "pft-lan2", "pft-wan"

NFT = """
table inet pft {
    counter fwd_tcp {
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        ct state established,related meta l4proto tcp counter name fwd_tcp
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "pft-wan" masquerade
    }
}
"""


@dataclass
class BridgedLan:
    cl: str
    r: str
    sv: str
    port: int = 1  # the router port the client is behind now
    napi: list[int] = field(default_factory=list)  # the router ports' NAPI threads (threaded=True)

    def sh(self, role: str, cmd: str | list[str]) -> None:
        netns.run(getattr(self, role), cmd)

    def move_client(self, to: int, *, unplug: bool = False) -> None:
        """The client leaves its port for the other one (pft-c1 <-> pft-c2 in its bridge);
        ``unplug``: its old link goes down first (the router's port loses carrier and its
        bridge forgets what it learned there), as when a cable is moved."""
        old, new = f"pft-c{self.port}", f"pft-c{to}"
        if unplug:
            self.sh("cl", f"ip link set {old} down")
        self.sh("cl", f"ip link set {old} nomaster")
        self.sh("cl", f"ip link set {new} master pft-cbr")
        self.port = to

    def nft_bytes(self) -> int:
        out = netns.run(self.r, ["nft", "-j", "list", "counter", "inet", "pft", "fwd_tcp"]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["bytes"])
        raise AssertionError("no counter fwd_tcp")

    def tx_packets(self, ifname: str) -> int:
        return int(netns.run(self.r, ["cat", f"/sys/class/net/{ifname}/statistics/tx_packets"]).stdout)

    def ifindex(self, ifname: str) -> int:
        return netns.ifindex(self.r, ifname)


def spec(*, threaded: bool = False) -> Spec:
    """``threaded``: the router's ports run NAPI in kernel threads of their own (a benchmark
    reads their CPU time: every packet the router forwards, in every mode, is handled there)."""
    return Spec(
        namespaces={"cl": "bcl", "r": "brt", "sv": "bsv"},
        veths=(Veth("cl", "pft-c1", "r", LAN1), Veth("cl", "pft-c2", "r", LAN2),
               Veth("r", WAN, "sv", "pft-sv0")),
        addrs=(("r", WAN, f"{V4['r_wan']}/24"), ("r", WAN, f"{V6['r_wan']}/64"),
               ("sv", "pft-sv0", f"{V4['sv']}/24"), ("sv", "pft-sv0", f"{V6['sv']}/64")),
        forwarding=("r",),
        routes=(("sv", "default", V4["r_wan"]), ("sv", "default", V6["r_wan"])),
        nft={"r": NFT},
        threaded={"router": [("r", WAN), ("r", LAN1), ("r", LAN2)]} if threaded else {},
    )


@contextlib.contextmanager
def bridged_lan(*, threaded: bool = False) -> Iterator[BridgedLan]:
    with network(spec(threaded=threaded)) as net:
        lan = BridgedLan(net.ns["cl"], net.ns["r"], net.ns["sv"], napi=net.napi.get("router", []))
        for cmd in (f"ip link add {BRIDGE} type bridge", f"ip link set {LAN1} master {BRIDGE}",
                    f"ip link set {LAN2} master {BRIDGE}", f"ip link set {BRIDGE} up",
                    f"ip addr add {V4['r_lan']}/24 dev {BRIDGE}"):
            lan.sh("r", cmd)
        lan.sh("r", ["ip", "-6", "addr", "add", f"{V6['r_lan']}/64", "dev", BRIDGE, "nodad"])
        for cmd in ("ip link add pft-cbr type bridge", f"ip link set pft-cbr address {CLIENT_MAC}",
                    "ip link set pft-c1 master pft-cbr", "ip link set pft-cbr up",
                    f"ip addr add {V4['cl']}/24 dev pft-cbr", f"ip route add default via {V4['r_lan']}"):
            lan.sh("cl", cmd)
        lan.sh("cl", f"ethtool -K pft-cbr {TEST_OFFLOADS}".split())
        lan.sh("cl", ["ip", "-6", "addr", "add", f"{V6['cl']}/64", "dev", "pft-cbr", "nodad"])
        lan.sh("cl", ["ip", "-6", "route", "add", "default", "via", V6["r_lan"]])
        yield lan


class BridgedRouter:
    """pyflow on the router: the datapath on ``devices`` (auto mode) and the control loop."""

    def __init__(self, lan: BridgedLan, devices: tuple[str, ...], config: ControlConfig):
        self.lan = lan
        self.pin = pin_dir("brt")
        with netns.inside(lan.r):
            self.dp = Datapath(pin_dir=self.pin, state_file=f"/run/{self.pin.rsplit('/', 1)[1]}.json")
            self.modes = {dev: self.dp.attach(dev, "auto") for dev in devices}
            self.cp = ControlPlane(self.dp, config)
            self.cp.start()

    @property
    def engine(self):
        return self.cp.engine

    def offloaded_with(self, port: int):
        for off in list(self.engine.offloaded.values()):
            if port in (off.conn.orig.sport, off.conn.orig.dport):
                return off
        return None

    def forwarded_bytes(self) -> int:
        return self.dp.reason_counts()["forwarded"][1]

    def close(self) -> None:
        with netns.inside(self.lan.r):
            self.cp.stop(hand_back=True)
            self.dp.destroy()
