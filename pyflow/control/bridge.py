"""Which bridge port a MAC is behind, and how frames for it look on that port.

A route that leaves through a bridge (``br-lan``) names the bridge, but frames
leave through one of its ports: the one whose forwarding database (FDB) holds the
destination MAC. :class:`BridgePorts` answers that question for the path
resolver (``paths.plan_egress``) so that the fast path can send straight to the
port, bypassing the bridge, as the kernel flowtable does with
``dev_fill_forward_path()`` (``br_fill_forward_path``).

What it reads, all over plain rtnetlink on :mod:`pyflow.netlink.wire` (the hot
path has no pyroute2):

* the FDB entry: ``RTM_GETNEIGH`` of family ``AF_BRIDGE`` with ``NDA_LLADDR``,
  ``NDA_MASTER`` (the bridge) and, under VLAN filtering, ``NDA_VLAN``: the kernel
  answers with the one entry (``br_fdb_get``), its port in ``ndm_ifindex``;
* the bridge: ``RTM_GETLINK`` of the bridge (kind, ``IFLA_BR_VLAN_FILTERING``,
  ``IFLA_BR_VLAN_PROTOCOL``);
* the ports: one ``RTM_GETLINK`` dump of family ``AF_BRIDGE`` with
  ``IFLA_EXT_MASK`` = ``RTEXT_FILTER_BRVLAN``: every bridge port (and every bridge
  itself) with its master, up/carrier flags, MTU, link type, spanning-tree state
  and VLAN list (flags PVID / untagged per VLAN id).

VLAN filtering, as the bridge applies it to a frame the host sends through the
bridge device (``br_dev_xmit``): an untagged frame (``vid=None``) is given the
bridge's own PVID (no PVID: the bridge drops it); a tagged one (from a VLAN
device on the bridge, ``br-lan.10``) must be in the bridge's own VLAN list. The
FDB is looked up in that VLAN, and the port must be a member of it: it sends the
frame untagged where the VLAN is ``untagged`` on the port, tagged with the VLAN id
otherwise. Without VLAN filtering the FDB has no VLANs (vid 0) and a tagged frame
keeps its tag on every port.

Refusals (model.NoPath with a fixed code): a MAC that is the bridge's own or one
of its ports' (``bridge_local_mac``: the bridge delivers those to the host), a
port that is not forwarding in spanning tree (``bridge_port_blocked``), a port or
bridge outside the VLAN or a bridge without a PVID (``bridge_vlan_filtered``,
``bridge_no_pvid``), a device that is not a bridge (``not_a_bridge``), and the
generic ``device_gone``, ``device_down``, ``not_ethernet``, ``vlan_unsupported``.
A MAC the bridge has not learned (it floods such frames) is model.NotYet: the FDB
notification when it is learned is the cue to retry.

Caching: answers are kept per (bridge, MAC, VLAN) and dropped when the FDB entry
of that MAC changes port or goes away (``fdb`` changes of a private
:class:`pyflow.control.paths.PathWatcher`, drained at each call, as RtPaths does),
bridge and port facts on any link change (a port's STP state and VLAN list changes
are link notifications of family AF_BRIDGE). A notification is queued before the
command that caused it returns, so a call made after ``bridge fdb replace`` or a
learned move never answers from the old entry.

Not thread-safe: one per RtPaths, in the thread (and network namespace) that makes it.
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyflow.control import model as refusal
from pyflow.control.model import NoPath, NotYet
from pyflow.netlink.errors import error_text
from pyflow.netlink.sock import NetlinkSocket
from pyflow.netlink.uapi import (
    ARPHRD_ETHER,
    BR_STATE_FORWARDING,
    BRIDGE_VLAN_INFO_PVID,
    BRIDGE_VLAN_INFO_RANGE_BEGIN,
    BRIDGE_VLAN_INFO_RANGE_END,
    BRIDGE_VLAN_INFO_UNTAGGED,
    ETH_P_8021AD,
    ETH_P_8021Q,
    IFF_RUNNING,
    IFF_UP,
    IFLA_AF_SPEC,
    IFLA_BR_AGEING_TIME,
    IFLA_BR_VLAN_FILTERING,
    IFLA_BR_VLAN_PROTOCOL,
    IFLA_BRIDGE_VLAN_INFO,
    IFLA_BRPORT_STATE,
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_PROTINFO,
    NDA_CACHEINFO,
    NDA_LLADDR,
    NDA_MASTER,
    NDA_VLAN,
    NETLINK_ROUTE,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NLMSG_HDRLEN,
    NTF_EXT_LEARNED,
    NTF_MASTER,
    NTF_USE,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_REACHABLE,
    RTEXT_FILTER_BRVLAN,
    RTM_DELNEIGH,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
)
from pyflow.netlink.wire import BE16, U16, U32, Buffer, attrs, nested, nla, string, u8, value

AF_BRIDGE = int(socket.AF_BRIDGE)
REPLY_TIMEOUT = 1.0
ANSWER_CACHE_SIZE = 16384  # MACs remembered (a LAN's clients); past it the oldest are asked again

_NDMSG = struct.Struct("=BxxxiHBB")  # struct ndmsg
_IFINFO = struct.Struct("=BxHiII")  # struct ifinfomsg
_VLAN_INFO = struct.Struct("=HH")  # struct bridge_vlan_info: flags, vid
_LEN_TYPE = struct.Struct("=IH")
_CACHEINFO = struct.Struct("=IIII")  # struct nda_cacheinfo: confirmed, used, updated, refcnt (clock_t ago)
USER_HZ = 100  # the unit of clock_t in netlink (IFLA_BR_AGEING_TIME, nda_cacheinfo)
DEFAULT_AGEING_S = 300.0  # the bridge's default ageing time (BR_DEFAULT_AGEING_TIME)


@dataclass(frozen=True)
class BridgePort:
    """The port frames for one MAC leave a bridge on, and their tag there."""

    ifindex: int
    ifname: str
    vlan_tci: int | None  # the tag on the wire at that port (None: untagged)
    # the tag's protocol when tagged: the bridge's VLAN protocol (802.1Q or 802.1ad) when it
    # filters VLANs; 0 when it does not (the frame keeps the tag it entered the bridge with,
    # of the protocol the VLAN device above the bridge gave it)
    vlan_tpid: int = ETH_P_8021Q
    mtu: int = 0  # the port's MTU: frames larger than it would not leave it
    # the FDB entry the answer comes from (bridge ifindex, VLAN id: 0 without filtering), for
    # BridgePorts.refresh; not part of what frames look like, so not compared
    bridge: int = field(default=0, compare=False)
    fdb_vid: int = field(default=0, compare=False)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# ---------------------------------------------------------------------------
# Pure decoding: netlink messages -> values


@dataclass(frozen=True)
class FdbEntry:
    """One bridge FDB entry (an AF_BRIDGE RTM_NEWNEIGH / RTM_DELNEIGH)."""

    ifindex: int  # the port (the bridge itself for an entry of its own)
    master: int  # the bridge (0: not a bridge's entry, e.g. a port's own hardware list)
    mac: bytes
    vid: int  # 0 without VLAN filtering
    state: int  # NUD_PERMANENT: local (delivered to the host); NUD_NOARP static; else learned
    flags: int  # NTF_*
    updated_s: float | None = None  # seconds since the bridge last refreshed it (NDA_CACHEINFO)


def parse_fdb(data: Buffer) -> FdbEntry | None:
    """An AF_BRIDGE neighbour message as an FdbEntry; None when it is another family or
    carries no MAC."""
    length, mtype = _LEN_TYPE.unpack_from(data, 0)
    if mtype not in (RTM_NEWNEIGH, RTM_DELNEIGH):
        raise ValueError(f"not a neighbour message: nlmsg type {mtype}")
    family, ifindex, state, flags, _ntype = _NDMSG.unpack_from(data, NLMSG_HDRLEN)
    if family != AF_BRIDGE:
        return None
    a = attrs(data, NLMSG_HDRLEN + _NDMSG.size, min(length, len(data)))
    span = a.get(NDA_LLADDR)
    if span is None or span[1] - span[0] != 6:
        return None
    ci = a.get(NDA_CACHEINFO)
    updated = (_CACHEINFO.unpack_from(data, ci[0])[2] / USER_HZ
               if ci is not None and ci[1] - ci[0] >= _CACHEINFO.size else None)
    return FdbEntry(ifindex, value(data, a.get(NDA_MASTER), U32) or 0, bytes(data[span[0]:span[1]]),
                    value(data, a.get(NDA_VLAN), U16) or 0, state, flags, updated)


@dataclass(frozen=True)
class PortInfo:
    """A device as the AF_BRIDGE link dump shows it: a bridge port, or a bridge itself."""

    ifindex: int
    ifname: str
    master: int  # its bridge (a bridge names itself)
    arptype: int
    flags: int  # IFF_*
    mtu: int
    stp_state: int | None  # IFLA_BRPORT_STATE; None for a bridge itself
    vlans: Mapping[int, int] = field(default_factory=dict)  # VLAN id -> BRIDGE_VLAN_INFO_* flags

    @property
    def pvid(self) -> int | None:
        for vid, flags in self.vlans.items():
            if flags & BRIDGE_VLAN_INFO_PVID:
                return vid
        return None


def parse_vlans(data: Buffer, span: tuple[int, int] | None) -> dict[int, int]:
    """IFLA_AF_SPEC's IFLA_BRIDGE_VLAN_INFO entries: VLAN id -> flags (ranges expanded)."""
    out: dict[int, int] = {}
    if span is None:
        return out
    start = None
    pos, end = span
    while pos + 4 <= end:  # walked by hand: IFLA_BRIDGE_VLAN_INFO repeats, attrs() keeps the last
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4 or pos + alen > end:
            break
        if atype & NLA_TYPE_MASK == IFLA_BRIDGE_VLAN_INFO and alen >= 4 + _VLAN_INFO.size:
            flags, vid = _VLAN_INFO.unpack_from(data, pos + 4)
            if flags & BRIDGE_VLAN_INFO_RANGE_BEGIN:
                start = vid
            elif flags & BRIDGE_VLAN_INFO_RANGE_END and start is not None:
                for v in range(start, vid + 1):
                    out[v] = flags & ~(BRIDGE_VLAN_INFO_RANGE_BEGIN | BRIDGE_VLAN_INFO_RANGE_END)
                start = None
            elif 0 < vid < 4095:
                out[vid] = flags
        pos += (alen + 3) & ~3
    return out


