"""What pyflowd manages: its devices, and the operations pyflowctl and /metrics ask for.

The managed device list is the union of two sources:

- ``[[device]]`` entries of the config file, owned by the file: a SIGHUP re-reads it
  and attaches, re-attaches (mode changed) or removes devices to match; ``del-device``
  refuses them (the file would bring them back at the next reload);
- devices added at run time with ``add-device``, kept in ``STATE_DIR/devices.json``
  (written atomically) so that they survive restarts, until ``del-device``.

A device in both is the config's (its mode wins) and leaves the runtime list. A device
that cannot be attached (missing, wrong mode) stays wanted and is shown as failed; the
next reload or restart tries again.

Every operation that touches the engine or the datapath runs inside the control loop's
thread (:meth:`ControlPlane.call`), where the engine lives; the one exception is the
first attach at start, before the loop exists. Removing a device first takes every
connection through it off the fast path (back to the kernel), then detaches it, so no
packet meets a half-removed device.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pyflow import __version__
from pyflow.control.engine import EngineConfig, Offloaded
from pyflow.control.runner import ControlConfig, ControlPlane
from pyflow.daemon.config import Config, ConfigError, check_device
from pyflow.datapath.loader import Datapath, DeviceStatus
from pyflow.errors import DeviceError, PyflowError, RequestError

log = logging.getLogger(__name__)

DEVICES_FILE = "devices.json"
DEVICES_VERSION = 1
FAMILY: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}
PROTO: dict[int, str] = {int(socket.IPPROTO_TCP): "tcp", int(socket.IPPROTO_UDP): "udp"}


def control_config(cfg: Config) -> ControlConfig:
    o = cfg.offload
    return ControlConfig(
        engine=EngineConfig(idle_timeout_s=o.idle_timeout, conntrack_timeout_s=o.conntrack_timeout,
                            exclude_mark_mask=o.exclude_mark_mask),
        keepalive_period_s=o.keepalive_interval, offload_mark=o.offload_mark)


@dataclass
class FlowFilter:
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


class Manager:
    def __init__(self, config: Config, datapath: Datapath, *, started: float | None = None):
        self.config = config
        self.dp = datapath
        self.cp = ControlPlane(datapath, control_config(config))
        self.state_dir = Path(config.daemon.state_dir)
        self.runtime: dict[str, str] = self._read_devices()  # name -> mode, added by add-device
        self.requested: dict[str, str] = {}  # name -> the mode it was last attached with
        self.failed: dict[str, str] = {}  # name -> why the last attach failed
        self.started = started if started is not None else time.time()
        self.flow_capacity = Datapath._map_info(datapath.flows).max_entries

    # ---- the device list ------------------------------------------------------------

    def _read_devices(self) -> dict[str, str]:
        path = self.state_dir / DEVICES_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return {}
        out: dict[str, str] = {}
        try:
            if data.get("version") != DEVICES_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {DEVICES_VERSION}")
            for entry in data["devices"]:
                dev = check_device(entry.get("name"), entry.get("mode", "auto"), str(path))
                out[dev.name] = dev.mode
        except (ConfigError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring %s: %s", path, exc)
            return {}
        return out

    def _write_devices(self) -> None:
        """Atomically: a crash leaves the old list or the new one, never half of one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / DEVICES_FILE
        tmp = path.with_name(f".{DEVICES_FILE}.{os.getpid()}")
        data = {"version": DEVICES_VERSION,
                "devices": [{"name": n, "mode": m} for n, m in sorted(self.runtime.items())]}
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dirfd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def wanted(self) -> dict[str, tuple[str, str]]:
        """name -> (mode, source) of every device that should run the datapath."""
        out = {n: (m, "runtime") for n, m in self.runtime.items()}
        out.update({d.name: (d.mode, "config") for d in self.config.devices})
        return out

    def _attached(self) -> dict[str, DeviceStatus]:
        return {st.ifname: st for st in self.dp.status() if st.mode is not None}

    def apply_devices(self, *, live: bool) -> None:
        """Make the attached devices match the wanted list. ``live``: the loop runs (this
        is called inside it) and the engine must follow the changes."""
        wanted = self.wanted()
        attached = self._attached()
        for name in sorted(attached):
            if name not in wanted:
                self._remove(name, live=live)
        self.failed = {n: e for n, e in self.failed.items() if n in wanted}
        changed = False
        for name, (mode, _source) in sorted(wanted.items()):
            if name in attached and self.requested.get(name) == mode:
                continue
            try:
                self.dp.attach(name, mode)
            except PyflowError as exc:
                log.error("%s: %s", name, exc)
                self.failed[name] = str(exc)
                continue
            self.failed.pop(name, None)
            self.requested[name] = mode
            changed = True
        if live and changed:
            self._devices_changed()

    def _devices_changed(self) -> None:
        """Existing connections through an added device become eligible: re-read the
        device registry and reconcile with a full conntrack dump."""
        self.cp.devices.refresh()
        self.cp.engine.resync()

    def _remove(self, name: str, *, live: bool) -> int:
        """Hand back every connection through ``name``, then detach it; returns how many."""
        handed = 0
        st = self._attached().get(name)
        if st is not None and live:
            devices, engine = self.cp.devices, self.cp.engine
            before = len(engine.offloaded)
            devices.leaving.add(st.ifindex)
            try:
                devices.refresh()
                engine.paths_changed()  # connections through it no longer resolve: handed back
                handed = before - len(engine.offloaded)
            finally:
                devices.leaving.discard(st.ifindex)
        try:
            self.dp.detach(name)
        except DeviceError as exc:
            log.warning("%s: %s", name, exc)
        self.requested.pop(name, None)
        if live:
            self.cp.devices.refresh()
        return handed

    def detach_all(self) -> None:
        """At a clean stop (after the loop handed every flow back): no hooks left."""
        self.dp.destroy()

    # ---- operations (run inside the loop) ---------------------------------------------

    def add_device(self, name: Any, mode: Any) -> dict[str, Any]:
        try:
            dev = check_device(name, mode, "add-device")
        except ConfigError as exc:
            raise RequestError("bad_request", str(exc)) from None
        if dev.name in self.wanted() or dev.name in self._attached():
            raise RequestError("already_managed", f"{dev.name} is already managed")
        try:
            self.dp.attach(dev.name, dev.mode)
        except DeviceError as exc:
            code = "no_such_device" if str(exc).startswith("no such device") else "device_error"
            raise RequestError(code, str(exc)) from None
        self.requested[dev.name] = dev.mode
        self.runtime[dev.name] = dev.mode
        try:
            self._write_devices()
        except OSError as exc:
            # the list must not silently differ from what runs: undo
            self.runtime.pop(dev.name)
            self._remove(dev.name, live=False)
            raise RequestError("state_error", f"cannot save the device list in {self.state_dir}: "
                                              f"{exc.strerror}") from None
        self._devices_changed()
        log.info("%s: added (%s)", dev.name, dev.mode)
        return self._device_row(dev.name)

    def del_device(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not name:
            raise RequestError("bad_request", "del-device: name must be a non-empty string")
        if name in {d.name for d in self.config.devices}:
            raise RequestError("configured", f"{name} is listed in {self.config.path}: remove it there "
                                             "and reload (SIGHUP)")
        if name not in self.runtime:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise RequestError("no_such_device", f"no such device: {name}") from None
            raise RequestError("not_managed", f"{name} is not managed")
        handed = self._remove(name, live=True)
        del self.runtime[name]
        self.failed.pop(name, None)
        self._write_devices()
        log.info("%s: removed (%d flows handed back)", name, handed)
        return {"name": name, "flows_handed_back": handed}

    def flush(self) -> dict[str, Any]:
        n = len(self.cp.engine.offloaded)
        self.cp.engine.flush()
        log.info("flush: %d flows handed back to the kernel path", n)
        return {"flows_handed_back": n}

    def reload(self, new: Config) -> None:
        """Apply a re-read config: offload settings, then the device list. Settings that
        need a restart (socket, metrics address, directories) are kept and named."""
        old = self.config
        for key in ("socket", "socket_group", "metrics_address", "state_dir", "bpffs_dir"):
            if getattr(old.daemon, key) != getattr(new.daemon, key):
                log.warning("reload: daemon.%s changed; it takes effect at the next restart", key)
        if old.offload.offload_mark != new.offload.offload_mark:
            log.warning("reload: offload.offload_mark changed; it takes effect at the next restart "
                        "(offloaded connections carry the old bit)")
        if old.offload.hw_skip_hw != new.offload.hw_skip_hw:
            log.warning("reload: offload.hw_skip_hw changed; it takes effect at the next restart")
        keep = {k: getattr(old.daemon, k) for k in ("socket", "socket_group", "metrics_address",
                                                     "state_dir", "bpffs_dir")}
        offload = replace(new.offload, offload_mark=old.offload.offload_mark,
                          hw_skip_hw=old.offload.hw_skip_hw)
        self.config = replace(new, daemon=replace(new.daemon, **keep), offload=offload)
        cc = control_config(self.config)
        self.cp.config = cc
        self.cp.engine.config = cc.engine
        for dev in self.config.devices:
            self.runtime.pop(dev.name, None)  # the file owns it now
        self._write_devices()
        self.apply_devices(live=True)

    # ---- views --------------------------------------------------------------------------

    def _device_row(self, name: str, attached: dict[str, DeviceStatus] | None = None) -> dict[str, Any]:
        attached = self._attached() if attached is None else attached
        mode, source = self.wanted().get(name, (self.requested.get(name, "auto"), "adopted"))
        st = attached.get(name)
        return {
            "name": name,
            "ifindex": st.ifindex if st else None,
            "requested_mode": mode,
            "mode": st.mode if st else None,
            "source": source,
            "state": "attached" if st else "failed",
            "slot": st.slot if st else None,
            "prog_id": st.prog_id if st else None,
            "reason": st.reason if st else None,
            "error": None if st else self.failed.get(name, "not attached"),
        }

    def devices(self) -> dict[str, Any]:
        attached = self._attached()
        names = sorted(set(self.wanted()) | set(attached))
        return {"devices": [self._device_row(n, attached) for n in names]}

    def _names(self) -> dict[int, str]:
        return {st.ifindex: st.ifname for st in self.dp.status()}

    def _flow(self, off: Offloaded, counters: dict[bytes, tuple[int, ...]], names: dict[int, str],
              now_ns: int) -> dict[str, Any]:
        conn = off.conn
        in_o, in_r, eg_o, eg_r, _out_o, _out_r = off.path
        # None: the direction has no flow-map entry; a hardware flow counts in its rules
        co: tuple[int, ...] | None = counters.get(off.key_bytes[0])
        cr: tuple[int, ...] | None = counters.get(off.key_bytes[1])
        if getattr(off, "hw_counters", ()):
            (po, bo), (pr, br) = off.hw_counters
            co, cr = (po, bo, 0, 0), (pr, br, 0, 0)
        last = max(off.last_seen_ns, co[2] if co else 0, cr[2] if cr else 0)

        def direction(t, ing, eg, c):
            return {"src": t.src, "dst": t.dst, "sport": t.sport, "dport": t.dport,
                    "in_device": names.get(ing.ifindex, str(ing.ifindex)),
                    "out_device": names.get(eg.ifindex, str(eg.ifindex)),
                    "packets": c[0] if c else None, "bytes": c[1] if c else None}

        return {
            "family": FAMILY.get(conn.family, str(conn.family)),
            "proto": PROTO.get(conn.proto, str(conn.proto)),
            "placement": "hardware" if getattr(off, "hw", False) else "software",
            "original": direction(conn.orig, in_o, eg_o, co),
            "reply": direction(conn.reply, in_r, eg_r, cr),
            "mark": conn.mark,
            "zone": conn.zone,
            "age_seconds": round(max(0, now_ns - off.since_ns) / 1e9, 3),
            "idle_seconds": round(max(0, now_ns - last) / 1e9, 3),
        }

    def flows(self, args: dict[str, Any]) -> dict[str, Any]:
        limit = args.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise RequestError("bad_request", f"limit: {limit!r} is not a count")
        flt = FlowFilter.from_args(args)
        engine = self.cp.engine
        counters = self.cp.flows.read_counters().as_dict()
        names = self._names()
        now = engine.clock()
        out: list[dict[str, Any]] = []
        total = 0
        for off in engine.offloaded.values():
            flow = self._flow(off, counters, names, now)
            if not flt.matches(flow):
                continue
            total += 1
            if limit is None or len(out) < limit:
                out.append(flow)
        return {"flows": out, "total": total, "truncated": len(out) < total}

    def stats(self) -> dict[str, Any]:
        engine, cp = self.cp.engine, self.cp
        offloaded = {f: {"software": 0, "hardware": 0} for f in FAMILY.values()}
        for off in engine.offloaded.values():
            fam = FAMILY.get(off.conn.family)
            if fam is not None:
                offloaded[fam]["hardware" if getattr(off, "hw", False) else "software"] += 1
        entries = len(cp.flows.read_counters())
        reasons = self.dp.reason_counts()
        fast = reasons.pop("forwarded", (0, 0))
        es = engine.stats
        attached = self._attached()
        modes: dict[str, int] = {}
        for st in attached.values():
            modes[st.mode or "none"] = modes.get(st.mode or "none", 0) + 1
        return {
            "offloaded": offloaded,
            "flow_map": {"entries": entries, "capacity": self.flow_capacity,
                         "pressure": round(entries / self.flow_capacity, 6) if self.flow_capacity else 0.0},
            "fast_path": {"packets": fast[0], "bytes": fast[1]},
            "slow_path": {name: {"packets": p, "bytes": b} for name, (p, b) in reasons.items()},
            "conntrack": {"events": dict(cp.ct_events), "lost_events": cp.ct.lost_events,
                          "discarded_events": cp.ct.discarded_events, "resyncs": es.resyncs,
                          "refreshes": es.refreshes},
            "engine": {"offloads": es.offloaded, "removed": dict(es.removed), "refused": dict(es.refused),
                       "pending": len(engine.pending), "install_errors": es.install_errors,
                       "rewritten": es.rewritten, "hw_offloads": getattr(es, "hw_offloaded", 0),
                       "hw_failures": getattr(es, "hw_failures", 0)},
            "devices": {"managed": len(attached), "failed": len(self.failed), "by_mode": modes},
        }

    def status(self) -> dict[str, Any]:
        d = self.config.daemon
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "config": self.config.path,
            "socket": d.socket,
            "metrics_address": d.metrics_address or None,
            "state_dir": d.state_dir,
            "bpffs_dir": d.bpffs_dir,
            "devices": len(self._attached()),
            "failed_devices": sorted(self.failed),
            "offloaded": len(self.cp.engine.offloaded),
            "loop_lag_seconds": round(max(0.0, time.monotonic() - self.cp.last_turn), 3),
        }

    # ---- the request table --------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            "add-device": lambda a: self.add_device(a.get("name"), a.get("mode", "auto")),
            "del-device": lambda a: self.del_device(a.get("name")),
            "devices": lambda a: self.devices(),
            "flows": self.flows,
            "stats": lambda a: self.stats(),
            "status": lambda a: self.status(),
            "flush": lambda a: self.flush(),
        }

