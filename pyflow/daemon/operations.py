"""What pyflowd does when asked: attach and detach devices to match the wanted list,
add-device, del-device, flush, reload, and the snapshots behind flows, stats and status.

Every operation that touches the engine or the datapath runs inside the control loop's
thread (:meth:`ControlPlane.call`, the daemon's request handler wraps each one); the one
exception is the first attach at start, before the loop exists. Removing a device first
takes every connection through it off the fast path (back to the kernel), then detaches
it, so no packet meets a half-removed device.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyflow.control.engine import EngineConfig
from pyflow.control.runner import ControlConfig, ControlPlane
from pyflow.daemon import shaping, views
from pyflow.daemon.config import Config, ConfigError, check_device, short, valid_ifname
from pyflow.daemon.devices import DeviceList
from pyflow.daemon.stats import DeviceCounts, ShapedDevice, Stats
from pyflow.daemon.tracking import Tracking
from pyflow.datapath.loader import Datapath, DeviceStatus
from pyflow.errors import DeviceError, PyflowError, RequestError

log = logging.getLogger(__name__)

# daemon settings a running pyflowd keeps until restarted (sockets and directories in use,
# and the datapath build: the programs are loaded once, at start)
RESTART_ONLY = ("socket", "socket_group", "metrics_address", "state_dir", "bpffs_dir", "datapath_build",
                "flow_map_entries")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def control_config(cfg: Config) -> ControlConfig:
    o = cfg.offload
    return ControlConfig(
        engine=EngineConfig(idle_timeout_s=o.idle_timeout, conntrack_timeout_s=o.conntrack_timeout,
                            exclude_mark_mask=o.exclude_mark_mask),
        keepalive_period_s=o.keepalive_interval, offload_mark=o.offload_mark)


def reloadable(old: Config, new: Config) -> Config:
    """``new`` with the settings that need a restart kept from ``old``, each change of
    those logged by name."""
    for key in RESTART_ONLY:
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            log.warning("reload: daemon.%s changed; it takes effect at the next restart", key)
    if old.offload.offload_mark != new.offload.offload_mark:
        log.warning("reload: offload.offload_mark changed; it takes effect at the next restart "
                    "(offloaded connections carry the old bit)")
    if old.offload.hw_skip_hw != new.offload.hw_skip_hw:
        log.warning("reload: offload.hw_skip_hw changed; it takes effect at the next restart")
    keep = {k: getattr(old.daemon, k) for k in RESTART_ONLY}
    offload = replace(new.offload, offload_mark=old.offload.offload_mark, hw_skip_hw=old.offload.hw_skip_hw)
    return replace(new, daemon=replace(new.daemon, **keep), offload=offload)


class Operations:
    def __init__(self, config: Config, datapath: Datapath, *, started: float | None = None):
        self.config = config
        self.dp = datapath
        self.cp = ControlPlane(datapath, control_config(config))
        self.devices = DeviceList(config.devices, config.daemon.state_dir)
        self.started = started if started is not None else time.time()
        self.tracking = Tracking(wanted=config.daemon.ensure_conntrack)  # pyflow.daemon.tracking
        # traffic shaping on the wanted devices (pyflow.daemon.shaping), as last applied
        self.shaping = shaping.Shaping()
        self.kernel_path: dict[str, str] = {}  # name -> why it gets no hook (its ingress is shaped)
        self.no_xdp: str | None = None  # why no device may forward by XDP now (an egress is shaped)
        self.guards: dict[str, str | None] = {}  # name -> the no_xdp it was last attached under
        self._shaping_reader = shaping.Watcher()  # the loop thread's socket (apply_devices)
        # the shaping devices the engine plans with (Engine.shaping_changed); None: not told yet
        self.shaped_applied: frozenset[int] | None = None

    # ---- the attached devices ---------------------------------------------------------

    def attached(self, *, live: bool = True) -> dict[str, DeviceStatus]:
        """The attached devices by name; ``live=False``: without the program ids (Datapath.status)."""
        return {st.ifname: st for st in self.dp.status(live=live) if st.mode is not None}

    def read_shaping(self, names: Any = None) -> shaping.Shaping:
        """The shaping of the wanted devices (or of ``names``), read now; the last one
        applied when the kernel refuses the read (logged)."""
        try:
            return self._shaping_reader.read(self.devices.wanted() if names is None else names)
        except OSError as exc:
            log.warning("qdiscs unreadable, keeping the last shaping seen: %s", exc)
            return self.shaping

    def _set_shaping(self, sh: shaping.Shaping, wanted: Any) -> None:
        """Adopt ``sh`` as the shaping in force: which devices stay on the kernel path and
        whether XDP is ruled out (pyflow.daemon.shaping's policy), logged when it changes."""
        kernel = {n: r for n in wanted if (r := sh.kernel_path_reason(n)) is not None}
        no_xdp = sh.no_xdp_reason(n for n in wanted if n not in kernel)
        if sh != self.shaping or kernel != self.kernel_path or no_xdp != self.no_xdp:
            for name in sorted(set(kernel) - set(self.kernel_path)):
                log.warning("%s: left to the kernel path: %s", name, kernel[name])
            if no_xdp != self.no_xdp:
                log.warning("%s", f"no XDP on any device: {no_xdp}" if no_xdp else
                            "no egress shaping on managed devices: XDP allowed again")
        self.shaping, self.kernel_path, self.no_xdp = sh, kernel, no_xdp

    def apply_devices(self, *, live: bool, shaped: shaping.Shaping | None = None) -> None:
        """Make the attached devices match the wanted list and the shaping policy (read
        now, or ``shaped`` as the caller just read it). ``live``: the loop runs (this is
        called inside it) and the engine must follow the changes."""
        devices = self.devices
        wanted = devices.wanted()
        self._set_shaping(shaped if shaped is not None else self.read_shaping(wanted), wanted)
        attached = self.attached()
        for name in sorted(attached):
            if name not in wanted or name in self.kernel_path:
                self._remove(name, live=live)
        attached = self.attached()
        devices.forget_unwanted_failures()
        changed = False
        for name, (mode, _source) in sorted(wanted.items()):
            if name in self.kernel_path:
                devices.failed.pop(name, None)
                continue
            if (name in attached and devices.requested.get(name) == mode
                    and self.guards.get(name) == self.no_xdp):
                continue
            try:
                self.dp.attach(name, mode, no_xdp=self.no_xdp)
            except PyflowError as exc:
                log.error("%s: %s", name, exc)
                devices.failed[name] = str(exc)
                st = attached.get(name)
                if st is not None and self.no_xdp and (st.mode in shaping.XDP_MODES or st.hw):
                    # its running hook would now forward around the shaper: kernel path until fixed
                    self._remove(name, live=live)
                    changed = True
                continue
            devices.failed.pop(name, None)
            devices.requested[name] = mode
            self.guards[name] = self.no_xdp
            changed = True
        if live and changed:
            self.cp.devices_changed()
        if live and self.shaping.shaped_ifindexes != self.shaped_applied:
            # after the devices: a path through a shaper above the managed port leaves the fast path
            self.cp.engine.shaping_changed(self.shaping.shaped_ifindexes)
            self.shaped_applied = self.shaping.shaped_ifindexes

    def _remove(self, name: str, *, live: bool) -> int:
        """Hand back every connection through ``name``, then detach it; returns how many."""
        handed = 0
        st = self.attached().get(name)
        if st is not None and live:
            handed = self.cp.release_device(st.ifindex)
        try:
            self.dp.detach(name)
        except DeviceError as exc:
            log.warning("%s: %s", name, exc)
        self.devices.requested.pop(name, None)
        if live:
            self.cp.refresh_devices()
        return handed

    def detach_all(self) -> None:
        """At a clean stop (after the loop handed every flow back): no hooks left."""
        self.dp.destroy()

    # ---- requests (run inside the loop) ------------------------------------------------

    def add_device(self, name: Any, mode: Any) -> dict[str, Any]:
        try:
            dev = check_device(name, mode, "add-device")
        except ConfigError as exc:
            raise RequestError("bad_request", str(exc)) from None
        devices = self.devices
        if dev.name in devices.wanted() or dev.name in self.attached():
            raise RequestError("already_managed", f"{dev.name} is already managed")
        names = [*devices.wanted(), dev.name]
        sh = self.read_shaping(names)
        kernel = sh.kernel_path_reason(dev.name)
        no_xdp = sh.no_xdp_reason(n for n in names if sh.kernel_path_reason(n) is None)
        if kernel is None:
            try:
                self.dp.attach(dev.name, dev.mode, no_xdp=no_xdp)
            except DeviceError as exc:
                code = "no_such_device" if str(exc).startswith("no such device") else "device_error"
                raise RequestError(code, str(exc)) from None
            devices.requested[dev.name] = dev.mode
            self.guards[dev.name] = no_xdp
        devices.runtime[dev.name] = dev.mode
        try:
            devices.save()
        except OSError as exc:
            # the list must not silently differ from what runs: undo
            devices.runtime.pop(dev.name)
            self._remove(dev.name, live=False)
            raise RequestError("state_error", f"cannot save the device list in {devices.state_dir}: "
                                              f"{exc.strerror}") from None
        # a shaper on the new device rules XDP out on the others: they follow now
        self.apply_devices(live=True, shaped=sh)
        self.cp.devices_changed()
        log.info("%s: added (%s)", dev.name, dev.mode)
        return views.device_row(dev.name, devices, self.attached(), self.shaping_view(), self.kernel_path,
                                self.no_xdp)

    def del_device(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not valid_ifname(name):
            # a NUL would reach if_nametoindex() and fail there as an internal error
            raise RequestError("bad_request", f"del-device: {short(name)} is not a valid interface name")
        devices = self.devices
        if name in devices.configured:
            raise RequestError("configured", f"{name} is listed in {self.config.path}: remove it there "
                                             "and reload (SIGHUP)")
        if name not in devices.runtime:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise RequestError("no_such_device", f"no such device: {name}") from None
            raise RequestError("not_managed", f"{name} is not managed")
        handed = self._remove(name, live=True)
        del devices.runtime[name]
        devices.failed.pop(name, None)
        devices.save()
        self.guards.pop(name, None)
        self.apply_devices(live=True)  # its shaper may have been what ruled XDP out
        log.info("%s: removed (%d flows handed back)", name, handed)
        return {"name": name, "flows_handed_back": handed}

    def flush(self) -> dict[str, Any]:
        n = self.cp.flush()
        log.info("flush: %d flows handed back to the kernel path", n)
        return {"flows_handed_back": n}

    def reload(self, new: Config) -> None:
        """Apply a re-read config: offload settings, then the device list. Settings that
        need a restart (socket, metrics address, directories) are kept and named."""
        self.config = reloadable(self.config, new)
        self.cp.reconfigure(control_config(self.config))
        self.devices.set_configured(self.config.devices)
        self.devices.save()
        self.apply_devices(live=True)

    def flows(self, args: dict[str, Any]) -> dict[str, Any]:
        names = {st.ifindex: st.ifname for st in self.dp.status(live=False)}
        return views.flow_list(self.cp.offloaded(), names, args)

    def stats(self, *, fresh: bool = False) -> Stats:
        """The stats snapshot; ``fresh``: with the flow map counted now (see ControlPlane.snapshot).
        Kept after every keep-alive tick, so it reads no device state from the kernel."""
        attached = self.attached(live=False)
        modes: dict[str, int] = {}
        for st in attached.values():
            modes[st.mode or "none"] = modes.get(st.mode or "none", 0) + 1
        shaped = tuple(ShapedDevice(name, kind, treatment)
                       for name, kinds in sorted(self.shaping_view().items())
                       for kind, treatment in kinds["treatment"].items())
        counts = DeviceCounts(managed=len(attached), failed=len(self.devices.failed), by_mode=modes,
                              shaped=shaped)
        return Stats.of(self.cp.snapshot(fresh=fresh), counts, self.tracking.state)

    def shaping_view(self) -> dict[str, dict[str, Any]]:
        """Per wanted device with shaping: what shapes it and how pyflow treats each part
        (views.device_row's ``shaping``)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.devices.wanted():
            dev = self.shaping.of(name)
            if not dev.shaped:
                continue
            treatment: dict[str, str] = {}
            if dev.ingress_redirect is not None:
                treatment["ingress_redirect"] = "kernel_path"
            if dev.egress:
                # into a device left to the kernel path nothing is redirected at all
                treatment["egress"] = "kernel_path" if name in self.kernel_path else "tc_only"
            out[name] = {**dev.to_json(), "treatment": treatment,
                         "reason": self.kernel_path.get(name) or self.no_xdp}
        return out

    def sync_tracking(self) -> None:
        """pyflowd's conntrack table as the config and the devices want it: there while a
        device is attached and daemon.ensure_conntrack is on, gone otherwise."""
        self.tracking.sync(wanted=self.config.daemon.ensure_conntrack, active=bool(self.attached(live=False)))

    def _tracked(self, result: dict[str, Any]) -> dict[str, Any]:
        """A device request's answer, once tracking follows the new device list."""
        self.sync_tracking()
        return result

    def status(self) -> dict[str, Any]:
        return views.status(self.config, uptime_s=time.time() - self.started, attached=len(self.attached()),
                            failed=self.devices.failed, offloaded=self.cp.offloaded_count,
                            loop_lag_s=time.monotonic() - self.cp.last_turn,
                            tracking=self.tracking.state.to_json(), flow_map=self._flow_map())

    def _flow_map(self) -> dict[str, int] | None:
        """The flow map's size and memory for status (None before the loop made its table)."""
        flows = getattr(self.cp, "flows", None)
        return flows.flow_map() if flows is not None else None

    def handlers(self) -> dict[str, Handler]:
        """The control socket's commands: name -> handler of the request's args."""
        return {
            "add-device": lambda a: self._tracked(self.add_device(a.get("name"), a.get("mode", "auto"))),
            "del-device": lambda a: self._tracked(self.del_device(a.get("name"))),
            "devices": lambda a: views.device_table(self.devices, self.attached(), self.shaping_view(),
                                                    self.kernel_path, self.no_xdp),
            "flows": self.flows,
            "stats": lambda a: self.stats(fresh=True).to_json(),
            "status": lambda a: self.status(),
            "flush": lambda a: self.flush(),
        }
