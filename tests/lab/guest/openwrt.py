"""An OpenWrt-shaped router for guest tests: bridged LAN ports, a tagged WAN port carrying a
PPPoE session to an "ISP" (an access concentrator, pppoe_ac.py), and an internet host behind it.

    c1 (client) -- lan1 ---+                                        isp (concentrator)
      br0 = eth0 + wlan0   |  rt: br-lan (VLAN filtering)             cpe.7 -- pppN
      br0.20 (VLAN 20)     |      br-lan.20 (LAN VLAN 20)               |
                           |      wan -- wan.7 -- pppoe-wan  =========  cpe      inet -- inet
    c2 (client) --+        |      (802.1Q)    (PPPoE, MTU 1492)          (198.18.80.0/24)
                  ap ------+ lan2
    (ap: an access switch / AP bridging c2 and c1's second port, wlan0)

Namespaces (tests.netns, so every one carries the pft- prefix and goes away on exit):
c1, c2, ap, rt, isp, inet. Device names inside the router are OpenWrt's own (lan1, lan2,
wan, wan.7, br-lan, pppoe-wan): they live only in the router's namespace.

- br-lan bridges lan1 and lan2 with VLAN filtering: VLAN 1 untagged (pvid) on both ports,
  VLAN 20 tagged on both and on the bridge itself (br-lan.20 is the router's leg in it).
  198.18.10.0/24, 2001:2:10::/64 untagged; 198.18.20.0/24, 2001:2:20::/64 on VLAN 20.
  c1 (198.18.10.10, 198.18.20.10) sits on lan1; c2 (198.18.10.11) behind ap on lan2.
- c1's addresses live on a bridge of its own (br0) with two ports: eth0, cabled to lan1,
  and wlan0, cabled to ap (so to lan2), same MAC either way. :meth:`OpenWrt.roam` moves c1
  from lan1 to lan2 the way a roaming Wi-Fi client moves: lan1 keeps its carrier, c1's
  frames simply start arriving on lan2, and the router's bridge learns the move from them.
- wan is the WAN port; wan.7 (802.1Q VLAN 7) carries a PPPoE session: pppd with the rp-pppoe
  plugin, interface pppoe-wan, MTU 1492, to the concentrator on the ISP's cpe.7 (its sessions
  run in the kernel at both ends). IPv4 from the
  ISP (198.18.70.1 <-> 198.18.70.2, the same address at every dial), IPv6 over ipv6cp
  with link-local interface ids ::2 (router) and ::1 (ISP), routes set here: the LAN
  prefixes are routed, not translated. :meth:`OpenWrt.redial` ends the session and dials a
  new one (a new session id) while traffic may be running.
- The ISP routes to the internet host inet (198.18.80.2, 2001:2:80::2) and back to the LAN's
  IPv6 prefixes over the session; IPv4 from the LAN is masqueraded by the router on
  pppoe-wan, as fw4 does.
- The router's nftables ruleset is shaped like fw4's: a forward chain with counters for
  established TCP and UDP (what the slow path carried), MSS clamping to the route's MTU on
  the WAN (fw4's mtu_fix, on by default on the wan zone), masquerade on pppoe-wan.
  :meth:`OpenWrt.kernel_flowtable` adds fw4's flow offloading (flowtable on the real ports,
  ``meta l4proto { tcp, udp } flow add @ft``).

Every veth has GRO on and transmit checksum offload off (tests/support/topology.py says why).
Only the pppd processes started here are ended (by PID), then the namespaces are removed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import netns
from tests.lab.guest.lab import lab_log, require_modules
from tests.lab.guest.pppoe_ac import AccessConcentrator, isp_pppd
from tests.support.topology import TEST_OFFLOADS

ROLES = ("c1", "c2", "ap", "rt", "isp", "inet")
LAN_PORTS = ("lan1", "lan2")
WAN, WAN_VLAN, PPP = "wan", "wan.7", "pppoe-wan"
WAN_VID, LAN_VID = 7, 20
PPP_MTU = 1492
ISP_VLAN = "cpe.7"

V4 = {"rt_lan": "198.18.10.1", "c1": "198.18.10.10", "c2": "198.18.10.11",
      "rt_vlan": "198.18.20.1", "c1_vlan": "198.18.20.10",
      "isp_ppp": "198.18.70.1", "rt_ppp": "198.18.70.2",
      "isp_inet": "198.18.80.1", "inet": "198.18.80.2"}
V6 = {"rt_lan": "2001:2:10::1", "c1": "2001:2:10::10", "c2": "2001:2:10::11",
      "rt_vlan": "2001:2:20::1", "c1_vlan": "2001:2:20::10",
      "isp_ppp": "2001:2:70::1", "rt_ppp": "2001:2:70::2",
      "isp_inet": "2001:2:80::1", "inet": "2001:2:80::2"}
LAN6_PREFIXES = ("2001:2:10::/64", "2001:2:20::/64")
C1_MAC = "02:00:c6:12:0a:0a"  # c1's one MAC, on lan1 or lan2

# pppd options common to both ends. Compression of any kind (VJ headers, CCP, address and
# protocol field compression) is off, as on OpenWrt: the frames on the wire are then plain
# PPPoE with IP inside, which is what a flow offload can write and read. LCP echoes are
# sparse and forgiving: under emulation pppd itself may be starved for seconds during a
# bulk transfer, and a strict echo timeout would end the session mid-test. The IPv4 up/down
# scripts are /bin/true so that the host's /etc/ppp ones do nothing to the namespaces (this
# pppd has no such option for IPv6; Debian's ipv6-up scripts do nothing by default).
PPPD_COMMON = ("noauth", "novj", "noccp", "nodeflate", "nobsdcomp", "noaccomp", "nopcomp",
               "mtu", str(PPP_MTU), "mru", str(PPP_MTU), "+ipv6", "lcp-echo-interval", "10",
               "lcp-echo-failure", "30", "ip-up-script", "/bin/true", "ip-down-script", "/bin/true", "debug")

FW4_RULES = """
table inet fw4 {
    counter fwd_tcp {
    }
    counter fwd_udp {
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump flow_offload
        ct state established,related meta l4proto tcp counter name fwd_tcp
        ct state established,related meta l4proto udp counter name fwd_udp
    }
    chain flow_offload {
    }
    chain mangle_forward {
        type filter hook forward priority mangle; policy accept;
        jump mtu_fix
    }
    chain mtu_fix {
        oifname "pppoe-wan" tcp flags syn / fin,syn,rst tcp option maxseg size set rt mtu
        iifname "pppoe-wan" tcp flags syn / fin,syn,rst tcp option maxseg size set rt mtu
    }
    chain srcnat {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pppoe-wan" meta nfproto ipv4 masquerade
    }
}
"""


@dataclass
class Session:
    """One PPPoE session as the router's kernel knows it (/proc/net/pppoe)."""

    sid: int
    ac_mac: str
    device: str


