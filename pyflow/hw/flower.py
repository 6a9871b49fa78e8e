"""The TC flower classifier and the actions pyflow's rules use, for pyroute2.

pyroute2 0.9 has no flower classifier and no pedit or csum action. This module is
the codec for them, as a tcmsg plugin of pyflow's own: :func:`register` adds
``flower`` to pyroute2's classifier plugins (so ``IPRoute.tc("add-filter",
"flower", ..., filter=FlowerFilter(...))`` encodes it and dumps decode it), and
the action list of a flower filter is encoded and decoded here, action by action
(pedit, csum, vlan, mirred, gact), with their statistics.

Values are plain dataclasses (:class:`FlowerFilter`, :class:`Match`, the action
classes); :func:`encode_options` turns one into TCA_OPTIONS attributes and
:func:`decode_filter` turns a dumped RTM_NEWTFILTER message back into an equal
value, so unit tests compare what is sent with what is read, field by field.

Kernel facts this codec relies on (include/uapi/linux/pkt_cls.h, tc_act/*.h):

* TCA_FLOWER_INDEV carries a device *name*; addresses and ports are big endian;
  TCA_FLOWER_FLAGS holds skip_hw (1) / skip_sw (2), and a dump adds in_hw (4) or
  not_in_hw (8).
* A pedit key edits one 32-bit word at ``off`` bytes from the header named by its
  extended type: ``set`` writes ``(word & mask) ^ val``, ``add`` writes
  ``(word & mask) | ((word + val) & ~mask)``, where mask holds the bits to keep.
  The kernel does this on the word as it lies in memory, so mask and value are
  kept here as the four bytes in packet order (what tc(8) gets with htonl).
* act_csum recomputes the checksums named by its flags after the edits.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import NLA_F_NESTED, nla
from pyroute2.netlink.rtnl.tcmsg import plugins as _tc_plugins

KIND = "flower"

# filter flags (TCA_CLS_FLAGS_*)
SKIP_HW = 1 << 0
SKIP_SW = 1 << 1
IN_HW = 1 << 2
NOT_IN_HW = 1 << 3

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

# TC verdicts (TC_ACT_*)
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_PIPE = 3
TC_ACT_STOLEN = 4

# pedit header types and commands (enum pedit_header_type, enum pedit_cmd)
HTYPE_ETH = 1
HTYPE_IP4 = 2
HTYPE_IP6 = 3
HTYPE_TCP = 4
HTYPE_UDP = 5
CMD_SET = 0
CMD_ADD = 1

# act_csum update flags
CSUM_IPV4HDR = 1
CSUM_TCP = 8
CSUM_UDP = 16

# act_vlan operations
VLAN_POP = 1
VLAN_PUSH = 2
VLAN_MODIFY = 3

TCA_EGRESS_REDIR = 1  # act_mirred eaction
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
FLOW_DIS_IS_FRAGMENT = 1  # TCA_FLOWER_KEY_FLAGS bit

_TC_GEN = "=IIiii"  # index, capab, action, refcnt, bindcnt: the head of every action's parms
_TC_GEN_SIZE = struct.calcsize(_TC_GEN)
_PEDIT_SEL = _TC_GEN + "BBxx"  # + nkeys, flags
_PEDIT_KEY_TAIL = "=IIII"  # off, at, offmask, shift (mask and val precede it as raw bytes)
_TCF_T = "=QQQQ"  # install, lastuse, expires, firstuse: ages in USER_HZ ticks


# ---- values ---------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """What a flower filter matches. None: not matched. Addresses as text, in the family
    of eth_type (or of vlan_eth_type under a VLAN tag)."""

    eth_type: int
    indev: str | None = None
    vlan_id: int | None = None
    vlan_eth_type: int | None = None
    cvlan_id: int | None = None
    cvlan_eth_type: int | None = None
    ip_proto: int | None = None
    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: tuple[int, int] | None = None  # (value, mask)
    ip_ttl: tuple[int, int] | None = None  # (value, mask): TTL or hop limit
    ip_flags: tuple[int, int] | None = None  # (value, mask) of FLOW_DIS_* bits

    @property
    def l3_type(self) -> int:
        """The EtherType of the IP header, under any VLAN tags."""
        if self.cvlan_eth_type is not None:
            return self.cvlan_eth_type
        if self.vlan_eth_type is not None:
            return self.vlan_eth_type
        return self.eth_type


@dataclass(frozen=True)
class PeditKey:
    htype: int
    cmd: int
    off: int
    mask: bytes  # 4 bytes, packet order: bits kept
    val: bytes   # 4 bytes, packet order


@dataclass(frozen=True)
class Pedit:
    keys: tuple[PeditKey, ...]
    verdict: int = TC_ACT_PIPE


@dataclass(frozen=True)
class Csum:
    flags: int
    verdict: int = TC_ACT_PIPE


@dataclass(frozen=True)
class Vlan:
    op: int  # VLAN_POP / VLAN_PUSH / VLAN_MODIFY
    vid: int = 0
    prio: int = 0
    tpid: int = ETH_P_8021Q
    verdict: int = TC_ACT_PIPE


@dataclass(frozen=True)
class Mirred:
    ifindex: int
    eaction: int = TCA_EGRESS_REDIR
    verdict: int = TC_ACT_STOLEN


@dataclass(frozen=True)
class Gact:
    verdict: int


Action = Pedit | Csum | Vlan | Mirred | Gact


@dataclass(frozen=True)
class FlowerFilter:
    match: Match
    actions: tuple[Action, ...]
    flags: int = 0  # SKIP_HW / SKIP_SW as sent; a dump adds IN_HW / NOT_IN_HW


@dataclass(frozen=True)
class ActionStats:
    packets: int
    bytes: int
    last_used_ms: int  # how long ago the action last ran (the kernel counts in 10 ms ticks)


@dataclass
class Dumped:
    """A filter as a dump returns it: its place, its value and its counters."""

    ifindex: int
    prio: int
    protocol: int
    handle: int
    filter: FlowerFilter
    stats: list[ActionStats] = field(default_factory=list)
    in_hw_count: int | None = None


# ---- netlink layouts ----------------------------------------------------------

class _stats2(nla):
    nla_map = (
        (0, "TCA_STATS_UNSPEC", "none"),
        (1, "TCA_STATS_BASIC", "basic"),
        (2, "TCA_STATS_RATE_EST", "hex"),
        (3, "TCA_STATS_QUEUE", "hex"),
        (4, "TCA_STATS_APP", "hex"),
        (5, "TCA_STATS_RATE_EST64", "hex"),
        (6, "TCA_STATS_PAD", "hex"),
        (7, "TCA_STATS_BASIC_HW", "basic"),
        (8, "TCA_STATS_PKT64", "uint64"),
    )

    class basic(nla):
        fields = (("bytes", "Q"), ("packets", "I"))


def _opts(prefix: str, tm: int, parms: int, extra: tuple = ()) -> type:
    """An action's options layout: its TM (struct tcf_t) and PARMS (raw struct) slots."""
    names = {tm: f"TCA_{prefix}_TM", parms: f"TCA_{prefix}_PARMS"}
    rows = [(0, f"TCA_{prefix}_UNSPEC", "none")]
    rows += [(i, names[i], "cdata") for i in sorted(names)]
    rows += list(extra)

    class options(nla):
        nla_flags = NLA_F_NESTED
        nla_map = tuple(rows)

    return options


