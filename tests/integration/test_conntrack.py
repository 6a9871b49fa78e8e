"""The ctnetlink adapter against the real kernel.

    client ---- router (nftables: ct state rules, masquerade, a zone, a mark) ---- server
    198.18.1.2  198.18.1.1 | 198.18.2.1                                    198.18.2.2
    2001:2:0:1::2  2001:2:0:1::1 | 2001:2:0:2::1                           2001:2:0:2::2

Real TCP and UDP connections cross the router; the adapter lives in the router's
namespace. What it reports is checked against the kernel's own view through other
tools where one exists: the ``conntrack`` CLI (marks, timeouts) and pyroute2's
NFCTSocket (TCP window-tracking flags), so the adapter is not its own witness.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyflow.control import conntrack as ctmod
from pyflow.control.conntrack import ConntrackError, CtNetlink
from pyflow.control.model import (
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    CtEvent,
    EventType,
    Tuple,
)
from pyflow.errors import PyflowError
from pyflow.netlink import uapi, wire
from pyflow.netlink.sock import NetlinkSocket, group_mask
from tests import netns

pytestmark = pytest.mark.root

ADDR: dict[int, dict[str, str]] = {
    socket.AF_INET: {"client": "198.18.1.2", "r_in": "198.18.1.1", "r_out": "198.18.2.1",
                     "server": "198.18.2.2"},
    socket.AF_INET6: {"client": "2001:2:0:1::2", "r_in": "2001:2:0:1::1", "r_out": "2001:2:0:2::1",
                      "server": "2001:2:0:2::2"},
}
PLEN: dict[int, int] = {socket.AF_INET: 24, socket.AF_INET6: 64}
FAMILIES = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
TCP_STATE_SYN_SENT = 1
LIBERAL = 0x08  # IP_CT_TCP_FLAG_BE_LIBERAL
MARKED_PORT = 5002  # new TCP connections to it get ct mark 0x1100 (bits the adapter must keep)
PRESET_MARK = 0x1100
ZONE_PORT = 7000  # UDP to and from it is tracked in zone 7
ZONE = 7
ORIG_ZONE_PORT, ORIG_ZONE = 7001, 9  # UDP to it is tracked in zone 9 in the original direction only

# nft -f wants a newline before every closing brace
RULES = f"""
table inet pft {{
    chain raw {{
        type filter hook prerouting priority raw; policy accept;
        iifname "pft-rc" udp dport {ZONE_PORT} ct zone set {ZONE}
        iifname "pft-rs" udp sport {ZONE_PORT} ct zone set {ZONE}
        iifname "pft-rc" udp dport {ORIG_ZONE_PORT} ct original zone set {ORIG_ZONE}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        ct state new tcp dport {MARKED_PORT} ct mark set {PRESET_MARK:#x}
        ct state new accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pft-rs" masquerade
    }}
}}
"""


@dataclass
class Lab:
    client: str
    router: str
    server: str

    def ct(self, **kwargs) -> CtNetlink:
        """An adapter whose sockets live in the router's namespace."""
        with netns.inside(self.router):
            return CtNetlink(**kwargs)

    def cli(self, *args: str) -> str:
        return netns.run(self.router, ["conntrack", *args], check=False).stdout

    def sock(self, where: str, family: int, kind: int) -> socket.socket:
        with netns.inside(getattr(self, where)):
            s = socket.socket(family, kind)
        s.settimeout(3)
        return s


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with netns.namespaces("ctc", "ctr", "cts") as (c, r, s):
        netns.veth(c, "pft-c", r, "pft-rc")
        netns.veth(r, "pft-rs", s, "pft-s")
        for fam, a in ADDR.items():
            plen = PLEN[fam]
            extra = ["nodad"] if fam == socket.AF_INET6 else []
            for ns, dev, key in ((c, "pft-c", "client"), (r, "pft-rc", "r_in"),
                                 (r, "pft-rs", "r_out"), (s, "pft-s", "server")):
                netns.run(ns, ["ip", "addr", "add", f"{a[key]}/{plen}", "dev", dev, *extra])
        netns.run(c, "ip route add default via 198.18.1.1")
        netns.run(c, "ip -6 route add default via 2001:2:0:1::1")
        netns.run(r, "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=RULES, text=True,
                       check=True, capture_output=True)
        yield Lab(c, r, s)


# -- helpers -------------------------------------------------------------


@dataclass
class TcpConn:
    client: socket.socket
    server: socket.socket
    listener: socket.socket

    @property
    def sport(self) -> int:
        return self.client.getsockname()[1]

    def close(self, rst: bool = False) -> None:
        if rst:  # linger 0: close() sends RST
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for s in (self.client, self.server, self.listener):
            s.close()


def tcp_connect(lab: Lab, family: int, port: int) -> TcpConn:
    """An established TCP connection client -> server:port through the router, data both ways."""
    a = ADDR[family]
    lst = lab.sock("server", family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((a["server"], port))
    lst.listen(1)
    cl = lab.sock("client", family, socket.SOCK_STREAM)
    cl.connect((a["server"], port))
    srv, _ = lst.accept()
    srv.settimeout(3)
    cl.sendall(b"ping")
    assert srv.recv(4) == b"ping"
    srv.sendall(b"pong")
    assert cl.recv(4) == b"pong"
    return TcpConn(cl, srv, lst)


def udp_exchange(lab: Lab, family: int, port: int, *, reply: bool = True) -> int:
    """One UDP datagram client -> server:port (and one back); returns the client's port."""
    a = ADDR[family]
    srv = lab.sock("server", family, socket.SOCK_DGRAM)
    srv.bind((a["server"], port))
    cl = lab.sock("client", family, socket.SOCK_DGRAM)
    try:
        cl.sendto(b"hello", (a["server"], port))
        data, peer = srv.recvfrom(64)
        assert data == b"hello"
        if reply:
            srv.sendto(b"back", peer)
            assert cl.recv(64) == b"back"
        return cl.getsockname()[1]
    finally:
        cl.close()
        srv.close()


def find(conns: list[Conn], family: int, proto: int, sport: int, dport: int) -> Conn:
    want = (family, proto, ADDR[family]["client"], sport, dport)
    hits = [c for c in conns if (c.family, c.proto, c.orig.src, c.orig.sport, c.orig.dport) == want]
    assert len(hits) == 1, f"want one {family}/{proto} {sport}->{dport} entry, have {hits}"
    return hits[0]


def gather(ct: CtNetlink, until: Callable[[list[CtEvent | None]], bool], limit: float = 3.0
           ) -> list[CtEvent | None]:
    events: list[CtEvent | None] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        events += ct.poll(0.1)
        if until(events):
            break
    return events


def mine(events: list[CtEvent | None], proto: int, sport: int) -> list[CtEvent]:
    return [e for e in events if e is not None and e.conn.proto == proto and e.conn.orig.sport == sport]


def tcp_flags(lab: Lab, conn: Conn) -> tuple[int, int]:
    """Window-tracking flags of both directions as pyroute2's own decoder reads them."""
    from pyroute2 import NFCTSocket

    nf = NFCTSocket(netns=lab.router, nfgen_family=conn.family)
    try:
        for m in nf.dump():
            t = m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_PROTO")
            if t.get_attr("CTA_PROTO_NUM") == 6 and t.get_attr("CTA_PROTO_SRC_PORT") == conn.orig.sport:
                tcp = m.get_attr("CTA_PROTOINFO").get_attr("CTA_PROTOINFO_TCP")
                return (tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL")[0],
                        tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_REPLY")[0])
    finally:
        nf.close()
    raise AssertionError(f"no TCP entry from port {conn.orig.sport}")


def cli_line(lab: Lab, conn: Conn) -> str:
    proto = "tcp" if conn.proto == 6 else "udp"
    args = ["-L", "-f", "ipv4" if conn.family == socket.AF_INET else "ipv6", "-p", proto,
            "--orig-port-src", str(conn.orig.sport), "--orig-port-dst", str(conn.orig.dport)]
    if conn.zone:
        args += ["-w", str(conn.zone)]
    lines = [ln for ln in lab.cli(*args).splitlines() if ln.startswith(proto)]
    assert len(lines) == 1, lines
    return lines[0]


# -- dump ----------------------------------------------------------------


@FAMILIES
def test_dump_reads_tcp_and_udp_with_nat(lab: Lab, family: int) -> None:
    a = ADDR[family]
    port = 5001 if family == socket.AF_INET else 5011
    tcp = tcp_connect(lab, family, port)
    udp_port = udp_exchange(lab, family, 6001)
    zoned_port = udp_exchange(lab, family, ZONE_PORT)
    marked = tcp_connect(lab, family, MARKED_PORT)
    # an ICMP entry the adapter must skip
    netns.run(lab.client, ["ping", "-c1", "-W2", a["server"]])
    try:
        with lab.ct(subscribe=False) as ct:
            conns = ct.dump()
        assert conns and all(c.proto in (6, 17) for c in conns)
        assert "icmp" in lab.cli("-L", "-f", "ipv4" if family == socket.AF_INET else "ipv6")

        c = find(conns, family, 6, tcp.sport, port)
        assert c.orig == Tuple(a["client"], a["server"], tcp.sport, port)
        # masquerade: the server answers the router's outer address
        assert (c.reply.src, c.reply.dst, c.reply.sport) == (a["server"], a["r_out"], port)
        assert c.tcp_state == TCP_CONNTRACK_ESTABLISHED
        bits = IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT
        assert c.status & bits == bits
        assert (c.mark, c.zone, c.helper) == (0, 0, None)
        assert c.timeout is not None and c.timeout > 3600  # established: days
        assert c.ct_id is not None

        u = find(conns, family, 17, udp_port, 6001)
        assert u.reply == Tuple(a["server"], a["r_out"], 6001, u.reply.dport)
        assert u.status & IPS_SEEN_REPLY and u.tcp_state is None and u.zone == 0
        assert u.timeout is not None and 0 < u.timeout <= 120

        z = find(conns, family, 17, zoned_port, ZONE_PORT)
        assert z.zone == ZONE
        m = find(conns, family, 6, marked.sport, MARKED_PORT)
        assert m.mark == PRESET_MARK
    finally:
        tcp.close()
        marked.close()


def test_dump_sees_many_entries_of_both_families(lab: Lab) -> None:
    n = 300
    for family in ADDR:
        u = lab.sock("client", family, socket.SOCK_DGRAM)
        for i in range(n):
            u.sendto(b"x", (ADDR[family]["server"], 30000 + i))
        u.close()
    with lab.ct(subscribe=False) as ct:
        deadline = time.monotonic() + 3
        while True:
            conns = ct.dump()
            got = {(c.family, c.orig.dport) for c in conns
                   if c.proto == 17 and 30000 <= c.orig.dport < 30000 + n}
            if len(got) == 2 * n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert len(got) == 2 * n


# -- events --------------------------------------------------------------


@FAMILIES
def test_events_follow_a_connection_from_new_to_destroy(lab: Lab, family: int) -> None:
    port = 5101 if family == socket.AF_INET else 5111
    with lab.ct() as ct:
        tcp = tcp_connect(lab, family, port)
        sport = tcp.sport
        ev = gather(ct, lambda e: any(x.conn.tcp_state == TCP_CONNTRACK_ESTABLISHED
                                      for x in mine(e, 6, sport)))
        first, *rest = mine(ev, 6, sport)
        assert first.type == EventType.NEW and first.conn.tcp_state == TCP_STATE_SYN_SENT
        assert first.conn.timeout is not None
        assert rest and all(e.type == EventType.UPDATE for e in rest)
        est = [e for e in rest if e.conn.tcp_state == TCP_CONNTRACK_ESTABLISHED][0]
        assert est.conn.status & IPS_SEEN_REPLY
        assert est.conn.reply.dst == ADDR[family]["r_out"]

        # Our own change is not echoed back to us; another process's is.
        assert ct.refresh(est.conn, 900)
        lab.cli("-U", "-f", "ipv4" if family == socket.AF_INET else "ipv6", "-p", "tcp",
                "--orig-port-src", str(sport), "--mark", "9")
        ev = gather(ct, lambda e: bool(mine(e, 6, sport)))
        ups = mine(ev, 6, sport)
        assert [e.type for e in ups] == [EventType.UPDATE] and ups[0].conn.mark == 9

        lab.cli("-D", "-f", "ipv4" if family == socket.AF_INET else "ipv6", "-p", "tcp",
                "--orig-port-src", str(sport))
        ev = gather(ct, lambda e: any(x.type == EventType.DESTROY for x in mine(e, 6, sport)))
        gone = [e for e in mine(ev, 6, sport) if e.type == EventType.DESTROY]
        assert len(gone) == 1
        assert gone[0].conn.orig == est.conn.orig and gone[0].conn.mark == 9
        tcp.close(rst=True)
        assert ct.lost_events == 0


def test_overrun_reports_loss_and_resync_marker(lab: Lab) -> None:
    n = 3000
    base = 40000
    tiny = lab.ct(rcvbuf=4096)
    big = lab.ct()
    try:
        assert tiny.rcvbuf < 16384 and big.rcvbuf >= 8 << 20
        u = lab.sock("client", socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(n):
            u.sendto(b"x", (ADDR[socket.AF_INET]["server"], base + i))
        u.close()

        # the tiny buffer overran: events so far, then the RESYNC marker
        ev = gather(tiny, lambda e: None in e)
        assert ev and ev[-1] is None and ev.count(None) == 1
        assert tiny.lost_events >= 1
        # what was still queued predates the dump the caller now makes: dropped, not replayed
        assert tiny.discarded_events > 0
        stale = [e for e in tiny.poll(0.1) if e is not None and base <= e.conn.orig.dport < base + n]
        assert stale == []
        # ... and the adapter carries on: the dump still sees every entry
        burst = {c.orig.dport for c in tiny.dump() if c.proto == 17 and base <= c.orig.dport < base + n}
        assert len(burst) == n

        # the default buffer holds the whole burst: every NEW, nothing lost
        def all_new(e: list[CtEvent | None]) -> bool:
            ports = {x.conn.orig.dport for x in e if x is not None and x.type == EventType.NEW}
            return len(ports & set(range(base, base + n))) == n

        ev = gather(big, all_new, limit=5)
        assert None not in ev and big.lost_events == 0
    finally:
        tiny.close()
        big.close()


def test_changes_in_bulk_do_not_overrun_the_event_socket(lab: Lab) -> None:
    """Every change sent comes back on the event socket; 3000 of them fill a 256 KiB buffer
    several times over. Sending them in bulk reads those echoes off as it goes: no overrun,
    no resync marker, and an event of someone else's that came meanwhile is kept for
    poll(), which returns it without waiting on the socket."""
    n, base = 3000, 44000
    # the kernel gives an entry its event cache only if someone listens when it is made (an
    # entry from before any listener never reports an event): a listener while they are
    # made, the adapter under test only after (so that their NEW events are not in its way)
    listener = lab.ct()
    u = lab.sock("client", socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        u.sendto(b"x", (ADDR[socket.AF_INET]["server"], base + i))
    ct = lab.ct(rcvbuf=256 << 10, offload_mark=0x100)
    listener.close()
    try:
        conns = [c for c in ct.dump() if c.proto == 17 and base <= c.orig.dport < base + n]
        assert len(conns) == n
        u.sendto(b"x", (ADDR[socket.AF_INET]["server"], base + n))  # someone else's, queued now
        deadline = time.monotonic() + 2
        while not select.select([ct.fileno()], [], [], 0.05)[0] and time.monotonic() < deadline:
            pass
        u.close()
        assert all(ct.mark_offloaded_many(conns, True, timeout_s=600))
        assert ct.lost_events == 0 and ct.discarded_events == 0
        assert ct.backlog >= 1 and not select.select([ct.fileno()], [], [], 0)[0]
        got = ct.poll(0)
        assert None not in got
        assert [e.conn.orig.dport for e in got if e is not None] == [base + n]
        assert ct.backlog == 0
    finally:
        ct.close()


# -- changes -------------------------------------------------------------


@FAMILIES
def test_refresh_sets_the_timeout_the_kernel_reports(lab: Lab, family: int) -> None:
    port = 5201 if family == socket.AF_INET else 5211
    tcp = tcp_connect(lab, family, port)
    try:
        with lab.ct(subscribe=False) as ct:
            c = find(ct.dump(), family, 6, tcp.sport, port)
            assert (c.timeout or 0) > 1000
            assert ct.refresh(c, 777)
            assert find(ct.dump(), family, 6, tcp.sport, port).timeout in (775, 776, 777)
            assert int(cli_line(lab, c).split()[2]) in (775, 776, 777)

            # zones are part of the lookup: the zoned UDP entry is found only in its zone
            zport = udp_exchange(lab, family, ZONE_PORT)
            z = find(ct.dump(), family, 17, zport, ZONE_PORT)
            assert z.zone == ZONE
            assert ct.refresh(z, 55)
            assert find(ct.dump(), family, 17, zport, ZONE_PORT).timeout in (53, 54, 55)
            assert int(cli_line(lab, z).split()[2]) in (53, 54, 55)
            assert not ct.refresh(Conn(z.family, z.proto, z.orig, z.reply, zone=0), 55)
            # a zone of the original direction only (reported inside the tuple)
            oport = udp_exchange(lab, family, ORIG_ZONE_PORT)
            o = find(ct.dump(), family, 17, oport, ORIG_ZONE_PORT)
            assert o.zone == ORIG_ZONE
            assert ct.refresh(o, 44)
            assert find(ct.dump(), family, 17, oport, ORIG_ZONE_PORT).timeout in (42, 43, 44)

            # gone entries: False, not an error
            ghost = Conn(family, 6, Tuple(ADDR[family]["client"], ADDR[family]["server"], 1, 2), c.reply)
            assert not ct.refresh(ghost, 30)
    finally:
        tcp.close()


@FAMILIES
def test_mark_offloaded_sets_mark_bit_and_liberal_flags(lab: Lab, family: int) -> None:
    tcp = tcp_connect(lab, family, MARKED_PORT)
    try:
        with lab.ct(subscribe=False, offload_mark=0x4) as ct:
            c = find(ct.dump(), family, 6, tcp.sport, MARKED_PORT)
            assert c.mark == PRESET_MARK
            assert all(not f & LIBERAL for f in tcp_flags(lab, c))

            assert ct.mark_offloaded(c, True)
            assert find(ct.dump(), family, 6, tcp.sport, MARKED_PORT).mark == PRESET_MARK | 0x4
            assert f"mark={PRESET_MARK | 0x4} " in cli_line(lab, c)
            orig_flags, reply_flags = tcp_flags(lab, c)
            assert orig_flags & LIBERAL and reply_flags & LIBERAL

            assert ct.mark_offloaded(c, False)
            assert find(ct.dump(), family, 6, tcp.sport, MARKED_PORT).mark == PRESET_MARK
            assert f"mark={PRESET_MARK} " in cli_line(lab, c)
            # liberal stays: window tracking missed what the fast path forwarded
            assert all(f & LIBERAL for f in tcp_flags(lab, c))

            # the connection still works through the slow path
            tcp.client.sendall(b"again")
            assert tcp.server.recv(5) == b"again"

            ghost = Conn(family, 6, Tuple(ADDR[family]["client"], ADDR[family]["server"], 1, 2), c.reply)
            assert not ct.mark_offloaded(ghost, True)
            assert not ct.mark_offloaded(ghost, False)
    finally:
        tcp.close()


def test_mark_offloaded_udp_and_without_a_mark(lab: Lab) -> None:
    family = socket.AF_INET
    uport = udp_exchange(lab, family, 6101)
    tcp = tcp_connect(lab, family, 5301)
    try:
        with lab.ct(subscribe=False, offload_mark=0x80000000) as ct:
            u = find(ct.dump(), family, 17, uport, 6101)
            assert ct.mark_offloaded(u, True)
            assert find(ct.dump(), family, 17, uport, 6101).mark == 0x80000000
            assert "mark=2147483648 " in cli_line(lab, u)
            assert ct.mark_offloaded(u, False)
            assert find(ct.dump(), family, 17, uport, 6101).mark == 0
        with lab.ct(subscribe=False) as ct:  # offload_mark 0: the mark is never touched
            t = find(ct.dump(), family, 6, tcp.sport, 5301)
            assert ct.mark_offloaded(t, True)
            assert find(ct.dump(), family, 6, tcp.sport, 5301).mark == 0
            assert all(f & LIBERAL for f in tcp_flags(lab, t))
            assert ct.mark_offloaded(u, False)  # nothing to change, but the entry exists
            ghost = Conn(family, 17, Tuple(ADDR[family]["client"], ADDR[family]["server"], 1, 2), u.reply)
            assert not ct.mark_offloaded(ghost, False)
    finally:
        tcp.close()


def test_mark_offloaded_writes_the_timeout_in_the_same_message(lab: Lab) -> None:
    """The long timeout goes in with the mark; the hand-back gives the namespace's own
    timeout, read from its sysctls (set here to values no default has)."""
    family = socket.AF_INET
    netns.run(lab.router, "sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=97 "
                          "net.netfilter.nf_conntrack_tcp_timeout_established=4321")
    try:
        uport = udp_exchange(lab, family, 6111)
        with lab.ct(subscribe=False, offload_mark=0x40) as ct:
            assert ct.timeouts() == {6: 4321, 17: 97}
            u = find(ct.dump(), family, 17, uport, 6111)
            assert ct.mark_offloaded(u, True, timeout_s=86400)
            got = find(ct.dump(), family, 17, uport, 6111)
            assert got.mark == 0x40 and got.timeout in (86398, 86399, 86400)
            assert ct.mark_offloaded(u, False, timeout_s=ct.timeouts()[17])
            got = find(ct.dump(), family, 17, uport, 6111)
            assert got.mark == 0 and got.timeout in (95, 96, 97)
            with pytest.raises(ValueError):
                ct.mark_offloaded(u, False, timeout_s=-1)
            assert find(ct.dump(), family, 17, uport, 6111).timeout in (95, 96, 97)  # left as it was
    finally:
        netns.run(lab.router, "sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=120 "
                              "net.netfilter.nf_conntrack_tcp_timeout_established=432000")


# -- errors --------------------------------------------------------------


def test_unexpected_errors_raise_conntrack_error(lab: Lab) -> None:
    tcp = tcp_connect(lab, socket.AF_INET, 5401)
    try:
        with lab.ct(subscribe=False) as ct:
            c = find(ct.dump(), socket.AF_INET, 6, tcp.sport, 5401)
            # the kernel refuses NAT changes on an existing entry (EOPNOTSUPP)
            nat = wire.nest(uapi.CTA_NAT_SRC, wire.nla(1, socket.inet_aton("198.18.2.1")))
            with pytest.raises(ConntrackError) as e:
                ct._change(c, nat, "nat")
            assert issubclass(ConntrackError, PyflowError)
            msg = str(e.value)
            assert "\n" not in msg and f":{tcp.sport} -> " in msg and "not supported" in msg.lower()

            bad = Conn(socket.AF_INET, 6, Tuple("2001:2::1", "198.18.2.2", 1, 2), c.reply)
            with pytest.raises(ConntrackError, match="2001:2::1"):
                ct.refresh(bad, 10)
        with pytest.raises(ConntrackError, match="closed"):
            ct.dump()
        with pytest.raises(ConntrackError, match="no event socket"):
            ct.poll(0)
    finally:
        tcp.close()


# -- parsing, without the kernel -----------------------------------------


def _msg(family: int, *attrs: bytes, msg_type: int = ctmod._MSG_NEW) -> bytearray:
    return bytearray(ctmod._request(msg_type, 0, 0, family, b"".join(attrs)))


def _tup(atype: int, t: Tuple, proto: int = 6, family: int = socket.AF_INET) -> bytes:
    return ctmod._tuple_attr(atype, Conn(family, proto, t, t))


T1 = Tuple("198.18.1.2", "198.18.2.2", 1234, 80)
T2 = Tuple("198.18.2.2", "198.18.2.1", 80, 1234)


def test_parse_tolerates_missing_and_broken_attributes() -> None:
    bare = _msg(socket.AF_INET, _tup(ctmod.CTA_TUPLE_ORIG, T1), _tup(ctmod.CTA_TUPLE_REPLY, T2))
    c = ctmod._parse(bare, 0, len(bare))
    assert c == Conn(socket.AF_INET, 6, T1, T2)  # status/mark/zone 0, the rest None
    assert c.timeout is None and c.tcp_state is None and c.helper is None and c.ct_id is None

    helper = wire.nest(ctmod.CTA_HELP, wire.nla(ctmod.CTA_HELP_NAME, b"ftp\0"))
    h = _msg(socket.AF_INET, _tup(ctmod.CTA_TUPLE_ORIG, T1), _tup(ctmod.CTA_TUPLE_REPLY, T2), helper)
    parsed = ctmod._parse(h, 0, len(h))
    assert parsed is not None and parsed.helper == "ftp"

    no_reply = _msg(socket.AF_INET, _tup(ctmod.CTA_TUPLE_ORIG, T1))
    assert ctmod._parse(no_reply, 0, len(no_reply)) is None
    sctp = _msg(socket.AF_INET, _tup(ctmod.CTA_TUPLE_ORIG, T1, 132), _tup(ctmod.CTA_TUPLE_REPLY, T2, 132))
    assert ctmod._parse(sctp, 0, len(sctp)) is None
    unspec = _msg(socket.AF_UNSPEC, _tup(ctmod.CTA_TUPLE_ORIG, T1), _tup(ctmod.CTA_TUPLE_REPLY, T2))
    assert ctmod._parse(unspec, 0, len(unspec)) is None
    # an IPv4-sized address in an IPv6 message
    v6 = _msg(socket.AF_INET6, _tup(ctmod.CTA_TUPLE_ORIG, T1), _tup(ctmod.CTA_TUPLE_REPLY, T2))
    assert ctmod._parse(v6, 0, len(v6)) is None

    # every truncation of a full entry parses to a Conn or None, never raises
    state = wire.nla(ctmod.CTA_PROTOINFO_TCP_STATE, b"\3")
    full = _msg(socket.AF_INET, _tup(ctmod.CTA_TUPLE_ORIG, T1), _tup(ctmod.CTA_TUPLE_REPLY, T2),
                wire.nla(ctmod.CTA_STATUS, struct.pack(">I", 0x19e)),
                wire.nest(ctmod.CTA_PROTOINFO, wire.nest(ctmod.CTA_PROTOINFO_TCP, state)),
                wire.nla(ctmod.CTA_TIMEOUT, struct.pack(">I", 300)), helper)
    whole = ctmod._parse(full, 0, len(full))
    assert whole is not None and (whole.tcp_state, whole.timeout, whole.helper) == (3, 300, "ftp")
    for cut in range(len(full)):
        ctmod._parse(full[:cut], 0, cut)
        broken = bytearray(full)
        broken[cut] ^= 0xFF
        ctmod._parse(broken, 0, len(broken))


# -- the C decoder on what the kernel sends; batched changes ---------------


def _raw_datagrams(s: NetlinkSocket, limit: float = 0.5) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            n = s.recv()
        except BlockingIOError:
            if out and not s.wait(0.1):
                break
            continue
        out.append(bytes(s.buf[:n]))
    return out


def _raw_dump(s: NetlinkSocket) -> tuple[int, list[bytes]]:
    seq = s.next_seq()
    s.send(wire.request(ctmod._MSG_GET, uapi.NLM_F_REQUEST | uapi.NLM_F_DUMP, seq,
                        ctmod._nfgen(socket.AF_UNSPEC)))
    out = []
    while True:
        n = s.recv_within(2.0)
        out.append(bytes(s.buf[:n]))
        if any(t == uapi.NLMSG_DONE for t, *_ in wire.messages(s.buf, n)):
            return seq, out


def test_c_decoder_reads_what_the_kernel_sends_as_the_reference_does(lab: Lab) -> None:
    """Events and dump datagrams of TCP/UDP, IPv4/IPv6, NAT, zones, marks, DESTROY, read raw
    from the kernel: the C decoder gives what the Python reference gives. With
    PYFLOW_RECORD_CTNETLINK=<file> they are written there (tests/unit/data/ctnetlink.hex)."""
    import os

    from pyflow.control import ctfeed
    from tests.unit.test_ctfeed import py_dump

    with netns.inside(lab.router):
        ev = NetlinkSocket(uapi.NETLINK_NETFILTER, group_mask(uapi.NFNLGRP_CONNTRACK_NEW,
                           uapi.NFNLGRP_CONNTRACK_UPDATE, uapi.NFNLGRP_CONNTRACK_DESTROY), rcvbuf=8 << 20)
        req = NetlinkSocket(uapi.NETLINK_NETFILTER)
    try:
        conns = [tcp_connect(lab, socket.AF_INET, 5301), tcp_connect(lab, socket.AF_INET6, 5302),
                 tcp_connect(lab, socket.AF_INET, MARKED_PORT)]
        for fam in (socket.AF_INET, socket.AF_INET6):
            udp_exchange(lab, fam, ZONE_PORT)
            udp_exchange(lab, fam, 5303, reply=False)
        udp_exchange(lab, socket.AF_INET, ORIG_ZONE_PORT)
        seq, dumped = _raw_dump(req)
        lab.cli("-D", "-p", "udp", "--orig-port-dst", "5303")  # DESTROY events
        events = _raw_datagrams(ev)
        for c in conns:
            c.close()
    finally:
        ev.close()
        req.close()
    feed = ctfeed.Feed(1 << 16)
    got_events = []
    for d in events:
        got, res = feed.decode(d, len(d), ctfeed.EVENTS)
        assert got == ctmod._events_of(d, len(d))
        assert res.malformed == 0
        got_events += got
    kinds = {e.type for e in got_events}
    assert kinds == {EventType.NEW, EventType.UPDATE, EventType.DESTROY}
    zones = {e.conn.zone for e in got_events}
    assert {ZONE, ORIG_ZONE} <= zones
    assert any(e.conn.mark == PRESET_MARK for e in got_events)
    got_dump = []
    for d in dumped:
        got, res = feed.decode(d, len(d), ctfeed.DUMP, seq)
        assert (got, res.done, res.err) == py_dump(d, seq)
        got_dump += got
    assert len({(c.family, c.proto) for c in got_dump}) == 4 and res.done == 1
    assert any(c.status & IPS_SRC_NAT and c.reply.dst == ADDR[c.family]["r_out"] for c in got_dump)
    record = os.environ.get("PYFLOW_RECORD_CTNETLINK")
    if record:
        with open(record, "w") as f:
            f.write("# ctnetlink datagrams the kernel sent (tests/integration/test_conntrack.py records "
                    "them): kind, hex\n")
            for d in events:
                f.write(f"event {d.hex()}\n")
            for d in dumped:
                f.write(f"dump {d.hex()}\n")


def test_batched_marks_report_each_entry_and_set_what_single_ones_do(lab: Lab) -> None:
    ct = lab.ct(offload_mark=0x4, subscribe=False)
    live = [tcp_connect(lab, socket.AF_INET, 5311), tcp_connect(lab, socket.AF_INET6, 5312)]
    try:
        sports = {c.sport for c in live}
        ports = {udp_exchange(lab, socket.AF_INET, 5313 + i) for i in range(3)}
        conns = [c for c in ct.dump() if c.orig.sport in sports | ports]
        assert len(conns) == 5
        gone = Conn(socket.AF_INET, 17, Tuple(ADDR[socket.AF_INET]["client"], ADDR[socket.AF_INET]["server"],
                                             1, 9), Tuple(ADDR[socket.AF_INET]["server"], "198.18.2.1", 9, 1))
        order = [conns[0], gone, *conns[1:]]
        assert ct.mark_offloaded_many(order, True, timeout_s=3333) == [True, False, True, True, True, True]
        after = {c.orig.sport: c for c in ct.dump() if c.orig.sport in sports | ports}
        for c in after.values():
            assert c.mark & 0x4 and 3300 < (c.timeout or 0) <= 3333
        tcp = [c for c in after.values() if c.proto == 6]
        assert len(tcp) == 2 and all(f & LIBERAL for c in tcp for f in tcp_flags(lab, c))
        # a queue mixing kinds, answered per change in queue order
        q = ct.changes()
        q.refresh(conns[0], 1234)
        q.mark_offloaded(gone, False)
        q.mark_offloaded(conns[1], False, timeout_s=600)
        assert len(q) == 3 and q.send() == [True, False, True] and len(q) == 0
        after = {c.orig.sport: c for c in ct.dump()}
        assert 1200 < (after[conns[0].orig.sport].timeout or 0) <= 1234
        assert not after[conns[1].orig.sport].mark & 0x4
        # more changes than one sendmsg carries: several sends, every answer kept
        many = [conns[2]] * (ctmod.CHANGES_PER_SEND + 10) + [gone]
        res = ct.refresh_many(many, 900)
        assert res == [True] * (ctmod.CHANGES_PER_SEND + 10) + [False]
        # an unexpected refusal raises, naming the entry, after the others were answered
        # (a helper the kernel does not have, asked of an existing entry)
        q = ct.changes()
        q.refresh(conns[2], 800)
        helper = wire.nest(uapi.CTA_HELP, wire.nla(uapi.CTA_HELP_NAME, b"pft-none\0"))
        q._items.append((conns[3], helper, "set helper", ctmod._MSG_NEW))
        with pytest.raises(ConntrackError, match="set helper"):
            q.send()
        assert 700 < ({c.orig.sport: c for c in ct.dump()}[conns[2].orig.sport].timeout or 0) <= 800
    finally:
        for c in live:
            c.close()
        ct.close()


def test_overrun_grows_the_event_buffer_up_to_its_maximum(lab: Lab) -> None:
    tiny = lab.ct(rcvbuf=4096, rcvbuf_max=16384)
    try:
        before = tiny.rcvbuf
        u = lab.sock("client", socket.AF_INET, socket.SOCK_DGRAM)
        for round_ in range(3):
            for i in range(1500):
                u.sendto(b"x", (ADDR[socket.AF_INET]["server"], 41000 + round_ * 1500 + i))
            gather(tiny, lambda e: None in e)
        u.close()
        assert tiny.lost_events >= 2
        assert tiny.rcvbuf_grown == 2  # 4096 -> 8192 -> 16384, then no further
        assert tiny.rcvbuf >= 2 * before and tiny.rcvbuf == 2 * 16384
    finally:
        tiny.close()
