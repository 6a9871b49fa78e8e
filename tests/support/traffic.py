"""Traffic for the test topologies: deterministic payloads, one TCP transfer between two
namespaces with a hook for "wait until offloaded", and polling."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass

from tests import netns


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


@dataclass
class Transfer:
    sent_sha: str
    received_sha: str
    received: int
    seconds: float


def tcp_transfer(server_ns: str, listen_addr: str, port: int, client_ns: str, connect_addr: str,
                 connect_port: int, data: bytes, *, upload: bool = True, pace: float = 0.0,
                 timeout: float = 60.0, on_connected=None, gate=None, gate_after: int = 65536,
                 source: str | None = None) -> Transfer:
    """Move ``data`` over one TCP connection: client -> server when upload, else server -> client.

    ``pace`` sleeps between 64 KiB chunks (to stretch a transfer over time);
    ``gate`` is called by the sender once ``gate_after`` bytes are sent (0: before any
    data) and before the rest, e.g. to wait until the connection is offloaded;
    ``on_connected`` runs in a thread of its own once the connection is up, while data flows;
    ``source`` is the client's address to connect from (default: the route's choice).
    """
    family = socket.AF_INET6 if ":" in listen_addr else socket.AF_INET
    ready = threading.Event()
    result: dict = {}

    def sender(sock):
        if gate is not None and gate_after == 0:
            gate()
        for off in range(0, len(data), 65536):
            sock.sendall(data[off:off + 65536])
            if gate is not None and gate_after and off < gate_after <= off + 65536:
                gate()
            if pace:
                time.sleep(pace)
        sock.shutdown(socket.SHUT_WR)

    def receiver(sock):
        h, n = hashlib.sha256(), 0
        sock.settimeout(timeout)
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    def server():
        try:
            with netns.inside(server_ns):
                ls = socket.socket(family, socket.SOCK_STREAM)
            with ls:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind((listen_addr, port))
                ls.listen(1)
                ls.settimeout(timeout)
                ready.set()
                conn, _ = ls.accept()
                with conn:
                    if upload:
                        result["rx"] = receiver(conn)
                    else:
                        sender(conn)
                        conn.settimeout(timeout)
                        conn.recv(1)  # wait for the client's close
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result["error"] = exc
            ready.set()

    th = threading.Thread(target=server, daemon=True)
    th.start()
    ready.wait(timeout)
    if "error" in result:
        raise result["error"]
    t0 = time.monotonic()
    with netns.inside(client_ns):
        cs = socket.socket(family, socket.SOCK_STREAM)
    with cs:
        cs.settimeout(timeout)
        if source is not None:
            cs.bind((source, 0))
        cs.connect((connect_addr, connect_port))
        if on_connected is not None:
            bg = threading.Thread(target=on_connected, daemon=True)
            bg.start()
        if upload:
            sender(cs)
            cs.recv(1)
        else:
            result["rx"] = receiver(cs)
    th.join(timeout)
    if "error" in result:
        raise result["error"]
    rx_sha, n = result["rx"]
    return Transfer(hashlib.sha256(data).hexdigest(), rx_sha, n, time.monotonic() - t0)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll predicate until it returns a truthy value or timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