_gact_opts = _opts("GACT", 1, 2)
_mirred_opts = _opts("MIRRED", 1, 2)
_csum_opts = _opts("CSUM", 2, 1)
_vlan_opts = _opts("VLAN", 1, 2, (
    (3, "TCA_VLAN_PUSH_VLAN_ID", "uint16"),
    (4, "TCA_VLAN_PUSH_VLAN_PROTOCOL", "be16"),
    (6, "TCA_VLAN_PUSH_VLAN_PRIORITY", "uint8"),
))


class _pedit_opts(nla):
    nla_flags = NLA_F_NESTED
    nla_map = (
        (0, "TCA_PEDIT_UNSPEC", "none"),
        (1, "TCA_PEDIT_TM", "cdata"),
        (2, "TCA_PEDIT_PARMS", "cdata"),
        (3, "TCA_PEDIT_PAD", "none"),
        (4, "TCA_PEDIT_PARMS_EX", "cdata"),
        (5, "TCA_PEDIT_KEYS_EX", "keys_ex"),
    )

    class keys_ex(nla):
        nla_flags = NLA_F_NESTED
        nla_map = ((6, "TCA_PEDIT_KEY_EX", "key_ex"),)

        class key_ex(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (
                (1, "TCA_PEDIT_KEY_EX_HTYPE", "uint16"),
                (2, "TCA_PEDIT_KEY_EX_CMD", "uint16"),
            )


_ACT_OPTIONS = {"gact": _gact_opts, "mirred": _mirred_opts, "csum": _csum_opts, "vlan": _vlan_opts,
                "pedit": _pedit_opts}


class _act_prio(nla):
    nla_flags = NLA_F_NESTED
    nla_map = tuple((i, f"TCA_ACT_PRIO_{i}", "act") for i in range(1, 33))

    class act(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (
            (0, "TCA_ACT_UNSPEC", "none"),
            (1, "TCA_ACT_KIND", "asciiz"),
            (2, "TCA_ACT_OPTIONS", "get_act_options"),
            (3, "TCA_ACT_INDEX", "uint32"),
            (4, "TCA_ACT_STATS", "stats2"),
            (5, "TCA_ACT_PAD", "none"),
            (6, "TCA_ACT_COOKIE", "cdata"),
            (7, "TCA_ACT_FLAGS", "cdata"),
            (8, "TCA_ACT_HW_STATS", "cdata"),
            (9, "TCA_ACT_USED_HW_STATS", "cdata"),
            (10, "TCA_ACT_IN_HW_COUNT", "uint32"),
        )
        stats2 = _stats2

        @staticmethod
        def get_act_options(self, *argv, **kwarg):
            return _ACT_OPTIONS.get(self.get_attr("TCA_ACT_KIND"), self.hex)


class options(nla):
    """TCA_OPTIONS of a flower filter (enum TCA_FLOWER_* in pkt_cls.h; numbers explicit)."""

    nla_flags = NLA_F_NESTED
    nla_map = (
        (0, "TCA_FLOWER_UNSPEC", "none"),
        (1, "TCA_FLOWER_CLASSID", "uint32"),
        (2, "TCA_FLOWER_INDEV", "asciiz"),
        (3, "TCA_FLOWER_ACT", "act_prio"),
        (4, "TCA_FLOWER_KEY_ETH_DST", "cdata"),
        (5, "TCA_FLOWER_KEY_ETH_DST_MASK", "cdata"),
        (6, "TCA_FLOWER_KEY_ETH_SRC", "cdata"),
        (7, "TCA_FLOWER_KEY_ETH_SRC_MASK", "cdata"),
        (8, "TCA_FLOWER_KEY_ETH_TYPE", "be16"),
        (9, "TCA_FLOWER_KEY_IP_PROTO", "uint8"),
        (10, "TCA_FLOWER_KEY_IPV4_SRC", "ip4addr"),
        (11, "TCA_FLOWER_KEY_IPV4_SRC_MASK", "ip4addr"),
        (12, "TCA_FLOWER_KEY_IPV4_DST", "ip4addr"),
        (13, "TCA_FLOWER_KEY_IPV4_DST_MASK", "ip4addr"),
        (14, "TCA_FLOWER_KEY_IPV6_SRC", "ip6addr"),
        (15, "TCA_FLOWER_KEY_IPV6_SRC_MASK", "ip6addr"),
        (16, "TCA_FLOWER_KEY_IPV6_DST", "ip6addr"),
        (17, "TCA_FLOWER_KEY_IPV6_DST_MASK", "ip6addr"),
        (18, "TCA_FLOWER_KEY_TCP_SRC", "be16"),
        (19, "TCA_FLOWER_KEY_TCP_DST", "be16"),
        (20, "TCA_FLOWER_KEY_UDP_SRC", "be16"),
        (21, "TCA_FLOWER_KEY_UDP_DST", "be16"),
        (22, "TCA_FLOWER_FLAGS", "uint32"),
        (23, "TCA_FLOWER_KEY_VLAN_ID", "be16"),
        (24, "TCA_FLOWER_KEY_VLAN_PRIO", "uint8"),
        (25, "TCA_FLOWER_KEY_VLAN_ETH_TYPE", "be16"),
        (35, "TCA_FLOWER_KEY_TCP_SRC_MASK", "be16"),
        (36, "TCA_FLOWER_KEY_TCP_DST_MASK", "be16"),
        (37, "TCA_FLOWER_KEY_UDP_SRC_MASK", "be16"),
        (38, "TCA_FLOWER_KEY_UDP_DST_MASK", "be16"),
        (47, "TCA_FLOWER_KEY_FLAGS", "be32"),
        (48, "TCA_FLOWER_KEY_FLAGS_MASK", "be32"),
        (71, "TCA_FLOWER_KEY_TCP_FLAGS", "be16"),
        (72, "TCA_FLOWER_KEY_TCP_FLAGS_MASK", "be16"),
        (73, "TCA_FLOWER_KEY_IP_TOS", "uint8"),
        (74, "TCA_FLOWER_KEY_IP_TOS_MASK", "uint8"),
        (75, "TCA_FLOWER_KEY_IP_TTL", "uint8"),
        (76, "TCA_FLOWER_KEY_IP_TTL_MASK", "uint8"),
        (77, "TCA_FLOWER_KEY_CVLAN_ID", "be16"),
        (78, "TCA_FLOWER_KEY_CVLAN_PRIO", "uint8"),
        (79, "TCA_FLOWER_KEY_CVLAN_ETH_TYPE", "be16"),
        (86, "TCA_FLOWER_IN_HW_COUNT", "uint32"),
    )
    act_prio = _act_prio


# ---- the pyroute2 plugin interface --------------------------------------------------

def fix_request(request: dict) -> None:
    """tcmsg.info carries the filter's priority (high 16 bits) and protocol (low, big endian)."""
    protocol, prio = request.get("protocol", 0) & 0xFFFF, request.get("prio", 0) & 0xFFFF
    request["info"] = socket.htons(protocol) | (prio << 16)


NO_OPTIONS = "no options"
"""filter= for requests that name a filter without describing it (del-filter): pyroute2 asks
the plugin for options on every request with arguments, and an empty flower filter would
match everything, so a missing filter= is an error and "none" must be said."""


def get_parameters(kwarg: dict) -> dict:
    """TCA_OPTIONS for IPRoute.tc(..., "flower", ..., filter=FlowerFilter(...))."""
    value = kwarg.get("filter")
    if value is NO_OPTIONS:
        return {"attrs": []}
    if not isinstance(value, FlowerFilter):
        raise ValueError("a flower filter needs filter=FlowerFilter(...) (or NO_OPTIONS to delete)")
    return {"attrs": encode_options(value)}


def register() -> None:
    """Make pyroute2 encode and decode "flower" filters with this module (idempotent)."""
    import sys

    _tc_plugins[KIND] = sys.modules[__name__]


# ---- encoding ---------------------------------------------------------------------

def _port_attrs(proto: int | None) -> tuple[str, str]:
    if proto == socket.IPPROTO_TCP:
        return "TCA_FLOWER_KEY_TCP_SRC", "TCA_FLOWER_KEY_TCP_DST"
    if proto == socket.IPPROTO_UDP:
        return "TCA_FLOWER_KEY_UDP_SRC", "TCA_FLOWER_KEY_UDP_DST"
    raise ValueError(f"ports can only be matched for TCP or UDP, not IP protocol {proto}")


def _addr_attrs(l3_type: int) -> tuple[str, str, str]:
    if l3_type == ETH_P_IP:
        return "TCA_FLOWER_KEY_IPV4_SRC", "TCA_FLOWER_KEY_IPV4_DST", "255.255.255.255"
    if l3_type == ETH_P_IPV6:
        return "TCA_FLOWER_KEY_IPV6_SRC", "TCA_FLOWER_KEY_IPV6_DST", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    raise ValueError(f"addresses can only be matched for IPv4 or IPv6, not EtherType 0x{l3_type:04x}")


def encode_match(m: Match) -> list[list[Any]]:
    attrs: list[list[Any]] = []
    if m.indev is not None:
        attrs.append(["TCA_FLOWER_INDEV", m.indev])
    attrs.append(["TCA_FLOWER_KEY_ETH_TYPE", m.eth_type])
    if m.vlan_id is not None:
        attrs.append(["TCA_FLOWER_KEY_VLAN_ID", m.vlan_id])
    if m.vlan_eth_type is not None:
        attrs.append(["TCA_FLOWER_KEY_VLAN_ETH_TYPE", m.vlan_eth_type])
    if m.cvlan_id is not None:
        attrs.append(["TCA_FLOWER_KEY_CVLAN_ID", m.cvlan_id])
    if m.cvlan_eth_type is not None:
        attrs.append(["TCA_FLOWER_KEY_CVLAN_ETH_TYPE", m.cvlan_eth_type])
    if m.ip_proto is not None:
        attrs.append(["TCA_FLOWER_KEY_IP_PROTO", m.ip_proto])
    if m.src is not None or m.dst is not None:
        src_attr, dst_attr, full = _addr_attrs(m.l3_type)
        for name, value in ((src_attr, m.src), (dst_attr, m.dst)):
            if value is not None:
                attrs += [[name, value], [name + "_MASK", full]]
    if m.sport is not None or m.dport is not None:
        src_attr, dst_attr = _port_attrs(m.ip_proto)
        for name, port in ((src_attr, m.sport), (dst_attr, m.dport)):
            if port is not None:
                attrs += [[name, port], [name + "_MASK", 0xFFFF]]
    for name, pair in (("TCA_FLOWER_KEY_TCP_FLAGS", m.tcp_flags), ("TCA_FLOWER_KEY_IP_TTL", m.ip_ttl),
                       ("TCA_FLOWER_KEY_FLAGS", m.ip_flags)):
        if pair is not None:
            attrs += [[name, pair[0]], [name + "_MASK", pair[1]]]
    return attrs


def _parms(verdict: int) -> bytes:
    return struct.pack(_TC_GEN, 0, 0, verdict, 0, 0)


def encode_action(act: Action) -> tuple[str, list[list[Any]]]:
    """(kind, option attributes) of one action."""
    if isinstance(act, Pedit):
        if not act.keys or len(act.keys) > 255:
            raise ValueError(f"a pedit action takes 1..255 keys, not {len(act.keys)}")
        sel = struct.pack(_PEDIT_SEL, 0, 0, act.verdict, 0, 0, len(act.keys), 0)
        for k in act.keys:
            if len(k.mask) != 4 or len(k.val) != 4 or k.off % 4:
                raise ValueError(f"pedit key {k}: mask and val are 4 bytes, off a multiple of 4")
            sel += k.mask + k.val + struct.pack(_PEDIT_KEY_TAIL, k.off, 0, 0, 0)
        keys_ex = {"attrs": [["TCA_PEDIT_KEY_EX", {"attrs": [["TCA_PEDIT_KEY_EX_HTYPE", k.htype],
                                                              ["TCA_PEDIT_KEY_EX_CMD", k.cmd]]}]
                             for k in act.keys]}
        return "pedit", [["TCA_PEDIT_PARMS_EX", sel], ["TCA_PEDIT_KEYS_EX", keys_ex]]
    if isinstance(act, Csum):
        return "csum", [["TCA_CSUM_PARMS", _parms(act.verdict) + struct.pack("=I", act.flags)]]
    if isinstance(act, Vlan):
        attrs: list[list[Any]] = [["TCA_VLAN_PARMS", _parms(act.verdict) + struct.pack("=i", act.op)]]
        if act.op in (VLAN_PUSH, VLAN_MODIFY):
            attrs += [["TCA_VLAN_PUSH_VLAN_ID", act.vid], ["TCA_VLAN_PUSH_VLAN_PROTOCOL", act.tpid],
                      ["TCA_VLAN_PUSH_VLAN_PRIORITY", act.prio]]
        return "vlan", attrs
    if isinstance(act, Mirred):
        parms = _parms(act.verdict) + struct.pack("=iI", act.eaction, act.ifindex)
        return "mirred", [["TCA_MIRRED_PARMS", parms]]
    if isinstance(act, Gact):
        return "gact", [["TCA_GACT_PARMS", _parms(act.verdict)]]
    raise TypeError(f"not a flower action: {act!r}")


def encode_options(f: FlowerFilter) -> list[list[Any]]:
    if len(f.actions) > 32:
        raise ValueError(f"at most 32 actions per filter, not {len(f.actions)}")
    acts = []
    for i, act in enumerate(f.actions, start=1):
        kind, opts = encode_action(act)
        acts.append([f"TCA_ACT_PRIO_{i}", {"attrs": [["TCA_ACT_KIND", kind],
                                                      ["TCA_ACT_OPTIONS", {"attrs": opts}]]}])
    attrs = encode_match(f.match)
    attrs.append(["TCA_FLOWER_FLAGS", f.flags & (SKIP_HW | SKIP_SW)])
    if acts:
        attrs.append(["TCA_FLOWER_ACT", {"attrs": acts}])
    return attrs


# ---- decoding ---------------------------------------------------------------------

def decode_match(opts: Any) -> Match:
    def get(name: str) -> Any:
        return opts.get_attr(name)

    def pair(name: str) -> tuple[int, int] | None:
        v = get(name)
        return None if v is None else (v, get(name + "_MASK"))

    src = get("TCA_FLOWER_KEY_IPV4_SRC") or get("TCA_FLOWER_KEY_IPV6_SRC")
    dst = get("TCA_FLOWER_KEY_IPV4_DST") or get("TCA_FLOWER_KEY_IPV6_DST")
    sport = get("TCA_FLOWER_KEY_TCP_SRC")
    dport = get("TCA_FLOWER_KEY_TCP_DST")
    if sport is None and dport is None:
        sport, dport = get("TCA_FLOWER_KEY_UDP_SRC"), get("TCA_FLOWER_KEY_UDP_DST")
    return Match(eth_type=get("TCA_FLOWER_KEY_ETH_TYPE"), indev=get("TCA_FLOWER_INDEV"),
                 vlan_id=get("TCA_FLOWER_KEY_VLAN_ID"), vlan_eth_type=get("TCA_FLOWER_KEY_VLAN_ETH_TYPE"),
                 cvlan_id=get("TCA_FLOWER_KEY_CVLAN_ID"), cvlan_eth_type=get("TCA_FLOWER_KEY_CVLAN_ETH_TYPE"),
                 ip_proto=get("TCA_FLOWER_KEY_IP_PROTO"), src=src, dst=dst, sport=sport, dport=dport,
                 tcp_flags=pair("TCA_FLOWER_KEY_TCP_FLAGS"), ip_ttl=pair("TCA_FLOWER_KEY_IP_TTL"),
                 ip_flags=pair("TCA_FLOWER_KEY_FLAGS"))


def _verdict(parms: bytes) -> int:
    return struct.unpack_from(_TC_GEN, parms)[2]


def decode_action(kind: str, opts: Any) -> Action:
    if kind == "pedit":
        sel = opts.get_attr("TCA_PEDIT_PARMS_EX") or opts.get_attr("TCA_PEDIT_PARMS")
        verdict, nkeys = struct.unpack_from(_PEDIT_SEL, sel)[2], struct.unpack_from(_PEDIT_SEL, sel)[5]
        ex = opts.get_attr("TCA_PEDIT_KEYS_EX")
        types = ([(k.get_attr("TCA_PEDIT_KEY_EX_HTYPE"), k.get_attr("TCA_PEDIT_KEY_EX_CMD"))
                  for k in ex.get_attrs("TCA_PEDIT_KEY_EX")] if ex is not None else [(0, CMD_SET)] * nkeys)
        keys = []
        pos = struct.calcsize(_PEDIT_SEL)
        for n in range(nkeys):
            mask, val = sel[pos:pos + 4], sel[pos + 4:pos + 8]
            off = struct.unpack_from(_PEDIT_KEY_TAIL, sel, pos + 8)[0]
            keys.append(PeditKey(types[n][0], types[n][1], off, bytes(mask), bytes(val)))
            pos += 24
        return Pedit(tuple(keys), verdict)
    parms = opts.get_attr(f"TCA_{kind.upper()}_PARMS")
    if kind == "csum":
        return Csum(struct.unpack_from("=I", parms, _TC_GEN_SIZE)[0], _verdict(parms))
    if kind == "vlan":
        op = struct.unpack_from("=i", parms, _TC_GEN_SIZE)[0]
        if op == VLAN_POP:
            return Vlan(op, verdict=_verdict(parms))
        return Vlan(op, opts.get_attr("TCA_VLAN_PUSH_VLAN_ID"),
                    opts.get_attr("TCA_VLAN_PUSH_VLAN_PRIORITY") or 0,
                    opts.get_attr("TCA_VLAN_PUSH_VLAN_PROTOCOL") or ETH_P_8021Q, _verdict(parms))
    if kind == "mirred":
        eaction, ifindex = struct.unpack_from("=iI", parms, _TC_GEN_SIZE)
        return Mirred(ifindex, eaction, _verdict(parms))
    if kind == "gact":
        return Gact(_verdict(parms))
    raise ValueError(f"action kind {kind!r} is not one pyflow writes")


def _action_stats(act: Any, opts: Any, kind: str) -> ActionStats:
    packets = nbytes = 0
    st = act.get_attr("TCA_ACT_STATS")
    if st is not None:
        basic = st.get_attr("TCA_STATS_BASIC")
        if basic is not None:
            nbytes, packets = basic["bytes"], basic["packets"]
        pkt64 = st.get_attr("TCA_STATS_PKT64")
        if pkt64 is not None:
            packets = pkt64  # the basic struct's packet count is 32 bits and wraps
    tm = opts.get_attr(f"TCA_{kind.upper()}_TM") if opts is not None else None
    last_used_ms = struct.unpack_from(_TCF_T, tm)[1] * 10 if tm else 0
    return ActionStats(packets, nbytes, last_used_ms)


def decode_filter(msg: Any) -> Dumped | None:
    """A dumped filter message as a Dumped value; None for a message that is not a flower
    filter (the chain head a dump begins with, another classifier)."""
    if msg.get_attr("TCA_KIND") != KIND:
        return None
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return None  # the classifier instance itself, without a filter
    actions: list[Action] = []
    stats: list[ActionStats] = []
    prio_list = opts.get_attr("TCA_FLOWER_ACT")
    if prio_list is not None:
        slots = sorted((int(slot[0].rsplit("_", 1)[1]), slot[1]) for slot in prio_list["attrs"])
        for _order, act in slots:  # TCA_ACT_PRIO_<n>: the order the actions run in
            kind = act.get_attr("TCA_ACT_KIND")
            aopts = act.get_attr("TCA_ACT_OPTIONS")
            actions.append(decode_action(kind, aopts))
            stats.append(_action_stats(act, aopts, kind))
    info = msg["info"]
    flags = opts.get_attr("TCA_FLOWER_FLAGS") or 0
    return Dumped(ifindex=msg["index"], prio=info >> 16, protocol=socket.ntohs(info & 0xFFFF),
                  handle=msg["handle"], filter=FlowerFilter(decode_match(opts), tuple(actions), flags),
                  stats=stats, in_hw_count=opts.get_attr("TCA_FLOWER_IN_HW_COUNT"))
