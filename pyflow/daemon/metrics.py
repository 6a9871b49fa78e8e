"""Prometheus metrics: every value from the stats snapshot the control loop keeps.

Each metric is declared once, in ``METRICS``: its name, type, help and where its value
comes from in the stats snapshot (:class:`pyflow.daemon.stats.Stats`, taken inside the
control loop at every keep-alive tick; ``pyflowctl stats`` answers from the same type).
A scrape reads the last kept snapshot and never enters the loop: looped scrapes cannot
delay conntrack events, and a scrape is at most one keep-alive period stale. Names carry the prefix
``pyflow_`` and base units; counters get ``_total`` from the client; no per-flow labels.
The registry is a parameter so tests and embedders can use their own. The list of
metrics is in the README ("Running pyflowd").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyflow import __version__
from pyflow.control.stats import Latency
from pyflow.daemon.config import parse_address
from pyflow.daemon.stats import Stats
from pyflow.errors import PyflowError

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_FAMILY = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily}

# A metric's value: one number, samples by label values, or a histogram's state
Value = float | Mapping[tuple[str, ...], float] | Latency


@dataclass(frozen=True)
class MetricDef:
    name: str  # without _total: the client adds it to counters
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    help: str
    value: Callable[[Stats], Value]
    labels: tuple[str, ...] = ()


def _by(values: Mapping[str, int]) -> dict[tuple[str, ...], float]:
    """Samples labelled by the keys of ``values`` (one label)."""
    return {(key,): n for key, n in values.items()}


def _by_family_placement(s: Stats) -> dict[tuple[str, ...], float]:
    return {(family, place): n for family, by_place in s.offloaded.items() for place, n in by_place.items()}


UP = MetricDef("pyflow_up", GAUGE,
               "1 when the control loop's last snapshot is fresh (the loop keeps ticking), else 0",
               lambda s: 1)

# How much older than one keep-alive period the kept snapshot may be before a scrape says
# the loop is down (pyflow_up 0): the loop has stopped ticking.
STALE_AFTER_S = 10.0

METRICS: tuple[MetricDef, ...] = (
    MetricDef("pyflow_build_info", GAUGE, "pyflow version",
              lambda s: {(__version__,): 1}, ("version",)),
    MetricDef("pyflow_offloaded_flows", GAUGE,
              "Connections on the fast path (each holds two flow-map entries)",
              _by_family_placement, ("family", "placement")),
    MetricDef("pyflow_flow_map_entries", GAUGE, "Entries in the flow map",
              lambda s: s.flow_map.entries),
    MetricDef("pyflow_flow_map_capacity", GAUGE, "Size of the flow map in entries",
              lambda s: s.flow_map.capacity),
    MetricDef("pyflow_flow_map_pressure_ratio", GAUGE, "Flow map fill level, entries / capacity (0..1)",
              lambda s: s.flow_map.pressure),
    MetricDef("pyflow_flow_map_memory_bytes", GAUGE,
              "Kernel memory of the flow map (all of its capacity is preallocated)",
              lambda s: s.flow_map.memory_bytes),
    MetricDef("pyflow_fastpath_packets", COUNTER, "Packets forwarded by the fast path",
              lambda s: s.fast_path.packets),
    MetricDef("pyflow_fastpath_bytes", COUNTER, "Bytes forwarded by the fast path",
              lambda s: s.fast_path.bytes),
    MetricDef("pyflow_conntrack_event_overruns", COUNTER,
              "Conntrack event socket overruns (ENOBUFS): events were lost",
              lambda s: s.conntrack.lost_events),
    MetricDef("pyflow_conntrack_malformed_messages", COUNTER,
              "ctnetlink messages left undecoded: a tuple missing or broken, a truncated header",
              lambda s: s.conntrack.malformed_messages),
    MetricDef("pyflow_conntrack_event_buffer_grown", COUNTER,
              "Times an overrun doubled the conntrack event socket's receive buffer",
              lambda s: s.conntrack.rcvbuf_grown),
    MetricDef("pyflow_conntrack_discarded_events", COUNTER,
              "Queued conntrack events dropped after an overrun (older than the resync)",
              lambda s: s.conntrack.discarded_events),
    MetricDef("pyflow_resyncs", COUNTER, "Full conntrack dumps reconciled with the fast path",
              lambda s: s.conntrack.resyncs),
    MetricDef("pyflow_conntrack_refreshes", COUNTER,
              "Conntrack timeouts refreshed for connections the fast path carries",
              lambda s: s.conntrack.refreshes),
    MetricDef("pyflow_conntrack_tracking", GAUGE,
              "1 when conntrack tracks forwarded traffic in pyflowd's namespace (pyflowd's table or "
              "the ruleset uses conntrack), 0 when not or when it cannot be told",
              lambda s: 1 if s.tracking.on else 0),
    MetricDef("pyflow_conntrack_tracking_ensured", GAUGE,
              "1 when pyflowd's own nftables table (inet pyflow_conntrack) makes conntrack track",
              lambda s: 1 if s.tracking.ensured else 0),
    MetricDef("pyflow_offloads", COUNTER, "Connections put on the fast path",
              lambda s: s.engine.offloads),
    MetricDef("pyflow_hw_offloads", COUNTER, "Connections placed in hardware",
              lambda s: s.engine.hw_offloads),
    MetricDef("pyflow_hw_offload_failures", COUNTER,
              "Hardware placements that failed (software fast path used)",
              lambda s: s.engine.hw_failures),
    MetricDef("pyflow_install_errors", COUNTER, "Flow-map writes that failed",
              lambda s: s.engine.install_errors),
    MetricDef("pyflow_slowpath_packets", COUNTER, "Packets the fast path handed to the kernel, by reason",
              lambda s: {(r,): t.packets for r, t in s.slow_path.items()}, ("reason",)),
    MetricDef("pyflow_slowpath_bytes", COUNTER, "Bytes the fast path handed to the kernel, by reason",
              lambda s: {(r,): t.bytes for r, t in s.slow_path.items()}, ("reason",)),
    MetricDef("pyflow_conntrack_events", COUNTER, "Conntrack events received, by type",
              lambda s: _by(s.conntrack.events), ("type",)),
    MetricDef("pyflow_offload_removals", COUNTER, "Connections taken off the fast path, by cause",
              lambda s: _by(s.engine.removed), ("cause",)),
    MetricDef("pyflow_offload_refusals", COUNTER, "Conntrack reports of connections not offloaded, by reason",
              lambda s: _by(s.engine.refused), ("reason",)),
    MetricDef("pyflow_pending_flows", GAUGE, "Connections waiting for a neighbour to resolve",
              lambda s: s.engine.pending),
    MetricDef("pyflow_returning_flows", GAUGE,
              "Connections a path change took off the fast path, waiting for their path to come back",
              lambda s: s.engine.returning),
    MetricDef("pyflow_reoffloads", COUNTER,
              "Connections a path change took off, offloaded again when their path came back",
              lambda s: s.engine.reoffloaded),
    MetricDef("pyflow_returns_abandoned", COUNTER,
              "Connections taken off by a path change and left to the kernel path: the wait expired, "
              "or too many waited",
              lambda s: _by(s.engine.returns_abandoned), ("cause",)),
    MetricDef("pyflow_fdb_keepalive_entries", COUNTER,
              "Bridge FDB entries of offloaded flows (bridge ports managed) the FDB keep-alive checked, "
              "by outcome: refreshed, fresh (the bridge refreshed it itself), moved (to another port), "
              "gone, not_learned, failed",
              lambda s: _by(s.engine.fdb_keepalive), ("outcome",)),
    MetricDef("pyflow_fdb_keepalive_rounds", COUNTER,
              "FDB keep-alive rounds (one per a quarter of the shortest ageing time of the bridges in use)",
              lambda s: s.engine.fdb_keepalive_rounds),
    MetricDef("pyflow_offload_latency_seconds", HISTOGRAM,
              "Time from reading a conntrack event to its flow entries being written",
              lambda s: s.latency),
    MetricDef("pyflow_managed_devices", GAUGE, "Devices running the datapath, by attach mode",
              lambda s: _by(s.devices.by_mode), ("mode",)),
    MetricDef("pyflow_failed_devices", GAUGE, "Wanted devices that could not be attached",
              lambda s: s.devices.failed),
    MetricDef("pyflow_shaped_devices", GAUGE,
              "Wanted devices with traffic shaping (1 per device and part), and how pyflow treats it: "
              "tc_only (no XDP or NIC rule forwards into it) or kernel_path (no hook, not offloaded)",
              lambda s: {(d.device, d.shaping, d.treatment): 1 for d in s.devices.shaped},
              ("device", "shaping", "treatment")),
)


def family(metric: MetricDef, stats: Stats) -> Metric:
    """``metric``'s family with its samples from ``stats`` (labelled samples sorted)."""
    value = metric.value(stats)
    if isinstance(value, Latency):
        hist = HistogramMetricFamily(metric.name, metric.help)
        hist.add_metric([], [(_le(b), n) for b, n in value.buckets], value.sum)
        return hist
    fam = _FAMILY[metric.kind](metric.name, metric.help, labels=list(metric.labels))
    if isinstance(value, Mapping):
        for labels, n in sorted(value.items()):
            fam.add_metric(list(labels), n)
    else:
        fam.add_metric([], value)
    return fam


