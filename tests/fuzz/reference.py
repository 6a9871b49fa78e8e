"""A reference model of the datapath's decision, the fuzz test's oracle.

Written from the specification (the README's "How a connection is offloaded" and its
known limits of the fast path, the ABI header's reason enum and the documented order of
checks in ebpf/pyflow_xdp.c and ebpf/lib/parse.h), in plain Python, without calling any
of pyflow's C code: given a frame, the installed flows and the hook, it says whether the
test run accepts the frame at all, the reason the datapath must count, and for a forward
the exact frame that must leave and what the flow's counters must gain.

Order of checks (the first that fails names the reason):
  L2:  Ethernet header present (malformed) -> up to two VLAN tags, the outer
       802.1Q or 802.1ad (its protocol is part of the key, as its id), the inner
       802.1Q; a third tag, an 802.1ad tag inside a
       tag, or VLAN id 0 (l2_unsupported); a cut tag (malformed) -> PPPoE:
       discovery (not_ip), session header cut (malformed), version/type not
       0x11, code not 0 or session 0 (l2_unsupported), PPP protocol not IPv4 or
       IPv6 (not_ip).
  L3:  ethertype neither IPv4 nor IPv6 (not_ip).
       IPv4: header cut, version not 4, IHL < 5 (malformed); IHL > 5
       (ipv4_options); total length < 20 or past the frame (malformed); header
       checksum (ipv4_bad_checksum); MF or offset (fragment); protocol not
       TCP/UDP (not_tcp_udp).
       IPv6: header cut, version not 6, payload length past the frame
       (malformed); next header an extension (ipv6_extension) or another
       protocol (not_tcp_udp).
  L4:  TCP header cut, data offset < 5 words or past the IP length; UDP header
       cut, length < 8 or past the IP length, or a zero UDP checksum over IPv6
       (malformed).
  PPPoE: the IP packet (+2 for the PPP protocol field) longer than the PPPoE
       length, or the PPPoE payload past the frame (malformed).
  flow: no entry (miss); destination MAC not the flow's ingress MAC
       (not_for_us); TCP FIN or RST (tcp_fin_rst, flow marked closing); TTL /
       hop limit <= 1 (ttl_expired); L3 length over the MTU (over_mtu); no egress
       (redirect_failed); the hook cannot resize L2 (l2_rewrite_failed). TC: a GSO
       super-packet that must leave in a PPPoE session leaves through the flow's PPP
       device when it names one, its Ethernet header untouched (only L3 rewritten).
  Then: forwarded, with NAT, TTL - 1, incremental checksums (RFC 1624) and the
  egress L2 header.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# ---- constants from the protocols' specifications -------------------------------------

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_PPP_DISC = 0x8863
ETH_P_PPP_SES = 0x8864
PPP_IP = 0x0021
PPP_IPV6 = 0x0057
PROTO_TCP = 6
PROTO_UDP = 17
TCP_FIN = 0x01
TCP_RST = 0x04
# IPv6 extension headers (IANA "IPv6 Extension Header Types"; ESP is not one the
# datapath can look past, it is just "not TCP/UDP")
IPV6_EXTENSIONS = frozenset({0, 43, 44, 51, 60, 135, 139, 140})

# reason names as the ABI names them (enum pyflow_reason without PYFLOW_R_, lower case)
FORWARDED = "forwarded"
NOT_IP = "not_ip"
L2_UNSUPPORTED = "l2_unsupported"
MALFORMED = "malformed"
IPV4_OPTIONS = "ipv4_options"
IPV4_BAD_CHECKSUM = "ipv4_bad_checksum"
FRAGMENT = "fragment"
IPV6_EXTENSION = "ipv6_extension"
NOT_TCP_UDP = "not_tcp_udp"
MISS = "miss"
NOT_FOR_US = "not_for_us"
TCP_FIN_RST = "tcp_fin_rst"
TTL_EXPIRED = "ttl_expired"
OVER_MTU = "over_mtu"
L2_REWRITE_FAILED = "l2_rewrite_failed"
REDIRECT_FAILED = "redirect_failed"
REASONS = (FORWARDED, NOT_IP, L2_UNSUPPORTED, MALFORMED, IPV4_OPTIONS, IPV4_BAD_CHECKSUM, FRAGMENT,
           IPV6_EXTENSION, NOT_TCP_UDP, MISS, NOT_FOR_US, TCP_FIN_RST, TTL_EXPIRED, OVER_MTU,
           L2_REWRITE_FAILED, REDIRECT_FAILED)

_U16 = struct.Struct("!H")
_u16 = _U16.unpack_from


# ---- verdicts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What one hook must do with one frame.

    reason None: the kernel's test run refuses the frame, the program never runs.
    """

    reason: str | None
    output: bytes | None = None  # the frame that leaves, for a forward
    flow: tuple | None = None    # model key of the flow whose counters change
    packets: int = 0             # flow packet counter increment (forward)
    l3len: int = 0               # flow byte counter increment (forward)
    closing: bool = False        # the flow's closing flag gets set


