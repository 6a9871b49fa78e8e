"""ethtool over generic netlink: can a device run flower rules in hardware? Its
``hw-tc-offload`` feature says. Does it strip VLAN tags on receive? Its
``rx-vlan-hw-parse`` (802.1Q) and ``rx-vlan-stag-hw-parse`` (802.1ad) features say.

Read over ethtool netlink (ETHTOOL_MSG_FEATURES_GET, the genetlink family
"ethtool"), the same source as ``ethtool -k``: NETIF_F_HW_TC is listed under
``hw`` when the driver can switch it on and under ``active`` when it is on.
A device whose driver has flower offload (mlx5, mtk_eth_soc ...) but the feature
off accepts no skip_sw rule, so "can offload" means *active*.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic.ethtool import ethtoolbitset, ethtoolheader

from pyflow.errors import DeviceError
from pyflow.netlink.uapi import ETHTOOL_MSG_FEATURES_GET

ETHTOOL_GENL_NAME = "ethtool"
HW_TC_OFFLOAD = "hw-tc-offload"
# NETIF_F_HW_VLAN_CTAG_RX / NETIF_F_HW_VLAN_STAG_RX: the tag is taken out of the frame
# into the descriptor (skb metadata), so XDP, which sees only frame data, never sees it
RX_VLAN_STRIP = {"rx-vlan-hw-parse": "rxvlan", "rx-vlan-stag-hw-parse": "rx-vlan-stag-hw-parse"}


class _features_msg(genlmsg):
    nla_map = (
        ("ETHTOOL_A_FEATURES_UNSPEC", "none"),
        ("ETHTOOL_A_FEATURES_HEADER", "ethtoolheader"),
        ("ETHTOOL_A_FEATURES_HW", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_WANTED", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_ACTIVE", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_NOCHANGE", "ethtoolbitset"),
    )
    ethtoolheader = ethtoolheader
    ethtoolbitset = ethtoolbitset


@dataclass(frozen=True)
class TcOffload:
    ifname: str
    supported: bool  # the driver can switch hw-tc-offload on (ethtool: not "[fixed]")
    active: bool     # it is on: flower rules with skip_sw are accepted

    def why_not(self) -> str:
        return "hw-tc-offload is off" if self.supported else "hw-tc-offload is unsupported"


def _bit_names(bitset, *, set_only: bool) -> set[str]:
    """Names of the bits a verbose (non-compact) bitset lists; with set_only, those whose
    value flag is set (a bitset with a mask lists every bit of the mask)."""
    names: set[str] = set()
    if bitset is None:
        return names
    bits = bitset.get_attr("ETHTOOL_A_BITSET_BITS")
    if bits is None:
        return names
    nomask = bitset.get_attr("ETHTOOL_A_BITSET_NOMASK") is not None
    for bit in bits.get_attrs("ETHTOOL_A_BITSET_BITS_BIT"):
        if set_only and not nomask and bit.get_attr("ETHTOOL_A_BITSET_BIT_VALUE") is None:
            continue
        names.add(bit.get_attr("ETHTOOL_A_BITSET_BIT_NAME"))
    return names


def features(ifname: str) -> tuple[set[str], set[str]]:
    """(changeable or active, active) feature names of ifname as ``ethtool -k`` lists them,
    in the caller's network namespace; DeviceError if unreadable."""
    sock = GenericNetlinkSocket()
    try:
        sock.bind(ETHTOOL_GENL_NAME, _features_msg)
        msg = _features_msg()
        msg["cmd"] = ETHTOOL_MSG_FEATURES_GET
        msg["version"] = 1
        msg["attrs"].append(("ETHTOOL_A_FEATURES_HEADER", {"attrs": [["ETHTOOL_A_HEADER_DEV_NAME", ifname]]}))
        replies = list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST))
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            raise DeviceError(f"no such device: {ifname}") from None
        raise DeviceError(f"{ifname}: cannot read device features over ethtool netlink: {exc}") from None
    finally:
        sock.close()
    if not replies:
        raise DeviceError(f"{ifname}: ethtool netlink returned no features")
    reply = replies[0]
    hw = _bit_names(reply.get_attr("ETHTOOL_A_FEATURES_HW"), set_only=True)
    active = _bit_names(reply.get_attr("ETHTOOL_A_FEATURES_ACTIVE"), set_only=True)
    return hw | active, active


def tc_offload(ifname: str) -> TcOffload:
    """hw-tc-offload of ifname, in the caller's network namespace; DeviceError if unreadable."""
    known, active = features(ifname)
    return TcOffload(ifname, HW_TC_OFFLOAD in known, HW_TC_OFFLOAD in active)


def vlan_rx_strip(ifname: str) -> tuple[str, ...]:
    """The VLAN-stripping features that are on for ifname (subset of RX_VLAN_STRIP's
    names, in its order); DeviceError if unreadable."""
    _, active = features(ifname)
    return tuple(name for name in RX_VLAN_STRIP if name in active)