def parse_port(data: Buffer, off: int, length: int) -> PortInfo:
    """One RTM_NEWLINK of family AF_BRIDGE (the bridge's view of a device) at data[off:]."""
    _fam, arptype, index, flags, _change = _IFINFO.unpack_from(data, off + NLMSG_HDRLEN)
    a = attrs(data, off + NLMSG_HDRLEN + _IFINFO.size, off + length)
    prot = a.get(IFLA_PROTINFO)
    state = u8(data, nested(data, prot).get(IFLA_BRPORT_STATE)) if prot is not None else None
    return PortInfo(index, string(data, a.get(IFLA_IFNAME)) or f"ifindex {index}",
                    value(data, a.get(IFLA_MASTER), U32) or 0, arptype, flags,
                    value(data, a.get(IFLA_MTU), U32) or 0, state, parse_vlans(data, a.get(IFLA_AF_SPEC)))


@dataclass(frozen=True)
class BridgeInfo:
    ifindex: int
    ifname: str
    vlan_filtering: bool
    vlan_protocol: int  # ETH_P_8021Q / ETH_P_8021AD
    ageing_s: float = DEFAULT_AGEING_S  # IFLA_BR_AGEING_TIME: learned entries not refreshed this long go


def parse_bridge(data: Buffer) -> BridgeInfo | None:
    """A bridge's RTM_NEWLINK (family AF_UNSPEC); None when the device is not a bridge."""
    length, _mtype = _LEN_TYPE.unpack_from(data, 0)
    _fam, _type, index, _flags, _change = _IFINFO.unpack_from(data, NLMSG_HDRLEN)
    a = attrs(data, NLMSG_HDRLEN + _IFINFO.size, min(length, len(data)))
    info = nested(data, a.get(IFLA_LINKINFO))
    if string(data, info.get(IFLA_INFO_KIND)) != "bridge":
        return None
    d = nested(data, info.get(IFLA_INFO_DATA))
    return BridgeInfo(index, string(data, a.get(IFLA_IFNAME)) or f"ifindex {index}",
                      bool(u8(data, d.get(IFLA_BR_VLAN_FILTERING))),
                      value(data, d.get(IFLA_BR_VLAN_PROTOCOL), BE16) or ETH_P_8021Q,
                      ageing / USER_HZ if (ageing := value(data, d.get(IFLA_BR_AGEING_TIME), U32)) is not None
                      else DEFAULT_AGEING_S)


