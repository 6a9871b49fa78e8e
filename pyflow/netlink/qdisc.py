"""Queueing disciplines and ingress redirects, read over rtnetlink: what shapes a device.

Two things decide whether a fast path may carry a device's packets without undoing an
operator's traffic shaping (pyflow.daemon.shaping holds that policy):

* the device's egress qdisc tree: a rate limiter anywhere in it (htb, hfsc, tbf, cbq,
  cake with a bandwidth) means its egress is shaped. An XDP redirect into the device
  (devmap, ndo_xdp_xmit) skips every qdisc; a TC redirect (bpf_redirect to egress) goes
  through dev_queue_xmit and so through them;
* its ingress hook: a filter whose action is a mirred redirect (or mirror) to another
  device's egress, as sqm-scripts sets up to shape downloads on an IFB device.

This module is the wire half: one RTM_GETQDISC dump for every device, one RTM_GETTFILTER
dump per device that has an ingress or clsact qdisc, decoded by pure functions
(:func:`parse_qdisc`, :func:`parse_filter`) that the unit tests feed built messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyflow.netlink import uapi
from pyflow.netlink.sock import NetlinkSocket
from pyflow.netlink.wire import U32, Buffer, attrs, nested, string, value

TCMSG = struct.Struct("=BBHiIII")  # struct tcmsg: family, pad, pad, ifindex, handle, parent, info
TC_MIRRED = struct.Struct("=IIiiiiI")  # struct tc_mirred: tc_gen (index, capab, action, refcnt,
#                                         bindcnt), eaction, ifindex
U64 = struct.Struct("=Q")
RATESPEC_RATE = 8  # offset of tc_ratespec.rate (cell_log u8, linklayer u8, overhead u16, cell_align
#                    s16, mpu u16, then rate u32)

# Kinds that limit the rate they send at: always, or (cake) when given a bandwidth.
RATE_LIMITERS = frozenset({"htb", "hfsc", "tbf", "cbq", "cake"})
# the action list's attribute in each classifier's options
ACTION_LISTS = {"u32": uapi.TCA_U32_ACT, "matchall": uapi.TCA_MATCHALL_ACT, "flower": uapi.TCA_FLOWER_ACT,
                "basic": uapi.TCA_BASIC_ACT, "fw": uapi.TCA_FW_ACT, "bpf": uapi.TCA_BPF_ACT}
MIRRED_ACTIONS = {uapi.TCA_EGRESS_REDIR: "egress redirect", uapi.TCA_EGRESS_MIRROR: "egress mirror",
                  uapi.TCA_INGRESS_REDIR: "ingress redirect", uapi.TCA_INGRESS_MIRROR: "ingress mirror"}


@dataclass(frozen=True)
class Qdisc:
    ifindex: int
    kind: str
    handle: int
    parent: int
    rate: int | None = None  # bytes per second, when the options carry one (cake, tbf)

    @property
    def at_ingress_hook(self) -> bool:
        """The ingress or clsact qdisc (it hangs from TC_H_INGRESS, == TC_H_CLSACT)."""
        return self.parent == uapi.TC_H_INGRESS

    @property
    def limits_rate(self) -> bool:
        """Whether this qdisc shapes: a rate limiter by kind; cake only with a bandwidth
        (cake without one is an AQM at line rate, like fq_codel)."""
        if self.kind == "cake":
            return bool(self.rate)
        return self.kind in RATE_LIMITERS


@dataclass(frozen=True)
class Redirect:
    """A mirred action in a filter at a device's ingress hook."""

    ifindex: int        # the device the filter sits on
    filter_kind: str    # u32, matchall ...
    action: str         # "egress redirect" ...
    target: int         # the ifindex packets are sent to


def _tcmsg(buf: Buffer, off: int, length: int) -> tuple[int, int, int, dict[int, tuple[int, int]]] | None:
    start = off + uapi.NLMSG_HDRLEN
    if length < uapi.NLMSG_HDRLEN + TCMSG.size:
        return None
    _fam, _p1, _p2, ifindex, handle, parent, _info = TCMSG.unpack_from(buf, start)
    return ifindex, handle, parent, attrs(buf, start + TCMSG.size, off + length)


