"""The clsact qdisc and the filters on its hooks, over rtnetlink (pyroute2: a cold path).

Both users of TC ingress -- the datapath's cls_bpf hook and the hardware adapter's flower
rules -- need the same three things: find out what sits at the ingress hook, add clsact
when nothing does, and take their clsact away again when they made it and nobody else
uses it. They are here once.

Which qdisc is "the one at the hook": the clsact (or legacy ingress) qdisc is grafted at
the pseudo-parent TC_H_CLSACT, ffff:fff1 (the same value as TC_H_INGRESS), and the kernel
always gives it handle ffff:0000. The handle alone does not identify it: ffff: is a valid
handle for an ordinary egress qdisc too (``tc qdisc add dev X root handle ffff: htb`` is
accepted), and such a qdisc is not a hook any filter could hang on -- it blocks clsact,
whose add then fails with the kernel's own reason. So a qdisc is the hook's only when its
parent is TC_H_CLSACT *and* its handle is ffff:0000.

A clsact qdisc carries both hooks, ingress and egress; removing it removes the filters on
both. So "nobody else uses it" means no filter on either hook.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyflow.netlink.uapi import TC_H_CLSACT, TC_H_MIN_EGRESS, TC_H_MIN_INGRESS

# TC_H_MAKE(major, minor) of <linux/pkt_sched.h>: the major half of one, the minor of the other
CLSACT_HANDLE = TC_H_CLSACT & 0xFFFF0000  # the handle the kernel gives clsact: ffff:0000
PARENT_INGRESS = (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_INGRESS  # ffff:fff2
PARENT_EGRESS = (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_EGRESS  # ffff:fff3
CLSACT = "clsact"


def is_hook_qdisc(msg: Any) -> bool:
    """True for the qdisc at the ingress hook (clsact or ingress): parent and handle."""
    return msg["parent"] == TC_H_CLSACT and msg["handle"] == CLSACT_HANDLE


def hook_qdisc_kind(ipr: Any, ifindex: int) -> str | None:
    """Kind of the qdisc at the ingress hook ("clsact" or "ingress"); None when absent."""
    for q in ipr.get_qdiscs(ifindex):
        if is_hook_qdisc(q):
            return q.get_attr("TCA_KIND")
    return None


def ensure_clsact(ipr: Any, ifindex: int) -> tuple[str, bool]:
    """(kind at the hook, made): adds clsact when the hook is free. Another kind already
    there (legacy ingress) is returned for the caller to judge; pyroute2's NetlinkError
    from the add is the caller's to word."""
    kind = hook_qdisc_kind(ipr, ifindex)
    if kind is not None:
        return kind, False
    ipr.tc("add", CLSACT, ifindex)
    return CLSACT, True


def filters(ipr: Any, ifindex: int, parent: int = PARENT_INGRESS) -> list[Any]:
    """The filter dump of one hook (NetlinkError when the device has no clsact)."""
    return list(ipr.get_filters(ifindex, parent=parent))


def hooks_in_use(ipr: Any, ifindex: int) -> bool:
    """Whether any filter lives on either hook of the clsact qdisc. A dump also carries a
    header entry per priority and protocol with handle 0; only real filters count."""
    from pyroute2.netlink.exceptions import NetlinkError

    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        with contextlib.suppress(NetlinkError):
            if any(m["handle"] for m in filters(ipr, ifindex, parent)):
                return True
    return False


def remove_clsact_if_unused(ipr: Any, ifindex: int) -> None:
    """Remove the clsact qdisc a caller made, unless filters of others now live on it.
    Best effort: a device that went away took its qdisc with it."""
    from pyroute2.netlink.exceptions import NetlinkError

    with contextlib.suppress(NetlinkError):
        if hook_qdisc_kind(ipr, ifindex) != CLSACT or hooks_in_use(ipr, ifindex):
            return
        ipr.tc("del", CLSACT, ifindex)


def delete_filter(ipr: Any, kind: str, ifindex: int, handle: int, *, prio: int, protocol: int,
                  parent: int = PARENT_INGRESS, **extra: Any) -> None:
    """Delete one filter by (parent, prio, protocol, handle); NetlinkError is the caller's."""
    ipr.tc("del-filter", kind, ifindex, handle, parent=parent, prio=prio, protocol=protocol, **extra)
