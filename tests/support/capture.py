"""Frames captured on a device in a namespace, and checks of what was captured."""

from __future__ import annotations

import socket
import threading
import time

from tests import netns


class Capture:
    """Frames of one TCP destination port seen on a device in a namespace (AF_PACKET), with
    arrival times. The reader only stores; parsing happens afterwards, so it keeps up."""

    SO_RCVBUFFORCE = 33

    def __init__(self, ns: str, ifname: str, port: int):
        with netns.inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_RCVBUFFORCE, 64 << 20)
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.port = port
        self._raw: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING:  # not the server's own ACKs
                self._raw.append((time.monotonic(), frame))

    def stop(self) -> list[tuple[float, bytes]]:
        """Stop and return (time, frame) of the TCP frames to the port."""
        from scapy.layers.inet import TCP
        from scapy.layers.l2 import Ether

        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        out = []
        for t, frame in self._raw:
            pkt = Ether(frame)
            if TCP in pkt and pkt[TCP].dport == self.port:
                out.append((t, frame))
        return out


def checksums_valid(frame: bytes) -> bool:
    """True if a captured IPv4/TCP frame's IP and TCP checksums are what scapy computes afresh."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    ip = pkt[IP]
    fresh = IP(bytes(ip))
    del fresh.chksum
    del fresh[TCP].chksum
    rebuilt = IP(bytes(fresh))
    return rebuilt.chksum == ip.chksum and rebuilt[TCP].chksum == ip[TCP].chksum