def fdb_vid(bridge: BridgeInfo, own: PortInfo | None, vid: int | None) -> int:
    """The VLAN the bridge files a frame from the host under (0: no VLAN filtering)."""
    if vid is not None and not 0 < vid < 4095:
        raise NoPath(f"VLAN id {vid} on {bridge.ifname} is out of range", refusal.VLAN_UNSUPPORTED)
    if not bridge.vlan_filtering:
        return 0
    vlans = own.vlans if own is not None else {}
    if vid is None:
        pvid = own.pvid if own is not None else None
        if pvid is None:
            raise NoPath(f"bridge {bridge.ifname} filters VLANs and has no PVID of its own: it drops "
                         f"untagged frames from the host", refusal.BRIDGE_NO_PVID)
        return pvid
    if vid not in vlans:
        raise NoPath(f"bridge {bridge.ifname} is not a member of VLAN {vid}", refusal.BRIDGE_VLAN_FILTERED)
    return vid


def decide(bridge: BridgeInfo, ports: Mapping[int, PortInfo], entry: FdbEntry | None,
           mac: bytes, vid: int | None) -> BridgePort:
    """The port and tag for mac from the bridge's facts and the FDB entry (None: not learned)."""
    own = ports.get(bridge.ifindex)
    v = fdb_vid(bridge, own, vid)
    where = f"{mac_text(mac)} on {bridge.ifname}" + (f" VLAN {v}" if v else "")
    if entry is None:
        raise NotYet(f"{where} is not learned yet (the bridge floods it)")
    if entry.ifindex == bridge.ifindex or entry.state & NUD_PERMANENT:
        raise NoPath(f"{where} is the bridge's own address: the bridge delivers it to the host",
                     refusal.BRIDGE_LOCAL_MAC)
    port = ports.get(entry.ifindex)
    if port is None or port.master != bridge.ifindex:
        raise NoPath(f"{where} is learned on ifindex {entry.ifindex}, no longer a port of the bridge",
                     refusal.DEVICE_GONE)
    if port.arptype != ARPHRD_ETHER:
        raise NoPath(f"{where} is behind port {port.ifname}, which is not Ethernet (ARPHRD type "
                     f"{port.arptype})", refusal.NOT_ETHERNET)
    if not port.flags & IFF_UP or not port.flags & IFF_RUNNING:
        raise NoPath(f"{where} is behind port {port.ifname}, which is down or has no carrier",
                     refusal.DEVICE_DOWN)
    if port.stp_state is not None and port.stp_state != BR_STATE_FORWARDING:
        raise NoPath(f"{where} is behind port {port.ifname}, which is not forwarding (STP state "
                     f"{port.stp_state})", refusal.BRIDGE_PORT_BLOCKED)
    tpid = bridge.vlan_protocol
    if tpid not in (ETH_P_8021Q, ETH_P_8021AD):
        raise NoPath(f"bridge {bridge.ifname} uses VLAN protocol 0x{tpid:04x}", refusal.VLAN_UNSUPPORTED)
    if bridge.vlan_filtering:
        flags = port.vlans.get(v)
        if flags is None:
            raise NoPath(f"{where} is behind port {port.ifname}, which is not a member of VLAN {v}",
                         refusal.BRIDGE_VLAN_FILTERED)
        tci = None if flags & BRIDGE_VLAN_INFO_UNTAGGED else v
    else:
        tci = vid  # no filtering: a tagged frame keeps its tag on every port, protocol and all
        tpid = 0
    return BridgePort(port.ifindex, port.ifname, tci, tpid if tci is not None else ETH_P_8021Q, port.mtu,
                      bridge.ifindex, v)


