"""The engine's hardware adapter: flower rules on the devices' clsact ingress, over rtnetlink.

A connection is placed as two rules (one per direction, on each direction's ingress
device) or not at all. Whatever the kernel or the driver refuses -- a table that is
full (ENOSPC), a match or action the NIC cannot do (EOPNOTSUPP, EINVAL), no
cls_flower in the kernel (ENOENT) -- is a :class:`HwRefused` with the reason, and
the engine puts that connection on the XDP path instead.

Rules go in with skip_sw on NICs (the hardware alone carries them: a rule the NIC
does not take is refused, never silently run by the CPU) or with skip_hw when the
configuration asks for software flower (labs and tests: the kernel's flower runs
the very rules a NIC would get). Counters come from one filter dump per device:
packets, bytes and how long ago the rule last matched, which feed the engine's
keep-alive and idle expiry just as the XDP counters do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass
from typing import Any

from pyflow.control.model import HwRefused
from pyflow.datapath.abi import FlowAction, FlowKey
from pyflow.hw import flower as F
from pyflow.hw import rules
from pyflow.netlink import tc
from pyflow.netlink.errors import errno_name, error_text

log = logging.getLogger(__name__)

F.register()


@dataclass(frozen=True)
class RuleId:
    ifindex: int
    prio: int
    protocol: int
    handle: int


@dataclass(frozen=True)
class RuleStats:
    packets: int
    bytes: int
    idle_ns: int  # since the rule last matched (10 ms resolution)


@dataclass
class _Device:
    ifname: str
    mtu: int
    own_clsact: bool
    next_handle: int = 1
    refused: str | None = None  # why the device takes no rule (its guards were refused)


def _reason(exc: Exception) -> tuple[str, str]:
    """(reason counted, message) of a refused netlink request: "enospc", "... (ENOSPC)"."""
    return errno_name(getattr(exc, "code", 0)).lower(), error_text(exc)


class FlowerOffload:
    """Places flows as flower rules on registered devices. Not thread-safe: the control
    loop's thread owns it (pyroute2's sockets belong to the thread that made them)."""

    def __init__(self, *, skip_hw: bool, ipr: Any = None):
        from pyroute2.iproute import IPRoute

        self.flags = F.SKIP_HW if skip_hw else F.SKIP_SW
        self._own_ipr = ipr is None
        self._ipr = ipr if ipr is not None else IPRoute(ext_ack=True)
        self._devices: dict[int, _Device] = {}
        self._rules: set[RuleId] = set()

    # ---- devices ------------------------------------------------------------------

    def add_device(self, ifindex: int) -> str | None:
        """Make ifindex a hardware device: clsact (made if absent), rules an earlier process
        left at our priorities removed, and the TTL guards. Called again (a link change) it
        re-reads the device's name and MTU.

        Returns None, or why the device takes no rule (then every flow offered for it is
        refused with that reason, counted, and carried by the XDP path: flow rules without
        the guards would forward TTL 1 packets)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            (link,) = self._ipr.link("get", index=ifindex)
        except NetlinkError as exc:
            return _reason(exc)[0]
        ifname, mtu = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU") or 0
        if ifindex in self._devices:
            dev = self._devices[ifindex]
            dev.ifname, dev.mtu = ifname, mtu
            return dev.refused
        dev = _Device(ifname, mtu, False)
        self._devices[ifindex] = dev
        try:
            try:
                # a legacy ingress qdisc at the hook serves as well: flower rules hang on
                # its ingress parent just as on clsact's
                _kind, dev.own_clsact = tc.ensure_clsact(self._ipr, ifindex)
            except NetlinkError as exc:
                raise HwRefused(*_reason(exc)) from None
            self._clear_stale(ifindex)
            placed: list[RuleId] = []
            try:
                for place, filt in rules.guard_filters(ifindex, flags=self.flags):
                    placed.append(self._add(place, filt))
            except HwRefused:
                self._delete(placed)
                raise
        except HwRefused as exc:
            self._drop_clsact(ifindex, dev.own_clsact)
            dev.own_clsact = False
            dev.refused = exc.reason
            log.warning("%s: takes no flower rule (%s): its flows stay on the XDP path", ifname, exc)
            return dev.refused
        log.info("%s: flower rules %s (guards for TTL <= 1 in place)", ifname,
                 "in software (skip_hw)" if self.flags & F.SKIP_HW else "in hardware (skip_sw)")
        return None

    def _clear_stale(self, ifindex: int) -> None:
        """Delete every filter at pyflow's flower priorities (left by a process that died):
        their flows are not known here, so nothing would keep them alive or remove them."""
        from pyroute2.netlink.exceptions import NetlinkError

        for protocol in rules.PROTOCOLS:
            for guard in (True, False):
                with contextlib.suppress(NetlinkError):
                    tc.delete_filter(self._ipr, F.KIND, ifindex, 0, prio=rules.prio_of(protocol, guard=guard),
                                     protocol=protocol, filter=F.NO_OPTIONS)

    def device_ifindexes(self) -> set[int]:
        return set(self._devices)

    def remove_device(self, ifindex: int) -> None:
        """The device is no hardware device any more: its rules and guards go (flows through
        it are the engine's to hand back), and the clsact qdisc if this adapter made it."""
        dev = self._devices.pop(ifindex, None)
        if dev is None:
            return
        self._delete(sorted((r for r in self._rules if r.ifindex == ifindex),
                            key=lambda r: (r.prio, r.handle)))
        self._drop_clsact(ifindex, dev.own_clsact)

    def capable(self, ifindex: int) -> bool:
        return ifindex in self._devices

    def _drop_clsact(self, ifindex: int, own: bool) -> None:
        if own:
            tc.remove_clsact_if_unused(self._ipr, ifindex)

    # ---- rules --------------------------------------------------------------------

    def _add(self, place: rules.Placement, filt: F.FlowerFilter) -> RuleId:
        from pyroute2.netlink.exceptions import NetlinkError

        dev = self._devices[place.ifindex]
        for _attempt in range(4):
            handle = dev.next_handle
            dev.next_handle = dev.next_handle % 0xFFFFFFFE + 1
            rid = RuleId(place.ifindex, place.prio, place.protocol, handle)
            if rid in self._rules:
                continue
            try:
                self._ipr.tc("add-filter", F.KIND, place.ifindex, handle, parent=tc.PARENT_INGRESS,
                             prio=place.prio, protocol=place.protocol, filter=filt)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    continue  # a handle left by an earlier process: take the next
                raise HwRefused(*_reason(exc)) from None
            self._rules.add(rid)
            return rid
        raise HwRefused("no_handle", f"no free filter handle on {dev.ifname}")

    def _delete(self, ids: list[RuleId]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for rid in ids:
            self._rules.discard(rid)
            try:
                tc.delete_filter(self._ipr, F.KIND, rid.ifindex, rid.handle, prio=rid.prio,
                                 protocol=rid.protocol, filter=F.NO_OPTIONS)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    log.warning("cannot delete flower rule %s: %s", rid, _reason(exc)[1])

    def place(self, keys: tuple[FlowKey, FlowKey], actions: tuple[FlowAction, FlowAction]
              ) -> tuple[RuleId, RuleId]:
        """Both directions as rules, or neither (HwRefused)."""
        built = []
        for key, action in zip(keys, actions, strict=True):
            dev = self._devices.get(key.ifindex)
            if dev is None:
                raise HwRefused("not_hw_device", f"ifindex {key.ifindex}")
            if dev.refused is not None:
                raise HwRefused(dev.refused, f"{dev.ifname} took no guard rule")
            try:
                built.append(rules.flow_filter(key, action, indev=dev.ifname, flags=self.flags,
                                               ingress_mtu=dev.mtu))
            except rules.Unplaceable as exc:
                raise HwRefused(str(exc)) from None
        placed: list[RuleId] = []
        try:
            for place, filt in built:
                placed.append(self._add(place, filt))
        except HwRefused:
            self._delete(placed)
            raise
        return placed[0], placed[1]

    def remove(self, ids: tuple[RuleId, ...]) -> None:
        self._delete(list(ids))

    def stats(self) -> dict[RuleId, RuleStats]:
        """Counters of every rule this adapter placed that the devices still hold: one dump
        per device. A rule missing from the answer was removed behind our back."""
        from pyroute2.netlink.exceptions import NetlinkError

        out: dict[RuleId, RuleStats] = {}
        for ifindex, dev in self._devices.items():
            if dev.refused is not None:
                continue
            try:
                msgs = tc.filters(self._ipr, ifindex)
            except NetlinkError as exc:
                log.warning("cannot dump flower rules of ifindex %d: %s", ifindex, _reason(exc)[1])
                continue
            for msg in msgs:
                d = F.decode_filter(msg)
                if d is None or not d.stats:
                    continue
                rid = RuleId(ifindex, d.prio, d.protocol, d.handle)
                if rid not in self._rules:
                    continue
                first = d.stats[0]  # every matching packet runs the first action
                idle_ms = min(s.last_used_ms for s in d.stats)
                out[rid] = RuleStats(first.packets, first.bytes, idle_ms * 1_000_000)
        return out

    def rules(self) -> set[RuleId]:
        return set(self._rules)

    def close(self) -> None:
        """Remove every rule and guard this adapter placed, and the clsact qdiscs it made
        (when nothing else lives on them)."""
        self._delete(sorted(self._rules, key=lambda r: (r.ifindex, r.prio, r.handle)))
        for ifindex, dev in list(self._devices.items()):
            self._drop_clsact(ifindex, dev.own_clsact)
        self._devices.clear()
        if self._own_ipr:
            with contextlib.suppress(Exception):
                self._ipr.close()
