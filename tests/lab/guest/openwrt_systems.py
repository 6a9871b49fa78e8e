"""The two offload systems on the OpenWrt-shaped router (openwrt.py), one interface for both,
and the traffic the scenarios move through them.

- :class:`KernelFlowtable`: the kernel's nf flowtable as fw4 configures it; a connection is
  offloaded when conntrack lists it with [OFFLOAD].
- :class:`PyflowDaemon`: pyflowd in the router's namespace managing the real ports (lan1,
  lan2, wan; the bridge and the PPPoE and VLAN devices above them are resolved by pyflow);
  a connection is offloaded when ``flows`` on its control socket lists it.

Either way the judge of what was offloaded is the router's forward chain: the bytes its
counters saw during a transfer (the slow path) against the bytes moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from pyflow.cli.main import CtlError, request
from tests import netns
from tests.daemon.process import Pyflowd
from tests.lab.guest.openwrt import LAN_PORTS, WAN, OpenWrt
from tests.pins import remove_pin_dir
from tests.support.traffic import wait_for


class KernelFlowtable:
    name = "nf_flowtable"

    def __init__(self, topo: OpenWrt):
        self.topo = topo
        topo.kernel_flowtable()

    def _entry(self, family: int, proto: str, port: int) -> str:
        cmd = ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", proto, "--dport", str(port)]
        return self.topo.sh("rt", cmd, check=False).stdout

    def offloaded(self, family: int, proto: str, port: int) -> bool:
        return "[OFFLOAD]" in self._entry(family, proto, port)

    def torn_down(self, family: int, proto: str, port: int) -> bool:
        entry = self._entry(family, proto, port)
        return bool(entry) and "[OFFLOAD]" not in entry

    def conntrack(self, family: int, proto: str, port: int) -> str:
        return self._entry(family, proto, port)

    def close(self) -> None:
        pass


class PyflowDaemon:
    name = "pyflow"
    DEVICES = (*LAN_PORTS, WAN)

    def __init__(self, topo: OpenWrt, workdir: Path):
        self.topo = topo
        # tests/daemon/process.py runs pyflowd in "r1" of its topology: the router here
        self.daemon = Pyflowd(types.SimpleNamespace(r1=topo.rt), workdir,
                              devices=tuple((d, "auto") for d in self.DEVICES))
        t0 = time.monotonic()
        try:
            self.daemon.start(timeout=180)
        except BaseException:
            self.close()
            raise
        self.start_s = time.monotonic() - t0

    def _flows(self, proto: str, port: int) -> list[dict]:
        try:
            return request(self.daemon.socket, "flows", {"port": port, "proto": proto}, timeout=20)["flows"]
        except CtlError:
            return []

    def offloaded(self, family: int, proto: str, port: int) -> bool:
        return bool(self._flows(proto, port))

    def torn_down(self, family: int, proto: str, port: int) -> bool:
        return not self._flows(proto, port)

    def conntrack(self, family: int, proto: str, port: int) -> str:
        cmd = ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", proto, "--dport", str(port)]
        return self.topo.sh("rt", cmd, check=False).stdout

    def stats(self) -> dict:
        try:
            return request(self.daemon.socket, "stats", timeout=20)
        except CtlError as exc:
            return {"error": str(exc)}

    def close(self) -> None:
        self.daemon.kill()
        for dev in self.DEVICES:
            self.topo.sh("rt", f"ip link set dev {dev} xdpgeneric off", check=False)
            self.topo.sh("rt", f"tc qdisc del dev {dev} clsact", check=False)
        remove_pin_dir(self.daemon.bpffs)


# ---- UDP -----------------------------------------------------------------------------------

@dataclass
class UdpResult:
    sent_sha: str
    received_sha: str  # what the server got, in sequence order
    echoed_sha: str  # what came back to the client, in sequence order
    received: int
    retransmits: int
    seconds: float
    errors: list[str] = field(default_factory=list)


_SEQ = struct.Struct("!I")
_END = 0xFFFFFFFF


def udp_transfer(server_ns: str, listen_addr: str, port: int, client_ns: str, data: bytes, *,
                 chunk: int = 1200, window: int = 16, gate=None, timeout: float = 60.0) -> UdpResult:
    """``data`` from client to server in datagrams of ``chunk`` bytes, each echoed back: both
    directions carry the bulk. Sent in windows of ``window`` datagrams, each window resent
    (only what was not echoed) until it is complete, so a datagram the network dropped is
    counted, not fatal, and the result is exact when both hashes match. ``gate`` is called
    once the first window has come back (the connection is established both ways)."""
    family = socket.AF_INET6 if ":" in listen_addr else socket.AF_INET
    with netns.inside(server_ns):
        srv = socket.socket(family, socket.SOCK_DGRAM)
    srv.bind((listen_addr, port))
    srv.settimeout(1.0)
    got: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[str] = []

    def serve():
        while not stop.is_set():
            try:
                dgram, peer = srv.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError as exc:
                errors.append(f"server: {exc}")
                return
            seq = _SEQ.unpack_from(dgram)[0]
            if seq != _END:
                got[seq] = dgram[_SEQ.size:]
            srv.sendto(dgram, peer)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    echoed: dict[int, bytes] = {}
    retransmits = 0
    t0 = time.monotonic()
    deadline = t0 + timeout
    with netns.inside(client_ns):
        cl = socket.socket(family, socket.SOCK_DGRAM)
    try:
        cl.connect((listen_addr, port))
        cl.settimeout(0.5)
        for first in range(0, len(pieces), window):
            todo = set(range(first, min(first + window, len(pieces))))
            tries = 0
            while todo:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"UDP transfer on port {port}: {len(todo)} datagrams never echoed")
                retransmits += len(todo) if tries else 0
                tries += 1
                for seq in sorted(todo):
                    cl.send(_SEQ.pack(seq) + pieces[seq])
                with contextlib.suppress(TimeoutError):
                    while todo:
                        dgram = cl.recv(65535)
                        seq = _SEQ.unpack_from(dgram)[0]
                        echoed[seq] = dgram[_SEQ.size:]
                        todo.discard(seq)
            if first == 0 and gate is not None:
                gate()
    finally:
        cl.close()
        stop.set()
        th.join(5)
        srv.close()

    def joined(parts: dict[int, bytes]) -> str:
        return hashlib.sha256(b"".join(parts.get(i, b"") for i in range(len(pieces)))).hexdigest()

    return UdpResult(sent_sha=hashlib.sha256(data).hexdigest(), received_sha=joined(got),
                     echoed_sha=joined(echoed),
                     received=sum(len(p) for p in got.values()), retransmits=retransmits,
                     seconds=time.monotonic() - t0, errors=errors)


def wait_offloaded(system, family: int, proto: str, port: int, timeout: float) -> bool:
    return bool(wait_for(lambda: system.offloaded(family, proto, port), timeout, 0.2))