def parse_qdisc(buf: Buffer, off: int, length: int) -> Qdisc | None:
    """A RTM_NEWQDISC message at buf[off:off+length]; None when it is not one we can read."""
    head = _tcmsg(buf, off, length)
    if head is None:
        return None
    ifindex, handle, parent, a = head
    kind = string(buf, a.get(uapi.TCA_KIND))
    if kind is None:
        return None
    opts = nested(buf, a.get(uapi.TCA_OPTIONS))
    rate: int | None = None
    if kind == "cake":
        rate = value(buf, opts.get(uapi.TCA_CAKE_BASE_RATE64), U64)
    elif kind == "tbf":
        # a rate of 2^32 bytes/s or more is in TBF_RATE64, the 32-bit field then saturated
        rate = value(buf, opts.get(uapi.TCA_TBF_RATE64), U64)
        parms = opts.get(uapi.TCA_TBF_PARMS)
        if rate is None and parms is not None and parms[1] - parms[0] >= RATESPEC_RATE + 4:
            rate = U32.unpack_from(buf, parms[0] + RATESPEC_RATE)[0]
    return Qdisc(ifindex, kind, handle, parent, rate)


def parse_filter(buf: Buffer, off: int, length: int) -> list[Redirect]:
    """The mirred actions of a RTM_NEWTFILTER message (none for a header entry, a classifier
    without an action list, or actions of other kinds)."""
    head = _tcmsg(buf, off, length)
    if head is None:
        return []
    ifindex, _handle, _parent, a = head
    kind = string(buf, a.get(uapi.TCA_KIND))
    if kind not in ACTION_LISTS:
        return []
    acts = nested(buf, nested(buf, a.get(uapi.TCA_OPTIONS)).get(ACTION_LISTS[kind]))
    out = []
    for _order, span in sorted(acts.items()):
        act = nested(buf, span)
        if string(buf, act.get(uapi.TCA_ACT_KIND)) != "mirred":
            continue
        parms = nested(buf, act.get(uapi.TCA_ACT_OPTIONS)).get(uapi.TCA_MIRRED_PARMS)
        if parms is None or parms[1] - parms[0] < TC_MIRRED.size:
            continue
        *_gen, eaction, target = TC_MIRRED.unpack_from(buf, parms[0])
        out.append(Redirect(ifindex, kind, MIRRED_ACTIONS.get(eaction, f"mirred action {eaction}"), target))
    return out


def _tcmsg_request(ifindex: int = 0, parent: int = 0) -> bytes:
    return TCMSG.pack(0, 0, 0, ifindex, 0, parent, 0)


def dump_qdiscs(nl: NetlinkSocket) -> list[Qdisc]:
    """Every qdisc of every device in the socket's namespace. OSError when the kernel refuses."""
    out = []
    for mtype, _flags, off, length in nl.dump(uapi.RTM_GETQDISC, uapi.NLM_F_DUMP, _tcmsg_request()):
        if mtype == uapi.RTM_NEWQDISC:
            q = parse_qdisc(nl.buf, off, length)
            if q is not None:
                out.append(q)
    return out


INGRESS_FILTERS = (uapi.TC_H_CLSACT & 0xFFFF0000) | uapi.TC_H_MIN_INGRESS  # ingress and clsact alike


def dump_ingress_redirects(nl: NetlinkSocket, ifindex: int) -> list[Redirect]:
    """The mirred actions of the filters on a device's ingress hook. OSError from the kernel
    (ENODEV: the device went; EINVAL: it has no ingress or clsact qdisc)."""
    out = []
    for mtype, _flags, off, length in nl.dump(uapi.RTM_GETTFILTER, uapi.NLM_F_DUMP,
                                              _tcmsg_request(ifindex, INGRESS_FILTERS)):
        if mtype == uapi.RTM_NEWTFILTER:
            out.extend(parse_filter(nl.buf, off, length))
    return out


def format_rate(rate: int | None) -> str:
    """Bytes per second as tc prints bits per second: 4Mbit, 500Kbit, 1Gbit."""
    if not rate:
        return ""
    bits = rate * 8
    for unit, scale in (("Gbit", 10**9), ("Mbit", 10**6), ("Kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"
