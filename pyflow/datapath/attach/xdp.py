"""XDP on a device, over rtnetlink (IFLA_XDP), in native or generic mode."""

from __future__ import annotations

from typing import Any

from pyflow.datapath import netdev
from pyflow.datapath.attach.programs import Programs
from pyflow.errors import DeviceError
from pyflow.netlink.errors import error_text
from pyflow.netlink.uapi import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
)

# IFLA_XDP_ATTACHED values as pyroute2 names them, per mode
XDP_ATTACHED = {"native": "xdp", "generic": "xdpgeneric"}
XDP_FLAG = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
ATTACHED_MODE = {v: k for k, v in XDP_ATTACHED.items()}


def attached_mode(facts: netdev.DeviceFacts) -> str | None:
    """native or generic for the XDP program the device runs; None for none (or offload)."""
    return ATTACHED_MODE.get(facts.xdp_mode or "")


class XdpHook:
    """Puts this process's XDP program on devices and takes pyflow's off again."""

    def __init__(self, ipr: Any, progs: Programs) -> None:
        self._ipr = ipr
        self._progs = progs

    def _set(self, facts: netdev.DeviceFacts, fd: int, flags: int, expected_fd: int | None,
             what: str, mode: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
        if expected_fd is not None:
            flags |= XDP_FLAGS_REPLACE
            attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
        attrs.append(("IFLA_XDP_FLAGS", flags))
        try:
            self._ipr.link("set", index=facts.ifindex, xdp={"attrs": attrs})
        except NetlinkError as exc:
            err = DeviceError(f"{facts.ifname}: cannot {what} XDP in {mode} mode: {error_text(exc)}")
            err.errno = exc.code  # type: ignore[attr-defined]
            raise err from None

    def install(self, facts: netdev.DeviceFacts, mode: str) -> None:
        """Put our XDP program on the device in ``mode``.

        When one of ours already runs there in that mode it is swapped in one
        netlink request: the kernel exchanges the program pointer, so no packet
        meets a device without a program. XDP_FLAGS_REPLACE with the old program
        as expected fd makes the swap a compare-and-exchange (it fails rather
        than clobber a program someone else attached meanwhile); without an fd
        for the old program (an older generation that is no longer pinned) it is
        a plain replace, which is just as atomic.
        """
        flags = XDP_FLAG[mode]
        if facts.xdp_prog_id and attached_mode(facts) == mode:
            with self._progs.xdp_fd_of(facts.xdp_prog_id) as old_fd:
                self._set(facts, self._progs.xdp.fd, flags, old_fd, "replace", mode)
        else:
            self._set(facts, self._progs.xdp.fd, flags | XDP_FLAGS_UPDATE_IF_NOEXIST, None, "attach", mode)

    def remove(self, facts: netdev.DeviceFacts) -> None:
        """Take the XDP program off (named as expected, when we have an fd for it)."""
        mode = attached_mode(facts)
        if not facts.xdp_prog_id or mode is None:
            return
        with self._progs.xdp_fd_of(facts.xdp_prog_id) as old_fd:
            self._set(facts, -1, XDP_FLAG[mode], old_fd, "detach", mode)
