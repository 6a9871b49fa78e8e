"""Traffic shaping on the managed devices, and what pyflow does about it.

Facts (read with pyflow.netlink.qdisc):

* an XDP redirect (devmap, ndo_xdp_xmit) puts the frame on the egress driver's ring and
  skips every qdisc of that device; flower rules run by a NIC skip them too;
* pyflow's TC hook redirects with bpf_redirect to the egress device, which goes through
  dev_queue_xmit and so through its root qdisc: cake, htb, fq_codel under a shaper all
  see the packet as they would on the kernel path;
* sqm-scripts shapes downloads by redirecting the WAN's ingress to an IFB device (a
  mirred egress redirect on the ingress hook). Packets coming back from the IFB skip
  the ingress classifiers (tc_skip_classify), so a TC hook on that ingress never sees
  them after shaping; one that ran before the mirred filter, or XDP, which runs before
  any filter, would forward them around the IFB and its shaper.

Policy, applied at every attach and whenever the qdiscs change:

1. While any managed device shapes its egress, no managed device runs XDP or places
   flower rules in hardware, since either would forward into the shaped device past its
   qdisc: ``auto`` takes TC ingress (and no hardware placement; hw_skip_hw's software
   flower rules redirect through dev_queue_xmit and are kept), and an explicit
   ``native``, ``generic`` or ``hw`` is refused with the reason. A device that already
   runs an explicit XDP mode when shaping appears is detached (its connections go back
   to the kernel path, shaped) and shown as failed with that reason, until the shaping
   goes or its mode is changed.
2. A device whose ingress is redirected to another device (the IFB of sqm-scripts) is
   left to the kernel path: pyflow puts no hook on it, so connections through it are
   not offloaded (``ingress_not_managed``/``egress_not_managed``) and keep their IFB
   shaping. The equivalent that offloads is a shaper on the LAN device's egress (the
   README's "SQM and shaping").
3. A connection whose path goes through a shaping device above the managed device the
   datapath redirects to (SQM on pppoe-wan or wan.7 over a managed wan, on br-lan over a
   managed port) is not offloaded (``shaped_upper``): the redirect would skip that shaper.
   The set of shaping devices covers every device of the namespace, managed or not
   (``Shaping.shaped_ifindexes``, handed to Engine.shaping_changed).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyflow.netlink import qdisc, uapi
from pyflow.netlink.sock import NetlinkSocket

log = logging.getLogger(__name__)

# How often pyflowd re-reads the qdiscs of its devices (seconds). A qdisc change is rare
# and the read is one dump; until it is seen, a new shaper is bypassed for this long at most.
CHECK_INTERVAL_S = 2.0

XDP_MODES = ("native", "generic")


@dataclass(frozen=True)
class DeviceShaping:
    """What shapes one device."""

    egress: tuple[str, ...] = ()       # the rate-limiting qdiscs of its egress: "cake 4Mbit", "htb"
    ingress_redirect: str | None = None  # "egress redirect to ifb4wan (u32)": where its ingress goes

    @property
    def shaped(self) -> bool:
        return bool(self.egress) or self.ingress_redirect is not None

    def to_json(self) -> dict[str, object]:
        return {"egress": list(self.egress), "ingress_redirect": self.ingress_redirect}


@dataclass(frozen=True)
class Shaping:
    """The shaping of every device read, by name (devices with none are absent)."""

    devices: Mapping[str, DeviceShaping] = field(default_factory=dict)
    # every device of the namespace, managed or not, with a rate-limiting egress qdisc or an
    # ingress redirected elsewhere (an IFB): the planner refuses paths through one of them
    # above the managed layer (shaped_upper)
    shaped_ifindexes: frozenset[int] = frozenset()

    def of(self, name: str) -> DeviceShaping:
        return self.devices.get(name, DeviceShaping())

    def shaped_egress(self, names: Iterable[str]) -> list[str]:
        """Which of ``names`` shape their egress, sorted."""
        return sorted(n for n in names if self.of(n).egress)

    def no_xdp_reason(self, managed: Iterable[str]) -> str | None:
        """Why no managed device may forward by XDP (or by NIC flower rules), or None."""
        shaped = self.shaped_egress(managed)
        if not shaped:
            return None
        which = ", ".join(f"{n} ({' + '.join(self.of(n).egress)})" for n in shaped)
        return (f"egress shaped on {which}: an XDP redirect or NIC rule into it would skip its "
                f"qdisc, a TC redirect goes through it")

    def kernel_path_reason(self, name: str) -> str | None:
        """Why ``name`` gets no hook at all (its ingress goes to a shaper), or None."""
        redirect = self.of(name).ingress_redirect
        if redirect is None:
            return None
        return (f"ingress {redirect}: download shaping on the kernel path; any ingress hook "
                f"would forward around it, so pyflow leaves {name} to the kernel (shape on the "
                f"LAN egress to offload, see the README's SQM section)")


def describe(q: qdisc.Qdisc) -> str:
    rate = qdisc.format_rate(q.rate)
    return f"{q.kind} {rate}" if rate else q.kind


def from_dumps(qdiscs: Iterable[qdisc.Qdisc], redirects: Iterable[qdisc.Redirect],
               names: Mapping[int, str]) -> Shaping:
    """The shaping of the devices in ``names`` (ifindex -> name) from the qdiscs and the
    ingress redirects read. Pure: the unit tests feed it decoded messages."""
    egress: dict[str, list[str]] = {}
    for q in qdiscs:
        name = names.get(q.ifindex)
        if name is None or q.at_ingress_hook or not q.limits_rate:
            continue
        egress.setdefault(name, []).append(describe(q))
    ingress: dict[str, str] = {}
    for r in redirects:
        name = names.get(r.ifindex)
        if name is None or name in ingress:
            continue
        target = names.get(r.target) or _ifname(r.target)
        ingress[name] = f"{r.action} to {target} ({r.filter_kind})"
    out = {n: DeviceShaping(tuple(sorted(egress.get(n, ()))), ingress.get(n))
           for n in sorted(set(egress) | set(ingress))}
    shaped = {q.ifindex for q in qdiscs if not q.at_ingress_hook and q.limits_rate}
    shaped.update(r.ifindex for r in redirects)
    return Shaping(out, frozenset(shaped))


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"


def read(nl: NetlinkSocket, names: Iterable[str]) -> Shaping:
    """Read the shaping of the named devices (absent ones are skipped) in the socket's
    namespace, and which devices of the namespace shape at all (one qdisc dump, and a
    filter dump per device with an ingress or clsact qdisc). OSError when the kernel
    refuses the qdisc dump."""
    index: dict[int, str] = {}
    for name in names:
        try:
            index[socket.if_nametoindex(name)] = name
        except OSError:
            continue  # not there (yet): attaching it will say so
    qdiscs = qdisc.dump_qdiscs(nl)
    redirects: list[qdisc.Redirect] = []
    for q in qdiscs:
        if q.at_ingress_hook:
            try:
                redirects.extend(qdisc.dump_ingress_redirects(nl, q.ifindex))
            except OSError as exc:  # gone or changed between the two dumps: next read
                log.debug("ifindex %d: ingress filters unreadable: %s", q.ifindex, exc)
    return from_dumps(qdiscs, redirects, index)


class Watcher:
    """Reads the shaping of a set of devices on a socket of its own, for the thread that
    calls it (the daemon checks every CHECK_INTERVAL_S from its main thread)."""

    def __init__(self) -> None:
        self._nl: NetlinkSocket | None = None

    def read(self, names: Iterable[str]) -> Shaping:
        if self._nl is None:
            self._nl = NetlinkSocket(uapi.NETLINK_ROUTE)
        return read(self._nl, names)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None