class PyflowCollector(Collector):
    def __init__(self, snapshot: Callable[[], Stats]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must say "down", not fail
            log.warning("metrics: no snapshot from the control loop: %s", exc)
            up = GaugeMetricFamily(UP.name, UP.help)
            up.add_metric([], 0)
            yield up
            return
        for metric in (UP, *METRICS):
            yield family(metric, stats)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def declared() -> dict[str, str]:
    """Every metric family the collector exposes -> its type (counter, gauge, histogram)
    (dashboards and tests check themselves against it)."""
    return {m.name: m.kind for m in (UP, *METRICS)}


def kept_snapshot(kept: Callable[[], tuple[float, Stats] | None],
                  period_s: Callable[[], float]) -> Callable[[], Stats]:
    """The collector's snapshot: the last one the loop kept, ``kept()`` -> (monotonic time,
    stats) or None, read without entering the loop. Raises (so the scrape says
    pyflow_up 0) when there is none or it is older than a keep-alive period plus
    STALE_AFTER_S."""

    def snapshot() -> Stats:
        got = kept()
        if got is None:
            raise LookupError("the control loop has kept no snapshot yet")
        at, stats = got
        age = time.monotonic() - at
        if age > period_s() + STALE_AFTER_S:
            raise TimeoutError(f"the control loop's last snapshot is {age:.0f} s old")
        return stats

    return snapshot


def registry_for(snapshot: Callable[[], Stats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PyflowCollector(snapshot))
    return registry


# The /metrics endpoint's bounds: whatever a local user does to it, pyflowd keeps one
# thread for it and at most MAX_CONNECTIONS descriptors.
MAX_CONNECTIONS = 16  # served at once; more are closed at once
REQUEST_DEADLINE_S = 5.0  # from accept to the last byte of the answer: a silent peer is cut
MAX_HEADER_BYTES = 8192  # a request head longer than this is refused
ACCEPT_BACKOFF_MAX_S = 1.0  # the longest pause while accept() keeps failing (EMFILE, ENFILE)
# accept() errors that say the process or the system is out of something: retrying at once
# would find the connection still waiting and spin a core
_ACCEPT_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _Client:
    __slots__ = ("sock", "deadline", "data", "out")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.data = b""  # the request head read so far
        self.out: bytes | None = None  # the answer still to send, once the head is read


class MetricsServer:
    """The /metrics HTTP endpoint at HOST:PORT: prometheus-client's text output of
    ``registry`` (generate_latest), served by one thread of its own with a selector, not a
    thread per connection. At most MAX_CONNECTIONS at once, each cut at REQUEST_DEADLINE_S;
    when accept() fails for want of descriptors or memory, the listening socket is left
    alone for a growing pause instead of being retried in a loop. GET or HEAD of /metrics
    (any path, as prometheus-client's server); one answer per connection (Connection:
    close), in the Prometheus text format."""

    def __init__(self, address: str | tuple[str, int], registry: CollectorRegistry):
        host, port = parse_address(address) if isinstance(address, str) else address
        self.registry = registry
        self.refused = 0  # connections closed unanswered because MAX_CONNECTIONS were open
        sock: socket.socket | None = None
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            if sock is not None:
                sock.close()
            where = address if isinstance(address, str) else f"{host}:{port}"
            raise PyflowError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="pyflow-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.thread.join(5)
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- the serving thread -----------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self.sock, selectors.EVENT_READ)
        clients: dict[socket.socket, _Client] = {}
        listening, resume_at, backoff = True, 0.0, 0.0
        try:
            while not self._stopping:
                now = time.monotonic()
                if not listening and now >= resume_at:
                    sel.register(self.sock, selectors.EVENT_READ)
                    listening = True
                wake = [c.deadline for c in clients.values()]
                if not listening:
                    wake.append(resume_at)
                timeout = max(0.0, min(wake) - now) if wake else None
                for key, _mask in sel.select(timeout):
                    if key.fileobj is self.sock:
                        pause = self._accept(sel, clients)
                        if pause:
                            backoff = min(max(backoff * 2, 0.01), ACCEPT_BACKOFF_MAX_S)
                            sel.unregister(self.sock)
                            listening, resume_at = False, time.monotonic() + backoff
                        else:
                            backoff = 0.0
                    elif key.fileobj is not self._wake_r:
                        client = clients[key.fileobj]  # type: ignore[index]
                        if not self._progress(client, sel):
                            self._drop(client, sel, clients)
                now = time.monotonic()
                for client in [c for c in clients.values() if c.deadline <= now]:
                    self._drop(client, sel, clients)
        finally:
            for client in list(clients.values()):
                self._drop(client, sel, clients)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, clients: dict[socket.socket, _Client]) -> bool:
        """Take what waits in the backlog (a bounded number per wake-up); True when accept()
        failed for want of resources and the listening socket must rest."""
        for _ in range(64):
            try:
                conn, _peer = self.sock.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    log.warning("metrics: accept failed (%s); pausing", exc.strerror or exc)
                    return True
                continue  # that connection went away first
            if len(clients) >= MAX_CONNECTIONS:
                self.refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            clients[conn] = _Client(conn, time.monotonic() + REQUEST_DEADLINE_S)
            sel.register(conn, selectors.EVENT_READ)
        return False

    def _progress(self, client: _Client, sel: selectors.BaseSelector) -> bool:
        """Read the request head or send the answer, as far as the socket allows; False
        when the connection is done with (answered, gone or refused)."""
        try:
            if client.out is None:
                chunk = client.sock.recv(4096)
                if not chunk:
                    return False
                client.data += chunk
                end = client.data.find(b"\r\n\r\n")
                if end < 0:
                    end = client.data.find(b"\n\n")
                if end < 0:
                    if len(client.data) > MAX_HEADER_BYTES:
                        client.out = _http(431, "Request Header Fields Too Large", b"request head too long\n")
                        sel.modify(client.sock, selectors.EVENT_WRITE)
                    return True
                client.out = self._answer(client.data[:end])
                sel.modify(client.sock, selectors.EVENT_WRITE)
                return True
            sent = client.sock.send(client.out)
            client.out = client.out[sent:]
            if client.out:
                return True
            client.sock.shutdown(socket.SHUT_WR)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _http(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _http(405, "Method Not Allowed", b"GET or HEAD\n", extra="Allow: GET, HEAD\r\n")
        if target == b"/favicon.ico":  # as prometheus-client's server: every other path is /metrics
            return _http(404, "Not Found", b"not found\n")
        try:
            body = generate_latest(self.registry)
        except Exception as exc:  # noqa: BLE001 - one scrape's failure must not end the server
            log.warning("metrics: scrape failed: %s", exc)
            return _http(500, "Internal Server Error", b"scrape failed\n")
        answer = _http(200, "OK", body, content_type=CONTENT_TYPE_LATEST)
        return answer[:answer.index(b"\r\n\r\n") + 4] if method == b"HEAD" else answer

    @staticmethod
    def _drop(client: _Client, sel: selectors.BaseSelector, clients: dict[socket.socket, _Client]) -> None:
        clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(client.sock)
        client.sock.close()


def _http(status: int, reason: str, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
          extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + body