REFUSED = Verdict(None)


@dataclass(frozen=True)
class Parsed:
    """A frame the parser accepted: everything the flow checks and the rewrite need."""

    key: tuple
    l3off: int
    l4off: int
    l4hlen: int
    l3len: int
    l3proto: int  # ETH_P_IP / ETH_P_IPV6, also when it came from a PPP protocol field
    ttl: int
    tcp_flags: int
    proto: int


# ---- flows ---------------------------------------------------------------------------------


def _addr16(addr: str) -> bytes:
    """An address as the flow key holds it: 16 bytes, IPv4 in the first four."""
    try:
        return socket.inet_pton(socket.AF_INET, addr) + bytes(12)
    except OSError:
        return socket.inet_pton(socket.AF_INET6, addr)


def _family(addr: str) -> int:
    return 4 if ":" not in addr else 6


def model_key(k) -> tuple:
    """The model's key for an abi.FlowKey (read as plain data): the outer tag's protocol
    counts only when there is an outer tag."""
    tpid = k.vlan_outer_tpid if k.vlan_outer else 0
    return (k.ifindex, k.vlan_outer, tpid, k.vlan_inner, k.pppoe_sid, _family(k.saddr), k.proto,
            k.sport, k.dport, _addr16(k.saddr), _addr16(k.daddr))


@dataclass(frozen=True)
class ModelFlow:
    key: tuple
    in_mac: bytes
    mtu: int
    tx_port: int
    out_ifindex: int
    snat: bool
    dnat: bool
    nat_saddr: bytes  # 16 bytes (IPv4 in the first 4)
    nat_daddr: bytes
    nat_sport: int
    nat_dport: int
    l2_out: bytes     # egress L2 header without the PPPoE length and PPP protocol (see _egress_l2)
    l2_out_tc: bytes  # the same in TC's frame data: the outer VLAN tag goes as skb metadata
    pppoe_sid: int | None
    ppp_ifindex: int  # the session's PPP device: TC hands it GSO super-packets (0 = none)


def _mac(m: str | bytes) -> bytes:
    return m if isinstance(m, bytes) else bytes(int(x, 16) for x in m.split(":"))


def model_flow(k, a) -> ModelFlow:
    """A flow entry from an (abi.FlowKey, abi.FlowAction) pair, read as plain data.

    NAT: a rewrite happens when any of its fields is set; an unset address or
    port in a set rewrite keeps the key's own value (the ABI's rule)."""
    snat = a.nat_saddr is not None or a.nat_sport is not None
    dnat = a.nat_daddr is not None or a.nat_dport is not None
    macs = _mac(a.dmac) + _mac(a.smac)
    outer = inner = b""
    if a.vlan_outer_tci is not None:
        outer = _U16.pack(a.vlan_outer_tpid or ETH_P_8021Q) + _U16.pack(a.vlan_outer_tci)
        if a.vlan_inner_tci is not None:
            inner = _U16.pack(ETH_P_8021Q) + _U16.pack(a.vlan_inner_tci)
    return ModelFlow(
        key=model_key(k), in_mac=_mac(a.in_mac), mtu=a.mtu, tx_port=a.tx_port,
        out_ifindex=a.out_ifindex, snat=snat, dnat=dnat,
        nat_saddr=_addr16(a.nat_saddr if a.nat_saddr is not None else k.saddr),
        nat_daddr=_addr16(a.nat_daddr if a.nat_daddr is not None else k.daddr),
        nat_sport=a.nat_sport if a.nat_sport is not None else k.sport,
        nat_dport=a.nat_dport if a.nat_dport is not None else k.dport,
        l2_out=macs + outer + inner, l2_out_tc=macs + inner, pppoe_sid=a.pppoe_sid,
        ppp_ifindex=a.ppp_ifindex if a.pppoe_sid is not None else 0)


# ---- checksum arithmetic (RFC 1071, RFC 1624) ----------------------------------------------


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4_header_ok(hdr: bytes) -> bool:
    """RFC 1071: a header with a right checksum sums to all ones."""
    return _fold(sum(struct.unpack("!10H", hdr))) == 0xFFFF


