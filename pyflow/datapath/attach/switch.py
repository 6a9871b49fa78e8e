"""Which mode a device gets, and moving it there without a moment with no hook.

A mode switch attaches the new hook first and removes the old one after. The brief
overlap is harmless: both programs share the flow map, so they take the same decision,
and a packet XDP redirected never reaches TC ingress of that device (while a packet XDP
passed meets the TC program, which forwards it exactly as XDP would have). Native and
generic XDP cannot both be on one device (the kernel refuses), so a switch between them
goes through TC: TC in, old XDP out, new XDP in, TC out.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import Any

from pyflow.datapath import netdev
from pyflow.datapath.attach.state import Attachment
from pyflow.datapath.attach.tc import TcHook
from pyflow.datapath.attach.xdp import XdpHook, attached_mode
from pyflow.errors import DeviceError


@dataclass(frozen=True)
class Choice:
    """What an attach asked for comes to on one device."""

    mode: str          # native | generic | tc
    reason: str
    fallback: bool     # auto chose native: a driver without native XDP falls back to tc
    hw: bool           # flower rules on this device too


def hw_choice(ifname: str, *, asked: bool, skip_hw: bool) -> tuple[bool, str]:
    """(place flower rules on ifname, why) for mode hw (asked) or auto. hw on a device
    without hw-tc-offload is refused, unless skip_hw makes the rules software ones."""
    import pyflow.netlink.ethtool as ethtool

    try:
        cap = ethtool.tc_offload(ifname)
        active, why_not = cap.active, cap.why_not()
    except DeviceError as exc:
        active, why_not = False, str(exc)
    if active:
        return True, "hw-tc-offload is on: flower rules in the NIC"
    if not asked:
        return False, ""
    if skip_hw:
        return True, f"hw with hw_skip_hw: flower rules in software ({why_not})"
    raise DeviceError(f"{ifname} cannot offload to hardware ({why_not}); use --mode auto or tc")


def vlan_fix(facts: netdev.DeviceFacts) -> str:
    """The ethtool command that turns this device's rx VLAN stripping off."""
    from pyflow.netlink.ethtool import RX_VLAN_STRIP

    words = [f"{RX_VLAN_STRIP[f]} off" for f in facts.vlan_rx_strip if f in RX_VLAN_STRIP]
    return f"ethtool -K {facts.ifname} {' '.join(words or ['rxvlan off'])}"


def choose(facts: netdev.DeviceFacts, mode: str, *, skip_hw: bool, no_xdp: str | None = None) -> Choice:
    """The software mode for ``mode`` (auto's rule for hw and auto), and whether hw.

    XDP on a device with VLAN uppers that strips tags on receive is never chosen
    (DeviceFacts.vlan_hazard): asked for explicitly it is refused before anything
    changes, auto (and hw's software hook) takes TC, which reads the stripped tag.

    ``no_xdp``: the caller's reason why no XDP redirect and no rule run by the NIC may
    forward from this device (a managed device shapes its egress, and both would skip
    its qdisc; pyflow.daemon.shaping). Explicit native, generic or hw (in the NIC) are
    then refused with it; auto takes TC and no hardware placement (software flower rules,
    skip_hw, redirect through the qdisc and stay)."""
    hazard = facts.vlan_hazard()
    if mode in ("native", "generic") and hazard:
        raise DeviceError(f"{facts.ifname}: {mode} XDP refused: {hazard}; use --mode tc "
                          f"(or auto), or run `{vlan_fix(facts)}` first")
    if no_xdp and mode in ("native", "generic"):
        raise DeviceError(f"{facts.ifname}: {mode} XDP refused: {no_xdp}; use --mode tc (or auto)")
    if no_xdp and mode == "hw" and not skip_hw:
        raise DeviceError(f"{facts.ifname}: hw refused: {no_xdp} (flower rules in the NIC skip it "
                          f"too); use --mode tc (or auto)")
    if mode not in ("hw", "auto"):
        return Choice(mode, f"asked for {mode}", False, False)
    if no_xdp and not skip_hw:
        hw, hw_reason = False, ""
    else:
        hw, hw_reason = hw_choice(facts.ifname, asked=mode == "hw", skip_hw=skip_hw)
    mode, reason = netdev.choose_mode(facts)
    if no_xdp and mode != "tc":
        mode, reason = "tc", f"TC ingress instead of {mode} XDP: {no_xdp}"
    elif no_xdp:
        reason = f"{reason}; XDP would be ruled out anyway: {no_xdp}"
    if hazard and mode != "tc":
        mode, reason = "tc", f"TC ingress instead of {mode} XDP: {hazard} (TC reads them)"
    elif hazard:
        reason = f"{reason}; XDP would be ruled out anyway: {hazard}"
    if hw:
        reason = f"{hw_reason}; software hook for refused flows: {reason}"
    return Choice(mode, reason, mode == "native", hw)


