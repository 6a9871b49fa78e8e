"""The JSON objects pyflowd answers with (schema in the README, "Running pyflowd"), built
from typed state: the device list, the control loop's flow records, the daemon's status.

Fields are only ever added to these objects, never renamed or removed, within a
protocol version: pyflowctl and scripts read them by name.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyflow import __version__
from pyflow.control.stats import FAMILY_NAMES, Direction, FlowRecord
from pyflow.daemon.config import Config
from pyflow.daemon.devices import DeviceList
from pyflow.datapath.loader import DeviceStatus
from pyflow.errors import RequestError

DEFAULT_FLOW_LIMIT = 1000     # flows answered when the request names no limit
MAX_FLOW_LIMIT = 1_000_000    # above any flow map pyflow sizes

PROTO_NAMES: dict[int, str] = {int(socket.IPPROTO_TCP): "tcp", int(socket.IPPROTO_UDP): "udp"}


# ---- devices ----------------------------------------------------------------------------

def device_row(name: str, devices: DeviceList, attached: Mapping[str, DeviceStatus],
               shaping: Mapping[str, dict[str, Any]] | None = None,
               kernel_path: Mapping[str, str] | None = None, no_xdp: str | None = None) -> dict[str, Any]:
    """One device. ``shaping``: Operations.shaping_view(); ``kernel_path``: devices left to
    the kernel path (ingress shaped); ``no_xdp``: why XDP is ruled out on every device."""
    mode, source = devices.origin(name)
    st = attached.get(name)
    kernel = (kernel_path or {}).get(name)
    state = "attached" if st else "kernel-path" if kernel is not None else "failed"
    return {
        "name": name,
        "ifindex": st.ifindex if st else None,
        "requested_mode": mode,
        "mode": st.mode if st else None,
        "source": source,
        "state": state,
        "slot": st.slot if st else None,
        "prog_id": st.prog_id if st else None,
        "reason": st.reason if st else kernel,
        "error": None if st or kernel is not None else devices.failed.get(name, "not attached"),
        # what shapes this device ({} when nothing does) and how pyflow treats it
        "shaping": (shaping or {}).get(name, {}),
        "xdp_ruled_out": no_xdp,
    }


def device_table(devices: DeviceList, attached: Mapping[str, DeviceStatus],
                 shaping: Mapping[str, dict[str, Any]] | None = None,
                 kernel_path: Mapping[str, str] | None = None, no_xdp: str | None = None) -> dict[str, Any]:
    """Every wanted or attached device, by name."""
    names = sorted(set(devices.wanted()) | set(attached))
    return {"devices": [device_row(n, devices, attached, shaping, kernel_path, no_xdp) for n in names]}


# ---- flows ------------------------------------------------------------------------------

def flow(record: FlowRecord, names: Mapping[int, str]) -> dict[str, Any]:
    """One offloaded connection; devices by name where known (else their ifindex)."""

    def direction(d: Direction) -> dict[str, Any]:
        t, c = d.tuple, d.counters
        return {"src": t.src, "dst": t.dst, "sport": t.sport, "dport": t.dport,
                "in_device": names.get(d.in_ifindex, str(d.in_ifindex)),
                "out_device": names.get(d.out_ifindex, str(d.out_ifindex)),
                "packets": c.packets if c else None, "bytes": c.bytes if c else None}

    return {
        "family": FAMILY_NAMES.get(record.family, str(record.family)),
        "proto": PROTO_NAMES.get(record.proto, str(record.proto)),
        "placement": "hardware" if record.hardware else "software",
        "original": direction(record.original),
        "reply": direction(record.reply),
        "mark": record.mark,
        "zone": record.zone,
        "age_seconds": round(record.age_ns / 1e9, 3),
        "idle_seconds": round(record.idle_ns / 1e9, 3),
    }


@dataclass
class FlowFilter:
    """Which flows a ``flows`` request asks for; every given criterion must match."""

    proto: str | None = None
    addr: Any = None  # an ipaddress network
    port: int | None = None
    device: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> FlowFilter:
        f = cls()
        proto = args.get("proto")
        if proto is not None:
            if proto not in ("tcp", "udp"):
                raise RequestError("bad_request", f"proto: {proto!r} is not tcp or udp")
            f.proto = proto
        addr = args.get("addr")
        if addr is not None:
            try:
                f.addr = ipaddress.ip_network(str(addr), strict=False)
            except ValueError:
                raise RequestError("bad_request", f"addr: {addr!r} is not an address or prefix") from None
        port = args.get("port")
        if port is not None:
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise RequestError("bad_request", f"port: {port!r} is not 1..65535")
            f.port = port
        device = args.get("device")
        if device is not None:
            if not isinstance(device, str):
                raise RequestError("bad_request", "device: must be a string")
            f.device = device
        return f

    def matches(self, flow: dict[str, Any]) -> bool:
        """``flow``: as flow() renders it (names, not ifindexes, are what is asked for)."""
        o, r = flow["original"], flow["reply"]
        if self.proto is not None and flow["proto"] != self.proto:
            return False
        if self.port is not None and self.port not in (o["sport"], o["dport"], r["sport"], r["dport"]):
            return False
        if self.device is not None and self.device not in (o["in_device"], o["out_device"],
                                                           r["in_device"], r["out_device"]):
            return False
        if self.addr is not None:
            addrs = {o["src"], o["dst"], r["src"], r["dst"]}
            if not any(ipaddress.ip_address(a) in self.addr for a in addrs
                       if ipaddress.ip_address(a).version == self.addr.version):
                return False
        return True


def flow_list(records: Iterable[FlowRecord], names: Mapping[int, str],
              args: dict[str, Any]) -> dict[str, Any]:
    """The ``flows`` answer: the matching flows (at most ``limit``, DEFAULT_FLOW_LIMIT when
    not given) and how many matched."""
    # a default keeps one client's answer (built in the control loop) bounded by default
    limit = args.get("limit", DEFAULT_FLOW_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_FLOW_LIMIT:
        raise RequestError("bad_request", f"limit: {limit!r} is not a count of 0..{MAX_FLOW_LIMIT}")
    flt = FlowFilter.from_args(args)
    out: list[dict[str, Any]] = []
    total = 0
    for record in records:
        rendered = flow(record, names)
        if not flt.matches(rendered):
            continue
        total += 1
        if len(out) < limit:
            out.append(rendered)
    return {"flows": out, "total": total, "truncated": len(out) < total}


# ---- the daemon ---------------------------------------------------------------------------

def status(config: Config, *, uptime_s: float, attached: int, failed: Iterable[str], offloaded: int,
           loop_lag_s: float, tracking: dict[str, Any] | None = None,
           flow_map: dict[str, int] | None = None) -> dict[str, Any]:
    d = config.daemon
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(uptime_s, 3),
        "config": config.path,
        "socket": d.socket,
        "metrics_address": d.metrics_address or None,
        "state_dir": d.state_dir,
        "bpffs_dir": d.bpffs_dir,
        "devices": attached,
        "failed_devices": sorted(failed),
        "offloaded": offloaded,
        # {entries (at the last tick), capacity, memory_bytes (kernel memory, preallocated)}
        "flow_map": flow_map,
        "loop_lag_seconds": round(max(0.0, loop_lag_s), 3),
        # conntrack's tracking of forwarded traffic here: {wanted, ensured, on, source, error}
        "tracking": tracking,
    }