@dataclass
class OpenWrt:
    ns: dict[str, str]  # role -> namespace name
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    session: Session | None = None
    dials: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds to build, to dial
    ac: AccessConcentrator | None = None  # the ISP's end of the sessions

    def __getattr__(self, role: str) -> str:
        ns = self.__dict__.get("ns", {})
        if role in ns:
            return ns[role]
        raise AttributeError(role)

    def sh(self, role: str, cmd, **kw) -> subprocess.CompletedProcess[str]:
        return netns.run(self.ns[role], cmd, **kw)

    # ---- the PPPoE session ----------------------------------------------------------------

    def start_isp(self) -> None:
        """The ISP's access concentrator on its VLAN 7 (pppoe_ac.py): discovery answered from a
        thread, each session's pppd on the kernel's PPPoE channel, so both ends of the session
        forward in the kernel; the router's end is pppd's rp-pppoe plugin, as on OpenWrt."""
        options = [*PPPD_COMMON, f"{V4['isp_ppp']}:{V4['rt_ppp']}", "ipv6", "::1,::2",
                   "logfile", str(self.workdir / "isp-pppd.log")]
        start = isp_pppd(_in(self.ns["isp"]), ISP_VLAN, options, self.workdir / "isp-pppd.out")
        self.ac = AccessConcentrator(self.ns["isp"], ISP_VLAN, start)

    def dial(self, timeout: float = 60.0) -> Session:
        """Start the router's pppd and wait until IPv4 and IPv6 run over the session; then set
        the IPv6 addresses and routes the session does not bring itself."""
        self.dials += 1
        log = open(self.workdir / f"pppd-{self.dials}.out", "ab")  # noqa: SIM115 - kept by the process
        self.procs["pppd"] = subprocess.Popen(
            [*_in(self.ns["rt"]), "pppd", "nodetach", "plugin", "rp-pppoe.so", f"nic-{WAN_VLAN}",
             "ifname", PPP, *PPPD_COMMON, "noipdefault", "defaultroute", "ipv6", "::2,::1",
             "logfile", str(self.workdir / f"pppd-{self.dials}.log")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            sess, isp_dev = self._session(), self._isp_ppp_device()
            if sess is not None and isp_dev is not None:
                break
            pppd = self.procs["pppd"]
            if pppd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PPPoE session not up (pppd {pppd.returncode}):\n{self.ppp_logs()}")
            time.sleep(0.2)
        _ip_batch(self.ns["rt"], [f"addr add {V6['rt_ppp']}/128 dev {PPP} nodad",
                                  f"route replace ::/0 dev {PPP}"])
        _ip_batch(self.ns["isp"], [f"addr add {V6['isp_ppp']}/128 dev {isp_dev} nodad",
                                   *(f"route replace {p} dev {isp_dev}"
                                     for p in (*LAN6_PREFIXES, f"{V6['rt_ppp']}/128"))])
        self.session = sess
        return sess

    def hang_up(self, timeout: float = 30.0) -> None:
        """End the router's pppd (it sends LCP terminate and PADT) and wait until the session
        and the ISP's end of it are gone."""
        pppd = self.procs.pop("pppd", None)
        if pppd is not None:
            _end(pppd)
        deadline = time.monotonic() + timeout
        while not self._gone():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PPPoE session still there after hang-up:\n{self.ppp_logs()}")
            time.sleep(0.2)
        self.session = None

    def redial(self) -> tuple[Session, Session]:
        """Hang up and dial again: (old session, new session)."""
        old = self.session
        assert old is not None, "no session to re-dial"
        self.hang_up()
        return old, self.dial()

    def _session(self) -> Session | None:
        """The router's PPPoE session once IPv4 and IPv6 (ipv6cp) run over it: the session id
        and concentrator MAC from the namespace's /proc/net/pppoe (read from a thread inside
        it: /proc/thread-self/net is the calling thread's namespace)."""
        with netns.inside(self.ns["rt"]), open("/proc/thread-self/net/pppoe") as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == WAN_VLAN:
                # the kernel prints the session id as it is on the wire (network order)
                sid = socket.ntohs(int(parts[0], 16) & 0xFFFF)
                if sid and _ppp_ready(self.ns["rt"], PPP):
                    return Session(sid=sid, ac_mac=parts[1].lower(), device=parts[2])
        return None

    def _gone(self) -> bool:
        """No PPPoE socket left on the router's VLAN and no PPP device at the ISP."""
        with netns.inside(self.ns["rt"]), open("/proc/thread-self/net/pppoe") as f:
            if any(WAN_VLAN in line.split() for line in f.read().splitlines()[1:]):
                return False
        out = subprocess.run(["ip", "-n", self.ns["isp"], "-j", "link", "show", "type", "ppp"],
                             capture_output=True, text=True, timeout=30).stdout
        return not json.loads(out or "[]")

    def _isp_ppp_device(self) -> str | None:
        """The ISP's end of the session once IPv4 and IPv6 run over it."""
        out = subprocess.run(["ip", "-n", self.ns["isp"], "-j", "addr", "show", "type", "ppp"],
                             capture_output=True, text=True, timeout=30).stdout
        for link in json.loads(out or "[]"):
            if _ready(link):
                return link["ifname"]
        return None

    def ppp_logs(self) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.out")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-2000:]}")
        return "\n".join(out)

    # ---- the LAN -----------------------------------------------------------------------------

    def roam(self, to: str = "lan2") -> None:
        """Move c1 to ``to`` (lan1 or lan2) as a roaming wireless client moves: the port it
        left stays up; its frames start arriving on the other one. One ping to the router,
        as a client speaks up after associating, makes the router's bridge learn the move at
        once rather than at c1's next packet of the transfer."""
        if to not in LAN_PORTS:
            raise ValueError(f"roam to lan1 or lan2, not {to!r}")
        leave, join = ("eth0", "wlan0") if to == "lan2" else ("wlan0", "eth0")
        self.sh("c1", ["ip", "link", "set", leave, "nomaster"])
        self.sh("c1", ["ip", "link", "set", join, "master", "br0"])
        self.sh("c1", ["ping", "-c", "1", "-W", "1", V4["rt_lan"]], check=False)

    def fdb_port(self, mac: str = C1_MAC) -> str | None:
        """The router's bridge port where ``mac`` is learned (VLAN 1), if any."""
        out = json.loads(self.sh("rt", ["bridge", "-j", "fdb", "show", "br", "br-lan"]).stdout or "[]")
        for entry in out:
            if entry.get("mac") == mac and entry.get("vlan", 1) == 1 and "self" not in entry.get("flags", []):
                return entry.get("ifname")
        return None

    # ---- nftables --------------------------------------------------------------------------

    def nft(self, script: str, timeout: float = 120) -> None:
        res = subprocess.run(["ip", "netns", "exec", self.ns["rt"], "nft", "-f", "-"], input=script,
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"nft failed: {res.stderr.strip()}\n{script}")

    def kernel_flowtable(self) -> None:
        """Flow offloading as fw4 sets it up: a flowtable on the real ports under br-lan and
        pppoe-wan (the ingress hook sits on the devices frames arrive on) and ``flow add`` for
        TCP and UDP at the head of the forward chain."""
        devices = ", ".join(f'"{d}"' for d in (*LAN_PORTS, WAN))
        self.nft(f"add flowtable inet fw4 ft {{ hook ingress priority 0; devices = {{ {devices} }}; "
                 "counter; }\n"
                 "add rule inet fw4 flow_offload meta l4proto { tcp, udp } flow add @ft\n")

    def mss_clamp(self, on: bool) -> None:
        rules = "".join(f"add rule inet fw4 mtu_fix {d} \"{PPP}\" tcp flags syn / fin,syn,rst "
                        "tcp option maxseg size set rt mtu\n" for d in ("oifname", "iifname"))
        self.nft("flush chain inet fw4 mtu_fix\n" + (rules if on else ""))

    def nft_counter(self, name: str) -> tuple[int, int]:
        """(packets, bytes) of a named counter of the router's forward chain."""
        out = self.sh("rt", ["nft", "-j", "list", "counter", "inet", "fw4", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"], item["counter"]["bytes"]
        raise AssertionError(f"no counter {name}")

    # ---- teardown --------------------------------------------------------------------------

    def stop_ppp(self) -> None:
        """End what this topology started: the router's pppd, then the ISP's concentrator and
        its pppd per session, each by PID."""
        pppd = self.procs.pop("pppd", None)
        if pppd is not None:
            _end(pppd)
        if self.ac is not None:
            self.ac.close()
            self.ac = None


def _in(ns: str) -> list[str]:
    """Run in ``ns``'s network namespace only (nsenter execs the program: the Popen's PID is
    the program's own, so it can be ended by that PID)."""
    return ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{ns}", "--"]


def _end(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _build(ns: dict[str, str]) -> None:
    """Everything but the PPPoE session, as one shell script: under emulation every process
    costs, and ``ip -n NS -batch`` makes a namespace's links and addresses in one."""
    rt, c1, c2, ap, isp, inet = (ns[r] for r in ("rt", "c1", "c2", "ap", "isp", "inet"))
    batches: dict[str, list[str]] = {name: [] for name in ns.values()}

    def veth(ns_a: str, a: str, ns_b: str, b: str) -> None:
        # made inside ns_a with the peer created straight in ns_b: nothing on the host
        batches[ns_a] += [f"link add {a} type veth peer name {b} netns {ns_b}", f"link set dev {a} up"]
        batches[ns_b].append(f"link set dev {b} up")

    veth(rt, "lan1", c1, "eth0")
    veth(rt, "lan2", ap, "uplink")
    veth(rt, WAN, isp, "cpe")
    veth(ap, "c2", c2, "eth0")
    veth(ap, "c1", c1, "wlan0")
    veth(isp, "inet", inet, "eth0")
    # the router's LAN bridge with VLAN filtering, as OpenWrt's bridge-vlan sections make it
    batches[rt] += ["link add br-lan type bridge vlan_filtering 1",
                    *(f"link set dev {port} master br-lan" for port in LAN_PORTS),
                    "link set dev br-lan up",
                    f"link add link br-lan name br-lan.{LAN_VID} type vlan id {LAN_VID}",
                    f"link set dev br-lan.{LAN_VID} up",
                    f"link add link {WAN} name {WAN_VLAN} type vlan id {WAN_VID}",
                    f"link set dev {WAN_VLAN} up"]
    # c1: one MAC on a bridge of its own, cabled to lan1 (eth0) now, to ap (wlan0) later
    batches[c1] += ["link add br0 type bridge", f"link set dev br0 address {C1_MAC}",
                    "link set dev eth0 master br0", "link set dev br0 up",
                    f"link add link br0 name br0.{LAN_VID} type vlan id {LAN_VID}",
                    f"link set dev br0.{LAN_VID} up"]
    # ap: a plain switch (no VLAN filtering: tagged frames pass as they are)
    batches[ap] += ["link add br0 type bridge",
                    *(f"link set dev {port} master br0" for port in ("uplink", "c2", "c1")),
                    "link set dev br0 up"]
    batches[isp] += [f"link add link cpe name {ISP_VLAN} type vlan id {WAN_VID}",
                     f"link set dev {ISP_VLAN} up"]
    for name, dev, key in ((rt, "br-lan", "rt_lan"), (rt, f"br-lan.{LAN_VID}", "rt_vlan"), (c1, "br0", "c1"),
                           (c1, f"br0.{LAN_VID}", "c1_vlan"), (c2, "eth0", "c2"), (isp, "inet", "isp_inet"),
                           (inet, "eth0", "inet")):
        batches[name] += [f"addr add {V4[key]}/24 dev {dev}", f"addr add {V6[key]}/64 dev {dev} nodad"]
    for name, v4, v6 in ((c1, "rt_lan", "rt_lan"), (c2, "rt_lan", "rt_lan"), (inet, "isp_inet", "isp_inet")):
        batches[name] += [f"route add default via {V4[v4]}", f"route add default via {V6[v6]}"]
    # c1's VLAN 20 address reaches the internet through the router's leg in VLAN 20
    # (a batch line takes no -6: a route's family follows from its gateway, a rule's does not)
    batches[c1] += [f"rule add from {V4['c1_vlan']} table 20",
                    f"route add default via {V4['rt_vlan']} table 20",
                    f"route add default via {V6['rt_vlan']} table 20"]

    order = (rt, ap, isp, c1, c2, inet)  # a veth's maker before the namespace of its peer
    lines = ["set -e"]
    for name in order:
        # usable at once (tests/support/topology.py: link-local DAD would hold IPv6 back);
        # set before the links exist, so that they inherit it
        lines.append(f"{_nsenter(name)} sysctl -qw net.ipv6.conf.all.accept_dad=0 "
                     "net.ipv6.conf.default.accept_dad=0")
    for name in (rt, isp):
        lines.append(f"{_nsenter(name)} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    for name in order:
        lines.append(f"ip -n {name} -batch - <<'EOF'\n" + "\n".join(batches[name]) + "\nEOF")
    lines.append(f"ip -6 -n {c1} rule add from {V6['c1_vlan']} table 20")
    lines += [f"bridge -n {rt} vlan add dev {port} vid {LAN_VID}" for port in LAN_PORTS]
    lines.append(f"bridge -n {rt} vlan add dev br-lan vid {LAN_VID} self")
    ethtool = {rt: ("lan1", "lan2", WAN), ap: ("uplink", "c2", "c1"), c1: ("eth0", "wlan0"), c2: ("eth0",),
               isp: ("cpe", "inet"), inet: ("eth0",)}
    for name, devs in ethtool.items():
        # not every driver has every feature; the veth's own defaults remain then
        lines.append(f"{_nsenter(name)} sh -c '" + "; ".join(f"ethtool -K {d} {TEST_OFFLOADS} 2>/dev/null"
                                                          for d in devs) + "; true'")
    lines.append(f"{_nsenter(rt)} nft -f - <<'EOF'\n{FW4_RULES}\nEOF")
    res = subprocess.run(["sh", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"building the OpenWrt topology failed ({res.returncode}): {res.stderr.strip()}")


def _ready(link: dict) -> bool:
    """IPv4 and an IPv6 link-local address (ipv6cp done) on an up PPP device (ip -j addr)."""
    fams = {(a["family"], a.get("scope")) for a in link.get("addr_info", [])}
    return "UP" in link.get("flags", []) and ("inet", "global") in fams and ("inet6", "link") in fams


def _ppp_ready(ns: str, dev: str) -> bool:
    res = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "dev", dev], capture_output=True, text=True,
                         timeout=30)
    return res.returncode == 0 and _ready(json.loads(res.stdout)[0])


def _ip_batch(ns: str, lines: list[str]) -> None:
    res = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch failed: {res.stderr.strip()}\n" + "\n".join(lines))


def _nsenter(ns: str) -> str:
    return " ".join(_in(ns))


def missing_tools() -> str | None:
    """What the topology needs and this system lacks, or None."""
    for tool, package in (("pppd", "ppp"), ("bridge", "iproute2")):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"{tool} not installed (Debian package {package}; make lab-setup)"
    if not any(Path("/usr/lib/pppd").glob("*/rp-pppoe.so")):
        return "pppd's rp-pppoe plugin not installed (Debian package ppp)"
    return None


@contextlib.contextmanager
def lab_openwrt(label: str) -> Iterator[OpenWrt]:
    """openwrt() for a guest test module's fixture: skips, naming it, where the lab lacks a
    module or tool the topology needs, and logs its progress under ``label``."""
    require_modules("pppoe", "8021q", "bridge")
    why = missing_tools()
    if why:
        pytest.skip(why)
    lab_log(f"{label}: building the topology and dialing PPPoE")
    with openwrt() as topo:
        lab_log(f"{label}: session {topo.session}, {topo.timings}")
        yield topo


@contextlib.contextmanager
def openwrt(*, dial: bool = True) -> Iterator[OpenWrt]:
    """The topology, with the PPPoE session up when ``dial``; everything removed on exit."""
    with contextlib.ExitStack() as stack:
        names = stack.enter_context(netns.namespaces(*(f"ow{r}" for r in ROLES)))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pft-openwrt-")))
        topo = OpenWrt(ns=dict(zip(ROLES, names, strict=True)), workdir=workdir)
        stack.callback(topo.stop_ppp)
        t0 = time.monotonic()
        _build(topo.ns)
        topo.start_isp()
        topo.timings["build_s"] = round(time.monotonic() - t0, 1)
        if dial:
            t0 = time.monotonic()
            topo.dial()
            topo.timings["dial_s"] = round(time.monotonic() - t0, 1)
        yield topo

