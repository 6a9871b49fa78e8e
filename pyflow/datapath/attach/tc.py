"""The datapath's TC hook: a cls_bpf direct-action filter on a device's clsact ingress.

Our filter sits at a fixed priority and handle, so that re-attaching is a plain
"replace" of that one filter. The priority is far from the 1..10 people type by hand
and from tc's automatic ones (49152 and down).
"""

from __future__ import annotations

from typing import Any

from pyflow.datapath import bpfsource, netdev
from pyflow.datapath.attach.programs import Programs
from pyflow.errors import DeviceError
from pyflow.netlink import tc, wire
from pyflow.netlink.errors import error_text
from pyflow.netlink.uapi import ETH_P_ALL, TCA_BPF_ID  # TCA_BPF_ID: pyroute2 0.9.7 does not decode it

TC_PRIO = 0x2F10
TC_HANDLE = 1
TC_NAME = bpfsource.TC_FUNC


def raw_u32_attr(nla_obj: Any, attr_type: int) -> int | None:
    """Value of a u32 attribute nested in pyroute2's ``nla_obj``, read from its raw bytes
    with the one attribute walker (pyflow.netlink.wire)."""
    data, start = nla_obj.data, nla_obj.offset
    inner = wire.attrs(data, start + wire.NLATTR.size, start + nla_obj.length)
    return wire.value(data, inner.get(attr_type), wire.U32)  # host order


class TcHook:
    """Puts this process's TC program on devices' clsact ingress and takes pyflow's off."""

    def __init__(self, ipr: Any, progs: Programs) -> None:
        self._ipr = ipr
        self._progs = progs

    def current(self, ifindex: int) -> tuple[str | None, int] | None:
        """(name, prog id) of the filter at our prio/handle on clsact ingress, or None."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = tc.filters(self._ipr, ifindex)
        except NetlinkError:
            return None  # no clsact qdisc: nothing can be there
        for m in msgs:
            if m["handle"] != TC_HANDLE or (m["info"] >> 16) != TC_PRIO:
                continue
            if m.get_attr("TCA_KIND") != "bpf":
                return ("(" + str(m.get_attr("TCA_KIND")) + ")", 0)
            opts = m.get_attr("TCA_OPTIONS")
            if opts is None:
                return (None, 0)
            return (opts.get_attr("TCA_BPF_NAME"), raw_u32_attr(opts, TCA_BPF_ID) or 0)
        return None

    def ours(self, ifindex: int) -> bool:
        return (self.current(ifindex) or ("", 0))[0] == TC_NAME

    def install(self, facts: netdev.DeviceFacts) -> bool:
        """Put our filter on clsact ingress (replace if there); True if we made the qdisc."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            kind, made = tc.ensure_clsact(self._ipr, facts.ifindex)
        except NetlinkError as exc:
            raise DeviceError(f"{facts.ifname}: cannot add clsact qdisc: {error_text(exc)}") from None
        if kind != tc.CLSACT:
            raise DeviceError(f"{facts.ifname}: has an {kind} qdisc at ffff:, pyflow needs clsact")
        current = self.current(facts.ifindex)
        if current is not None and current[0] != TC_NAME:
            if made:
                tc.remove_clsact_if_unused(self._ipr, facts.ifindex)
            raise DeviceError(f"{facts.ifname}: another filter ({current[0]}) holds TC prio "
                              f"{TC_PRIO} handle {TC_HANDLE} on ingress")
        try:
            # "replace" swaps the classifier's program under RCU: the filter never disappears
            self._ipr.tc("replace-filter", "bpf", facts.ifindex, TC_HANDLE, fd=self._progs.tc.fd,
                         name=TC_NAME, parent=tc.PARENT_INGRESS, prio=TC_PRIO, protocol=ETH_P_ALL,
                         direct_action=True)
        except NetlinkError as exc:
            if made:
                tc.remove_clsact_if_unused(self._ipr, facts.ifindex)
            raise DeviceError(f"{facts.ifname}: cannot attach TC filter: {error_text(exc)}") from None
        return made

    def remove(self, ifindex: int, ifname: str, drop_qdisc: bool) -> None:
        """Take our filter off; with drop_qdisc (we made clsact) the qdisc too, if unused."""
        from pyroute2.netlink.exceptions import NetlinkError

        if self.ours(ifindex):
            try:
                tc.delete_filter(self._ipr, "bpf", ifindex, TC_HANDLE, prio=TC_PRIO, protocol=ETH_P_ALL)
            except NetlinkError as exc:
                raise DeviceError(f"{ifname}: cannot remove TC filter: {error_text(exc)}") from None
        if drop_qdisc:
            tc.remove_clsact_if_unused(self._ipr, ifindex)