def ipv4_header_checksum(hdr: bytes | bytearray) -> int:
    """The checksum field for hdr (its own checksum field counted as zero)."""
    words = struct.unpack(f"!{len(hdr) // 2}H", hdr)
    return ~_fold(sum(words) - words[5]) & 0xFFFF


def _words(b: bytes | bytearray) -> list[int]:
    return [(b[i] << 8) | b[i + 1] for i in range(0, len(b), 2)]


def _update(check: int, changes: Iterable[tuple[int, int]]) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over every changed 16-bit word."""
    s = (~check & 0xFFFF) + sum((~old & 0xFFFF) + new for old, new in changes)
    return ~_fold(s) & 0xFFFF


# ---- the model -----------------------------------------------------------------------------


class Model:
    """The datapath's decision for one ingress device with the given flows.

    tx_slots: the XDP devmap slots that hold a device (an empty slot means the
    XDP redirect fails); the TC build redirects to out_ifindex, which fails
    only when it is 0."""

    def __init__(self, flows: Iterable[tuple], *, ifindex: int, tx_slots: Iterable[int]):
        self.ifindex = ifindex
        self.tx_slots = frozenset(tx_slots)
        self.flows: dict[tuple, ModelFlow] = {}
        self.closing: set[tuple] = set()  # flows whose closing flag the datapath has set (see note)
        for k, a in flows:
            f = model_flow(k, a)
            self.flows[f.key] = f

    # -- parsing ------------------------------------------------------------------------

    def parse(self, frame: bytes) -> Parsed | str:
        """The parser's result: Parsed, or the reason (a str) it hands the frame to the kernel."""
        n = len(frame)
        if n < ETH_HLEN:
            return MALFORMED
        proto = _u16(frame, 12)[0]
        off = ETH_HLEN
        tags = 0
        vlan = [0, 0]
        outer_tpid = 0
        while proto in (ETH_P_8021Q, ETH_P_8021AD):
            # a third tag, or an 802.1ad tag inside another one
            if tags >= 2 or (tags == 1 and proto != ETH_P_8021Q):
                return L2_UNSUPPORTED
            if off + 4 > n:
                return MALFORMED
            vid = _u16(frame, off)[0] & 0x0FFF
            if not vid:  # priority tag
                return L2_UNSUPPORTED
            vlan[tags] = vid
            if not tags:
                outer_tpid = proto
            tags += 1
            proto = _u16(frame, off + 2)[0]
            off += 4

        sid = 0
        pppoe_len = -1
        if proto == ETH_P_PPP_DISC:
            return NOT_IP
        if proto == ETH_P_PPP_SES:
            if off + 8 > n:  # session header and the PPP protocol field
                return MALFORMED
            sid = _u16(frame, off + 2)[0]
            if frame[off] != 0x11 or frame[off + 1] != 0 or not sid:
                return L2_UNSUPPORTED
            pppoe_len = _u16(frame, off + 4)[0]
            ppp = _u16(frame, off + 6)[0]
            off += 8
            if ppp == PPP_IP:
                proto = ETH_P_IP
            elif ppp == PPP_IPV6:
                proto = ETH_P_IPV6
            else:
                return NOT_IP

        l3off = off
        if proto == ETH_P_IP:
            if off + 20 > n:
                return MALFORMED
            vihl = frame[off]
            if vihl >> 4 != 4 or vihl & 15 < 5:
                return MALFORMED
            if vihl & 15 != 5:
                return IPV4_OPTIONS
            l3len = _u16(frame, off + 2)[0]
            if l3len < 20 or l3off + l3len > n:
                return MALFORMED
            if not ipv4_header_ok(frame[off:off + 20]):
                return IPV4_BAD_CHECKSUM
            if _u16(frame, off + 6)[0] & 0x3FFF:  # MF or fragment offset
                return FRAGMENT
            l4proto = frame[off + 9]
            if l4proto not in (PROTO_TCP, PROTO_UDP):
                return NOT_TCP_UDP
            family = 4
            ttl = frame[off + 8]
            saddr = frame[off + 12:off + 16] + bytes(12)
            daddr = frame[off + 16:off + 20] + bytes(12)
            l4off = off + 20
        elif proto == ETH_P_IPV6:
            if off + 40 > n:
                return MALFORMED
            if frame[off] >> 4 != 6:
                return MALFORMED
            l3len = 40 + _u16(frame, off + 4)[0]
            if l3off + l3len > n:
                return MALFORMED
            l4proto = frame[off + 6]
            if l4proto not in (PROTO_TCP, PROTO_UDP):
                return IPV6_EXTENSION if l4proto in IPV6_EXTENSIONS else NOT_TCP_UDP
            family = 6
            ttl = frame[off + 7]
            saddr = frame[off + 8:off + 24]
            daddr = frame[off + 24:off + 40]
            l4off = off + 40
        else:
            return NOT_IP

        avail = l3len - (l4off - l3off)  # L4 bytes the IP header says there are
        flags = 0
        if l4proto == PROTO_TCP:
            if l4off + 20 > n:
                return MALFORMED
            l4hlen = (frame[l4off + 12] >> 4) * 4
            if l4hlen < 20 or l4hlen > avail:
                return MALFORMED
            flags = frame[l4off + 13]
        else:
            if l4off + 8 > n:
                return MALFORMED
            ulen = _u16(frame, l4off + 4)[0]
            if ulen < 8 or ulen > avail:
                return MALFORMED
            if family == 6 and not _u16(frame, l4off + 6)[0]:  # RFC 8200 8.1
                return MALFORMED
            l4hlen = 8
        if pppoe_len >= 0 and (l3len + 2 > pppoe_len or l3off - 2 + pppoe_len > n):
            return MALFORMED
        sport, dport = struct.unpack_from("!HH", frame, l4off)
        key = (self.ifindex, vlan[0], outer_tpid, vlan[1], sid, family, l4proto, sport, dport, saddr, daddr)
        return Parsed(key, l3off, l4off, l4hlen, l3len, proto, ttl, flags, l4proto)

    # -- the decision -------------------------------------------------------------------

    def verdict(self, frame: bytes, hook: str, parsed: Parsed | str | None = None,
                gso: tuple[int, int] | None = None) -> Verdict:
        """The verdict of hook ("xdp" or "tc") for frame.

        gso: (gso_segs, gso_size) of a TC test context describing a GSO
        super-packet; XDP frames are never GSO."""
        n = len(frame)
        # Test-run limit, both hooks: the kernel refuses a frame without an Ethernet header.
        if n < ETH_HLEN:
            return REFUSED
        if hook == "tc":
            # Test-run limit, TC only: the kernel's skb test run pulls an IPv4 or IPv6
            # header for the ethertype it reads after the MACs and refuses the frame when
            # it is not all there. (VLAN / PPPoE frames have another ethertype there.)
            et = _u16(frame, 12)[0]
            if (et == ETH_P_IP and n - ETH_HLEN < 20) or (et == ETH_P_IPV6 and n - ETH_HLEN < 40):
                return REFUSED
        elif gso is not None:
            raise ValueError("GSO is a TC context")
        p = self.parse(frame) if parsed is None else parsed
        if isinstance(p, str):
            return Verdict(p)
        flow = self.flows.get(p.key)
        if flow is None:
            return Verdict(MISS)
        if frame[:6] != flow.in_mac:
            return Verdict(NOT_FOR_US, flow=flow.key)
        if p.proto == PROTO_TCP and (flow.key in self.closing or p.tcp_flags & (TCP_FIN | TCP_RST)):
            # a flow that saw FIN/RST stays closing: all its packets go to the kernel
            return Verdict(TCP_FIN_RST, flow=flow.key, closing=True)
        if p.ttl <= 1:
            return Verdict(TTL_EXPIRED, flow=flow.key)
        if gso is not None and gso[1]:
            # TC only: a GSO super-packet leaves as segments, each carrying at most
            # gso_size bytes of payload behind its own IP and L4 headers.
            if (p.l4off - p.l3off) + p.l4hlen + gso[1] > flow.mtu:
                return Verdict(OVER_MTU, flow=flow.key)
        elif p.l3len > flow.mtu:
            return Verdict(OVER_MTU, flow=flow.key)
        # TC only: a GSO super-packet that must leave in a PPPoE session goes to the
        # session's PPP device when the flow names one (an L3 device: the kernel drops
        # the mac header, segments, and the PPPoE channel encapsulates each segment).
        via_ppp = gso is not None and bool(gso[1]) and flow.pppoe_sid is not None and flow.ppp_ifindex != 0
        # XDP redirects through its devmap slot, TC to the egress ifindex (or the PPP device).
        if hook == "xdp" and flow.tx_port not in self.tx_slots:
            return Verdict(REDIRECT_FAILED, flow=flow.key)
        if hook == "tc" and not via_ppp and not flow.out_ifindex:
            return Verdict(REDIRECT_FAILED, flow=flow.key)
        pppoe_here = flow.pppoe_sid is not None and not via_ppp
        if gso is not None and gso[1] and (p.l3off != ETH_HLEN or pppoe_here):
            # TC only: one L2 header is copied onto every segment, so no PPPoE length
            # could be right for every segment, and inline tags are not popped from a
            # super-packet: a GSO skb is taken only with a bare Ethernet header in
            # its data (its egress VLAN tags are pushed by the kernel).
            return Verdict(L2_REWRITE_FAILED, flow=flow.key)
        # via the PPP device the Ethernet header stays as it came: the device drops it
        l2 = frame[:ETH_HLEN] if via_ppp else self._egress_l2(flow, p, hook)
        # XDP: bpf_xdp_adjust_head fails only without headroom, and the test run gives
        # 256 bytes where at most 16 are needed; TC grows at the head and pops tags.
        # Neither refuses here, so the model has no l2_rewrite_failed for non-GSO frames.
        out = l2 + self._rewrite_l3(flow, p, frame[p.l3off:])
        segs = gso[0] if gso is not None and gso[0] else 1
        return Verdict(FORWARDED, output=out, flow=flow.key, packets=segs, l3len=p.l3len)

    # -- the forward ----------------------------------------------------------------------

    @staticmethod
    def _egress_l2(flow: ModelFlow, p: Parsed, hook: str) -> bytes:
        """The egress L2 header in the frame data. TC hands the outer VLAN tag to the
        kernel (bpf_skb_vlan_push), which keeps it in skb metadata: the test run
        cannot show it, tests/datapath/test_vlan_egress.py checks it on the wire."""
        l2_out = flow.l2_out_tc if hook == "tc" else flow.l2_out
        if flow.pppoe_sid is None:
            return l2_out + _U16.pack(p.l3proto)
        # RFC 2516: version 1, type 1, code 0 (session data), session id, length of the
        # PPP payload (the 2-byte protocol field and the IP packet), then the protocol.
        return (l2_out + struct.pack("!HBBHH", ETH_P_PPP_SES, 0x11, 0, flow.pppoe_sid, p.l3len + 2)
                + _U16.pack(PPP_IP if p.l3proto == ETH_P_IP else PPP_IPV6))

    @staticmethod
    def _rewrite_l3(flow: ModelFlow, p: Parsed, l3: bytes) -> bytes:
        """The IP packet (and whatever trails it in the frame) as it leaves: NAT, TTL - 1,
        checksums updated incrementally so that a wrong L4 checksum stays wrong."""
        b = bytearray(l3)
        v4 = p.l3proto == ETH_P_IP
        alen = 4 if v4 else 16
        soff, doff = (12, 16) if v4 else (8, 24)
        addr_changes: list[tuple[int, int]] = []
        if flow.snat:
            new = flow.nat_saddr[:alen]
            addr_changes += zip(_words(b[soff:soff + alen]), _words(new), strict=True)
            b[soff:soff + alen] = new
        if flow.dnat:
            new = flow.nat_daddr[:alen]
            addr_changes += zip(_words(b[doff:doff + alen]), _words(new), strict=True)
            b[doff:doff + alen] = new
        if v4:
            old_ttl_word = _u16(b, 8)[0]
            b[8] -= 1
            check = _update(_u16(b, 10)[0], addr_changes + [(old_ttl_word, _u16(b, 8)[0])])
            _U16.pack_into(b, 10, check)
        else:
            b[7] -= 1  # the hop limit is in no checksum
        if flow.snat or flow.dnat:
            l4 = p.l4off - p.l3off
            port_changes = []
            if flow.snat:
                port_changes.append((_u16(b, l4)[0], flow.nat_sport))
                _U16.pack_into(b, l4, flow.nat_sport)
            if flow.dnat:
                port_changes.append((_u16(b, l4 + 2)[0], flow.nat_dport))
                _U16.pack_into(b, l4 + 2, flow.nat_dport)
            coff = l4 + (6 if p.proto == PROTO_UDP else 16)
            check = _u16(b, coff)[0]
            if p.proto == PROTO_UDP:
                # RFC 768: 0 means "no checksum" (it stays 0); a computed 0 is sent as 0xffff
                if check:
                    check = _update(check, addr_changes + port_changes) or 0xFFFF
            else:
                check = _update(check, addr_changes + port_changes)
            _U16.pack_into(b, coff, check)
        return bytes(b)