def kernel_part(exc: DeviceError) -> str:
    """The kernel's part of a DeviceError message (after the last ': ')."""
    return str(exc).rsplit(": ", 1)[-1]


class ModeSwitch:
    """Moves devices between XDP native, XDP generic and TC."""

    def __init__(self, ipr: Any, xdp: XdpHook, tc: TcHook) -> None:
        self._ipr = ipr
        self._xdp = xdp
        self._tc = tc

    def apply(self, facts: netdev.DeviceFacts, before: Attachment | None, choice: Choice,
              known: set[int]) -> tuple[str, str, bool]:
        """Move the device to ``choice``; (mode, reason, own_clsact). A NIC auto called
        native whose driver has no native XDP (EOPNOTSUPP) gets TC instead, and the
        reason says so."""
        try:
            return choice.mode, choice.reason, self.switch(facts, before, choice.mode, known)
        except DeviceError as exc:
            if not (choice.fallback and getattr(exc, "errno", 0) == errno.EOPNOTSUPP):
                raise
            reason = (f"NIC driver {facts.driver or '?'} has no native XDP "
                      f"({kernel_part(exc)}): TC ingress")
            return "tc", reason, self.switch(facts, before, "tc", known)

    def switch(self, facts: netdev.DeviceFacts, before: Attachment | None, mode: str,
               known: set[int]) -> bool:
        """Move the device to ``mode``, never leaving it without a hook. Returns own_clsact."""
        own_clsact = bool(before and before.own_clsact)
        xdp_mode = attached_mode(facts) if facts.xdp_prog_id in known else None
        tc_ours = self._tc.ours(facts.ifindex)
        if mode == "tc":
            made = self._tc.install(facts)
            if xdp_mode is not None:
                self._xdp_remove_after_tc(facts, tc_ours, made)
            return own_clsact or made
        if xdp_mode is not None and xdp_mode != mode:
            return self._switch_xdp_mode(facts, mode, tc_ours, own_clsact)
        self._xdp.install(facts, mode)
        if tc_ours:
            self._tc.remove(facts.ifindex, facts.ifname, own_clsact)
            own_clsact = False
        return own_clsact

    def _xdp_remove_after_tc(self, facts: netdev.DeviceFacts, tc_ours: bool, made_clsact: bool) -> None:
        """Remove XDP once TC carries the device; if that fails, take back the TC hook
        this call added (not one that was ours before), so nothing changed."""
        try:
            self._xdp.remove(facts)
        except DeviceError:
            if not tc_ours:
                self._tc.remove(facts.ifindex, facts.ifname, made_clsact)
            raise

    def _switch_xdp_mode(self, facts: netdev.DeviceFacts, mode: str, tc_ours: bool,
                         own_clsact: bool) -> bool:
        """native <-> generic, bridged by TC so the device always has a fast path."""
        made = False if tc_ours else self._tc.install(facts)
        self._xdp_remove_after_tc(facts, tc_ours, made)
        fresh = netdev.read_facts(self._ipr, ifindex=facts.ifindex)
        try:
            self._xdp.install(fresh, mode)
        except DeviceError:
            # put the old mode back (our current program) before giving up
            with contextlib.suppress(DeviceError):
                self._xdp.install(fresh, attached_mode(facts) or mode)
            if not tc_ours:
                self._tc.remove(facts.ifindex, facts.ifname, made)
            raise
        self._tc.remove(facts.ifindex, facts.ifname, made or own_clsact)
        return False
