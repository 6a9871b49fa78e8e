"""Facts about a network device that decide how the datapath attaches to it.

Everything is read through rtnetlink on the caller's socket, so it is correct
in whatever network namespace that socket lives in (/sys/class/net is not: it
shows the namespace that mounted sysfs). The one sysfs read, the driver name,
goes through /sys/bus/<bus>/devices/<parent>/driver, which names the bus
device and so does not depend on the namespace.

The ``auto`` attach rule, kept deliberately simple:

* a device with a link kind (veth, bridge, bond, vlan, macvlan, ifb, tun ...)
  is virtual: its packets arrive as skbs, so XDP must copy each one into an
  XDP buffer, which measured slower than the kernel path on veth while a TC
  ingress redirect matched it (docs/testing.md) -> ``tc``;
* a device with a parent bus device (PCI, virtio, platform ...) is a NIC whose
  driver fills DMA buffers that native XDP reads in place -> ``native``, and if
  the driver turns out to have no native XDP the loader falls back to ``tc``
  and says so;
* anything else (loopback, odd software devices) -> ``tc``.

Whatever the rule says, a device with VLAN upper devices whose NIC strips VLAN
tags on receive (rx-vlan-hw-parse / rx-vlan-stag-hw-parse) gets no XDP: the tag
goes into the descriptor, XDP sees the frame as untagged and would forward a
VLAN host's packet as if it came from the untagged LAN. TC reads the stripped
tag from skb metadata, so ``tc`` is safe (pyflow.datapath.attach.switch).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pyflow.errors import DeviceError

MODES = ("native", "generic", "tc")
ALL_MODES = (*MODES, "hw", "auto")


@dataclass(frozen=True)
class DeviceFacts:
    ifname: str
    ifindex: int
    kind: str | None          # IFLA_INFO_KIND: set for virtual devices
    parent_bus: str | None    # IFLA_PARENT_DEV_BUS_NAME: "pci", "virtio" ... for NICs
    parent_dev: str | None    # IFLA_PARENT_DEV_NAME: "0000:03:00.0", "virtio2" ...
    driver: str | None
    mac: str | None
    mtu: int
    xdp_mode: str | None      # None, "xdp" (native), "xdpgeneric", "xdpoffload", "xdpmulti"
    xdp_prog_id: int          # 0 = none
    # read only where an attach needs them (read_vlan_facts): a link dump and an
    # ethtool request are too dear for every facts read
    vlan_uppers: tuple[tuple[str, str], ...] = ()  # (name, "802.1Q" | "802.1ad") on top of this
    vlan_rx_strip: tuple[str, ...] = ()  # the ethtool rx VLAN strip features that are on

    def vlan_hazard(self) -> str | None:
        """Why XDP would misread this device's tagged frames (VLAN uppers and tag stripping
        on), or None. Any stripping counts, not only the uppers' protocol: a port with a
        VLAN upper is on a trunk, and a tag of either kind stripped is one XDP cannot see."""
        if not self.vlan_uppers or not self.vlan_rx_strip:
            return None
        uppers = ", ".join(f"{name} ({proto})" for name, proto in self.vlan_uppers)
        strip = ", ".join(self.vlan_rx_strip)
        state = f"unreadable, taken as on ({strip})" if strip.startswith("unknown") else f"on ({strip})"
        return (f"VLAN upper(s) {uppers} and rx VLAN offload {state}: "
                f"the NIC strips the tags before XDP, which would take tagged frames for untagged ones")


def _driver(bus: str | None, dev: str | None) -> str | None:
    if not bus or not dev:
        return None
    link = f"/sys/bus/{bus}/devices/{dev}/driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def _xdp_state(msg) -> tuple[str | None, int]:
    xdp = msg.get_attr("IFLA_XDP")
    if xdp is None:
        return None, 0
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return mode, prog_id


def facts_from_msg(msg) -> DeviceFacts:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    bus = msg.get_attr("IFLA_PARENT_DEV_BUS_NAME")
    dev = msg.get_attr("IFLA_PARENT_DEV_NAME")
    mode, prog_id = _xdp_state(msg)
    return DeviceFacts(
        ifname=msg.get_attr("IFLA_IFNAME"),
        ifindex=msg["index"],
        kind=kind,
        parent_bus=bus,
        parent_dev=dev,
        driver=_driver(bus, dev) or (kind if kind else None),
        mac=msg.get_attr("IFLA_ADDRESS"),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        xdp_mode=mode,
        xdp_prog_id=prog_id,
    )


def read_facts(ipr, ifname: str | None = None, *, ifindex: int | None = None) -> DeviceFacts:
    """Facts of one device by name or index; DeviceError("no such device: X") if absent."""
    from pyroute2.netlink.exceptions import NetlinkError

    what = ifname if ifname is not None else f"ifindex {ifindex}"
    try:
        if ifname is not None:
            msgs = ipr.link("get", ifname=ifname)
        else:
            msgs = ipr.link("get", index=ifindex)
    except NetlinkError as exc:
        if exc.code == 19:  # ENODEV
            raise DeviceError(f"no such device: {what}") from None
        raise DeviceError(f"cannot read device {what}: {exc.args[-1]}") from None
    if not msgs:
        raise DeviceError(f"no such device: {what}")
    return facts_from_msg(msgs[0])


VLAN_PROTOCOLS = {0x8100: "802.1Q", 0x88A8: "802.1ad"}


def vlan_uppers(ipr, ifindex: int) -> tuple[tuple[str, str], ...]:
    """VLAN devices (802.1Q and 802.1ad) in this namespace whose lower device is ifindex.
    IFLA_LINK names the lower device; with IFLA_LINK_NETNSID set it is an index in another
    namespace, not ours. (A VLAN device moved to another namespace is not seen from here.)"""
    found = []
    for msg in ipr.link("dump"):
        linkinfo = msg.get_attr("IFLA_LINKINFO")
        if linkinfo is None or linkinfo.get_attr("IFLA_INFO_KIND") != "vlan":
            continue
        if msg.get_attr("IFLA_LINK") != ifindex or msg.get_attr("IFLA_LINK_NETNSID") is not None:
            continue
        data = linkinfo.get_attr("IFLA_INFO_DATA")
        proto = data.get_attr("IFLA_VLAN_PROTOCOL") if data is not None else None
        found.append((msg.get_attr("IFLA_IFNAME"), VLAN_PROTOCOLS.get(proto or 0x8100, hex(proto or 0))))
    return tuple(sorted(found))


def read_vlan_facts(ipr, facts: DeviceFacts) -> DeviceFacts:
    """facts with vlan_uppers and vlan_rx_strip filled in. Features are read only when
    there are uppers; unreadable features count as stripping (the safe side: tc)."""
    from pyflow.netlink import ethtool

    uppers = vlan_uppers(ipr, facts.ifindex)
    if not uppers:
        return dataclasses.replace(facts, vlan_uppers=(), vlan_rx_strip=())
    try:
        strip = ethtool.vlan_rx_strip(facts.ifname)
    except DeviceError as exc:
        strip = (f"unknown: {exc}",)
    return dataclasses.replace(facts, vlan_uppers=uppers, vlan_rx_strip=strip)


def choose_mode(facts: DeviceFacts) -> tuple[str, str]:
    """The ``auto`` rule (module docstring): (mode, one-line reason)."""
    if facts.kind:
        return "tc", (f"{facts.kind} is a virtual device: packets arrive as skbs that XDP "
                      f"would copy, TC ingress forwards them without the copy")
    if facts.parent_bus:
        drv = facts.driver or "unknown driver"
        return "native", (f"NIC on {facts.parent_bus} bus ({drv}): native XDP reads the "
                          f"driver's DMA buffers before any skb is built")
    return "tc", "software device without a bus device behind it: TC ingress"
