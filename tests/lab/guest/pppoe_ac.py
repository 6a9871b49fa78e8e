"""The ISP's end of the lab's PPPoE sessions, with the session data in the kernel.

Debian builds pppoe-server without kernel mode: every session frame then passes through a
user-space program and a pty. Under emulation that relay falls far behind during a bulk
transfer, and under a download it dies (the ISP's pppd logs "Modem hangup"), ending the
session in the middle of a test, whichever system forwards the traffic. This concentrator
answers the discovery stage itself (PADI -> PADO, PADR -> PADS, PADT ends a session) from a
thread inside the ISP's namespace, and for each session starts pppd on the kernel's PPPoE
channel attached to that session (the rp-pppoe plugin's ``rp_pppoe_sess sid:mac``): both ends
of every session run in the kernel, as in a real concentrator's data plane.

Session ids count up from 1, so a re-dial always gets a new one.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests import netns

ETH_P_PPP_DISC = 0x8863
PADI, PADO, PADR, PADS, PADT = 0x09, 0x07, 0x19, 0x65, 0xA7
TAG_END, TAG_SERVICE_NAME, TAG_AC_NAME, TAG_HOST_UNIQ = 0x0000, 0x0101, 0x0102, 0x0103
TAG_RELAY_SESSION_ID = 0x0110
ECHOED_TAGS = (TAG_SERVICE_NAME, TAG_HOST_UNIQ, TAG_RELAY_SESSION_ID)  # RFC 2516: a reply repeats these
HEADER = struct.Struct("!6s6sHBBHH")  # Ethernet (dst, src, type), PPPoE (ver/type, code, session, length)


def parse(frame: bytes) -> tuple[str, int, int, list[tuple[int, bytes]]] | None:
    """(source MAC, code, session id, tags) of a discovery frame, or None if it is not one."""
    if len(frame) < HEADER.size:
        return None
    _dst, src, etype, vertype, code, sid, length = HEADER.unpack_from(frame)
    if etype != ETH_P_PPP_DISC or vertype != 0x11 or HEADER.size + length > len(frame):
        return None
    tags, off, end = [], HEADER.size, HEADER.size + length
    while off + 4 <= end:
        ttype, tlen = struct.unpack_from("!HH", frame, off)
        if ttype == TAG_END or off + 4 + tlen > end:
            break
        tags.append((ttype, frame[off + 4:off + 4 + tlen]))
        off += 4 + tlen
    return src.hex(":"), code, sid, tags


def build(dst: str, src: str, code: int, sid: int, tags: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in tags)
    return HEADER.pack(bytes.fromhex(dst.replace(":", "")), bytes.fromhex(src.replace(":", "")),
                       ETH_P_PPP_DISC, 0x11, code, sid, len(body)) + body


class AccessConcentrator:
    """Discovery on ``ifname`` in namespace ``ns``; ``start_session(sid, peer_mac)`` starts
    the ISP's pppd for a new session (its Popen is kept and ended with the session)."""

    def __init__(self, ns: str, ifname: str, start_session: Callable[[int, str], subprocess.Popen],
                 name: str = "pft-isp"):
        self.ns, self.ifname, self.name = ns, ifname, name
        self.start_session = start_session
        self.sessions: dict[int, subprocess.Popen] = {}
        self.peers: dict[str, tuple[int, float]] = {}  # peer MAC -> (its session, when started)
        self.errors: list[str] = []
        self._next_sid = 1
        self._stop = threading.Event()
        with netns.inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PPP_DISC))
        self.sock.bind((ifname, ETH_P_PPP_DISC))
        self.sock.settimeout(0.2)
        self.mac = self.sock.getsockname()[4].hex(":")
        self._thread = threading.Thread(target=self._serve, name=f"{name}-discovery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stop.is_set():
                    self.errors.append(repr(exc))
                return
            try:
                self._answer(frame)
            except Exception as exc:  # noqa: BLE001 - kept for the test's report; the next frame may do
                self.errors.append(repr(exc))

    def _answer(self, frame: bytes) -> None:
        found = parse(frame)
        if found is None:
            return
        peer, code, sid, tags = found
        echoed = [(t, v) for t, v in tags if t in ECHOED_TAGS]
        if code == PADI:
            self.sock.send(build(peer, self.mac, PADO, 0, [(TAG_AC_NAME, self.name.encode()), *echoed]))
        elif code == PADR:
            sid = self._session_for(peer)
            self.sock.send(build(peer, self.mac, PADS, sid, echoed))
        elif code == PADT:
            self.end(sid)

    def _session_for(self, peer: str) -> int:
        """The session for a PADR: a new one, unless ``peer`` asked again within a few seconds
        for one that is still starting (its PADS was late, not lost: same id again). Any
        older session of the peer ends: the peer has started over."""
        live = self.peers.get(peer)
        if live is not None:
            sid, since = live
            if self.sessions[sid].poll() is None and time.monotonic() - since < 10:
                return sid
            self.end(sid)
        sid, self._next_sid = self._next_sid, self._next_sid + 1
        self.sessions[sid] = self.start_session(sid, peer)
        self.peers[peer] = (sid, time.monotonic())
        self._wait_attached(sid)
        return sid

    def _wait_attached(self, sid: int, timeout: float = 10.0) -> None:
        """Until the ISP's pppd has its PPPoE socket on the session, so that the router's first
        LCP frame after PADS finds it (a miss costs a 3 s LCP restart)."""
        wire = f"{socket.htons(sid):08X}"  # /proc/net/pppoe prints the id as it is on the wire
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.sessions[sid].poll() is None:
            with netns.inside(self.ns), open("/proc/thread-self/net/pppoe") as f:
                if any(line.split()[:1] == [wire] for line in f.read().splitlines()[1:]):
                    return
            time.sleep(0.05)

    def end(self, sid: int) -> None:
        proc = self.sessions.pop(sid, None)
        self.peers = {mac: live for mac, live in self.peers.items() if live[0] != sid}
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for sid in list(self.sessions):
            self.end(sid)


def isp_pppd(ns_cmd: list[str], ifname: str, options: list[str],
             log: Path) -> Callable[[int, str], subprocess.Popen]:
    """start_session for AccessConcentrator: pppd in the foreground on the kernel's PPPoE
    channel of session ``sid`` with ``peer_mac``, its output appended to ``log``."""

    def start(sid: int, peer_mac: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*ns_cmd, "pppd", "nodetach", "plugin", "rp-pppoe.so", "rp_pppoe_sess", f"{sid}:{peer_mac}",
                 f"nic-{ifname}", *options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    return start
