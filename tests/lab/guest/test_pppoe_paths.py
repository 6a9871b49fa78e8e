"""The path resolver on a real PPPoE session (the OpenWrt-shaped router of openwrt.py: pppd's
kernel PPPoE over wan.7 to the ISP's concentrator): the session id, concentrator MAC, session device
and MTU it finds are the ones on the wire, read independently from a frame the ISP's end
receives; and after a re-dial it answers with the new session, never the old one."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from pyflow.control import model
from pyflow.control.paths import RtPaths
from tests import netns
from tests.lab.guest.lab import lab_log
from tests.lab.guest.openwrt import ISP_VLAN, PPP, PPP_MTU, V4, WAN, WAN_VID, WAN_VLAN, lab_openwrt

pytestmark = pytest.mark.root

ETH_P_PPP_SES = 0x8864


@pytest.fixture(scope="module")
def topo():
    with lab_openwrt("pppoe paths") as t:
        yield t


def _mac(topo, role: str, dev: str) -> bytes:
    info = json.loads(topo.sh(role, ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]
    return bytes.fromhex(info["address"].replace(":", ""))


def _ifindex(topo, role: str, dev: str) -> int:
    return int(json.loads(topo.sh(role, ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["ifindex"])


def _wire_session(topo) -> tuple[int, bytes, bytes]:
    """(session id, destination MAC, source MAC) of a PPPoE session frame the ISP's VLAN
    device receives from the router (a ping from the router makes one)."""
    with netns.inside(topo.isp):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PPP_SES))
    try:
        sock.bind((ISP_VLAN, ETH_P_PPP_SES))
        sock.settimeout(1.0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            topo.sh("rt", ["ping", "-c", "1", "-W", "1", V4["isp_ppp"]], check=False)
            try:
                frame, (_ifname, _proto, ptype, *_rest) = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if ptype == socket.PACKET_OUTGOING or len(frame) < 22:
                continue
            _ver_type, code, sid = struct.unpack_from("!BBH", frame, 14)
            if code == 0:  # session data, not discovery
                return sid, frame[0:6], frame[6:12]
        raise AssertionError("no PPPoE session frame reached the ISP's end")
    finally:
        sock.close()


def _resolve(rt: RtPaths) -> model.Egress:
    """A LAN client's packet to the internet host, arriving where the client lives (br-lan)."""
    lan = rt.device_of(socket.AF_INET, V4["c1"], mark=0)
    return rt.egress(socket.AF_INET, V4["c1"], V4["inet"], iif=lan, mark=0)


def test_the_resolver_finds_the_session_on_the_wire_and_follows_a_redial(topo):
    sid, dst, src = _wire_session(topo)
    conc, wan7_mac = _mac(topo, "isp", ISP_VLAN), _mac(topo, "rt", WAN_VLAN)
    assert (dst, src) == (conc, wan7_mac)
    with netns.inside(topo.rt):
        rt = RtPaths()
    try:
        with netns.inside(topo.rt):
            eg = _resolve(rt)
            ppp, wan7, wan = (_ifindex(topo, "rt", d) for d in (PPP, WAN_VLAN, WAN))
            assert [layer.ifindex for layer in eg.layers] == [ppp, wan7, wan]
            assert (eg.ifindex, eg.mtu, eg.ppp_ifindex) == (ppp, PPP_MTU, ppp)
            assert (eg.dmac, eg.smac) == (conc, wan7_mac)
            at_wan = model.egress_at(eg, eg.layers[-1])
            assert (at_wan.ifindex, at_wan.vlan_outer_tci, at_wan.pppoe_sid) == (wan, WAN_VID, sid)
            assert model.egress_at(eg, eg.layers[1]).pppoe_sid == sid
            lab_log(f"pppoe paths: session {sid:#06x} via {WAN_VLAN} to {conc.hex(':')}, MTU {eg.mtu}")

        old, new = topo.redial()
        assert new.sid != old.sid
        new_sid, dst, _src = _wire_session(topo)
        assert (new_sid, dst) == (new.sid, conc)
        with netns.inside(topo.rt):
            eg = _resolve(rt)  # the same resolver: its caches saw the re-dial's link changes
            ppp = _ifindex(topo, "rt", PPP)
            assert eg.ppp_ifindex == ppp
            assert model.egress_at(eg, eg.layers[-1]).pppoe_sid == new_sid != sid
    finally:
        rt.close()