# ---------------------------------------------------------------------------
# The resolver


class BridgePorts:
    """port_of(bridge, mac, vid) over rtnetlink, in the constructing thread's namespace."""

    def __init__(self, *, cache: bool = True, cache_size: int = ANSWER_CACHE_SIZE) -> None:
        from pyflow.control.paths import PathWatcher

        # first, so that no change between it and our first query is missed
        self._watch = PathWatcher(groups=(RTNLGRP_LINK, RTNLGRP_NEIGH))
        self._rt = NetlinkSocket(NETLINK_ROUTE)
        self._cache = cache
        self._max = cache_size
        # mac -> {(bridge, vid): answer}; an answer is a BridgePort or the exception to raise
        self._answers: dict[bytes, dict[tuple[int, int | None], BridgePort | Exception]] = {}
        self._bridges: dict[int, BridgeInfo | None] = {}
        self._ports: dict[int, PortInfo] | None = None
        self.lookups = 0  # FDB queries sent to the kernel
        # the learned entries answers were given from: (bridge, MAC, FDB VLAN) -> port, for
        # refresh (the entries offloaded flows use); newest last, at most cache_size
        self.used: dict[tuple[int, bytes, int], int] = {}

    def close(self) -> None:
        self._watch.close()
        self._rt.close()

    def __enter__(self) -> BridgePorts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._watch.fileno()

    def invalidate(self) -> None:
        self._answers.clear()
        self._bridges.clear()
        self._ports = None

    def _sync(self) -> None:
        for kind, _ifindex, addr in self._watch.poll(0):
            if kind == "fdb" and addr:
                self._answers.pop(bytes.fromhex(addr.split()[0].replace(":", "")), None)
            elif kind in ("link", "resync"):
                self.invalidate()

    def port_of(self, bridge_ifindex: int, mac: bytes, vid: int | None) -> BridgePort:
        """The port of bridge ``bridge_ifindex`` behind which ``mac`` is learned, for a frame
        the host sends through the bridge with tag ``vid`` (None: untagged). Raises NotYet
        (not learned) or NoPath (fixed code)."""
        if len(mac) != 6:
            raise ValueError(f"not an Ethernet address: {mac.hex()}")
        self._sync()
        per_mac = self._answers.get(mac)
        hit = per_mac.get((bridge_ifindex, vid)) if per_mac is not None else None
        if hit is None:
            try:
                hit = self._resolve(bridge_ifindex, mac, vid)
            except (NotYet, NoPath) as exc:
                hit = exc.with_traceback(None)
            if self._cache and not isinstance(hit, _Transient):
                if per_mac is None:
                    if len(self._answers) >= self._max:
                        del self._answers[next(iter(self._answers))]
                    per_mac = self._answers[mac] = {}
                per_mac[(bridge_ifindex, vid)] = hit
        if isinstance(hit, Exception):
            raise type(hit)(*hit.args)
        used = self.used
        key = (hit.bridge, mac, hit.fdb_vid)
        if used.get(key) != hit.ifindex:
            used.pop(key, None)
            if len(used) >= self._max:
                del used[next(iter(used))]
            used[key] = hit.ifindex
        return hit

    def ageing_s(self, bridge_ifindex: int) -> float:
        """The bridge's ageing time (IFLA_BR_AGEING_TIME, re-read after a link change).
        Raises NoPath when it is not a bridge (any more)."""
        self._sync()
        return self._bridge(bridge_ifindex).ageing_s

    def refresh(self, bridge_ifindex: int, mac: bytes, vid: int, port: int, fresh_s: float) -> str:
        """Keep the learned FDB entry (bridge, mac, vid) on ``port`` from ageing out, as a
        frame from mac arriving on that port would: the fast path carries those frames past
        the bridge, which no longer sees them. Unless the bridge refreshed the entry itself
        less than ``fresh_s`` ago. What happened, one word: ``refreshed``, ``fresh``,
        ``moved`` (now on another port), ``gone`` (not in the FDB), ``not_learned`` (a
        static, local or switch-learned entry: they do not age in the bridge), ``failed``.

        How (net/bridge/br_fdb.c): RTM_NEWNEIGH of family AF_BRIDGE on the port with
        NTF_MASTER (to the bridge's br_fdb_add) and NTF_USE is __br_fdb_add's NTF_USE branch:
        br_fdb_update(br, port, mac, vid), the learning a received frame does. It sets the
        entry's ``updated`` (what ageing reads) and leaves it dynamic: it is not made static
        or local (fdb_add_entry, which ``bridge fdb add/replace`` reaches, would), it still
        ages. It only marks the entry added_by_user, which no dump shows and which the
        bridge reads only to tell switchdev drivers at the entry's next change (a DSA switch
        then holds it in hardware until the bridge deletes it). Ports not learning (STP
        state, ``learning off``) ignore it. But br_fdb_update also moves an entry to the
        port named, or creates a missing one there: so the entry is read first
        (RTM_GETNEIGH) and refreshed only when it is still learned on ``port``.

        The remaining race: the client roams between that read and the refresh (a few
        microseconds), its first frame on the new port teaches the bridge the new port, and
        the refresh moves it back. The client's next frame on the new port misses the fast
        path (its key holds the old port), reaches the bridge and moves the entry to the new
        port again, which is the FDB change that rewrites the flows; meanwhile frames to it
        leave on the old port. The same happens when the entry ages out between the read and
        the refresh: it is learned again on the port just read, which the client was on.

        Under VLAN filtering the entry's VLAN is named (NDA_VLAN): without it the kernel
        updates the MAC in every VLAN of the port. Without filtering the entry is VLAN 0,
        which cannot be named; on kernels with bridge VLAN support the port keeps its default
        VLAN list even then, so br_fdb_add also learns the MAC in those VLANs (entries the
        bridge never looks up while not filtering; each ages out once the refreshes stop,
        and its arrival and departure are FDB changes that re-resolve this MAC's flows to
        the same port)."""
        try:
            bridge = self._bridge(bridge_ifindex)
        except _Transient:
            return "failed"
        except NoPath:
            return "gone"
        try:
            entry = self._fdb(bridge, mac, vid)
        except NoPath:
            return "failed"
        key = (bridge_ifindex, mac, vid)
        if entry is None or entry.ifindex != port:
            if self.used.get(key) == port:
                del self.used[key]  # learned again elsewhere, the next answer records it
            return "gone" if entry is None else "moved"
        if entry.state & (NUD_PERMANENT | NUD_NOARP) or entry.flags & NTF_EXT_LEARNED:
            return "not_learned"
        if entry.updated_s is not None and entry.updated_s < fresh_s:
            return "fresh"
        body = _NDMSG.pack(AF_BRIDGE, port, NUD_REACHABLE, NTF_USE | NTF_MASTER, 0) + nla(NDA_LLADDR, mac)
        if vid:
            body += nla(NDA_VLAN, U16.pack(vid))
        try:
            err = self._rt.ack(RTM_NEWNEIGH, 0, body, REPLY_TIMEOUT)
        except OSError:
            return "failed"
        return "failed" if err else "refreshed"

    def _resolve(self, br: int, mac: bytes, vid: int | None) -> BridgePort:
        bridge = self._bridge(br)
        ports = self._port_table()
        v = fdb_vid(bridge, ports.get(br), vid)
        entry = self._fdb(bridge, mac, v)
        if entry is not None and entry.ifindex != br and entry.ifindex not in ports:
            self._ports = None  # a port newer than our dump: read it again once
            ports = self._port_table()
        return decide(bridge, ports, entry, mac, vid)

    def _bridge(self, ifindex: int) -> BridgeInfo:
        if ifindex not in self._bridges:
            body = _IFINFO.pack(0, 0, ifindex, 0, 0)
            try:
                data = self._rt.request(RTM_GETLINK, 0, body, REPLY_TIMEOUT)
            except OSError as exc:
                if exc.errno != _errno.ENODEV:
                    raise _Transient(f"cannot read device ifindex {ifindex}: {error_text(exc.errno or 0)}",
                                     refusal.LOOKUP_FAILED) from None
                raise NoPath(f"no device with ifindex {ifindex}", refusal.DEVICE_GONE) from None
            info = parse_bridge(data) if data is not None else None
            if not self._cache:
                return self._bridge_or_refuse(ifindex, info)
            self._bridges[ifindex] = info
        return self._bridge_or_refuse(ifindex, self._bridges[ifindex])

    @staticmethod
    def _bridge_or_refuse(ifindex: int, info: BridgeInfo | None) -> BridgeInfo:
        if info is None:
            raise NoPath(f"ifindex {ifindex} is not a bridge", refusal.NOT_A_BRIDGE)
        return info

    def _port_table(self) -> dict[int, PortInfo]:
        if self._ports is not None:
            return self._ports
        body = _IFINFO.pack(AF_BRIDGE, 0, 0, 0, 0) + nla(IFLA_EXT_MASK, U32.pack(RTEXT_FILTER_BRVLAN))
        ports: dict[int, PortInfo] = {}
        try:
            for mtype, _flags, off, length in self._rt.dump(RTM_GETLINK, NLM_F_DUMP, body, REPLY_TIMEOUT):
                if mtype == RTM_NEWLINK:
                    p = parse_port(self._rt.buf, off, length)
                    ports[p.ifindex] = p
        except OSError as exc:
            raise _Transient(f"cannot read the bridge ports: {error_text(exc.errno or 0)}",
                             refusal.LOOKUP_FAILED) from None
        if self._cache:
            self._ports = ports
        return ports

    def _fdb(self, bridge: BridgeInfo, mac: bytes, vid: int) -> FdbEntry | None:
        self.lookups += 1
        body = (_NDMSG.pack(AF_BRIDGE, 0, 0, NTF_MASTER, 0) + nla(NDA_LLADDR, mac)
                + nla(NDA_MASTER, U32.pack(bridge.ifindex)))
        if vid:
            body += nla(NDA_VLAN, U16.pack(vid))
        try:
            data = self._rt.request(RTM_GETNEIGH, 0, body, REPLY_TIMEOUT)
        except OSError as exc:
            if exc.errno == _errno.ENOENT:
                return None
            raise _Transient(f"FDB lookup of {mac_text(mac)} on {bridge.ifname} failed: "
                             f"{error_text(exc.errno or 0)}", refusal.LOOKUP_FAILED) from None
        return parse_fdb(data) if data is not None else None


class _Transient(NoPath):
    """A lookup that failed for a reason other than the kernel's answer (timeout, ENOMEM):
    refused now, not remembered."""
