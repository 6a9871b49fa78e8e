"""pyflowd: the flow-offload daemon.

``pyflowd [--config FILE] [--socket PATH] [--metrics-address HOST:PORT] [--state-dir DIR]
[--bpffs-dir DIR] [--log-level LEVEL]`` runs in the foreground, logs to stderr and manages
the devices of the network namespace it runs in. ``pyflowd check-config [FILE]``
validates a config file and exits (0 valid, 2 invalid).

Lifecycle:

- start: the config is read and validated first (exit 2 on any error, before any device
  is touched); then the datapath is loaded, adopting pinned maps and programs a previous
  process left (after a crash the fast path kept forwarding meanwhile); the wanted
  devices are attached (an already running one is swapped atomically); the control loop
  starts with a full conntrack dump that re-offloads live connections and removes stale
  entries; then the control socket and /metrics open and systemd hears READY=1.
- SIGHUP: the file is re-read; if it is invalid the daemon keeps its running config and
  logs why; if valid, offload settings and the device list are applied (operations.py).
- SIGTERM / SIGINT: socket and metrics close; with ``on_stop = "hand-back"`` (default)
  every connection goes back to the kernel path, then the hooks are removed and the pins
  deleted: packets of live connections take the kernel path from the moment their entry
  is gone, none is dropped. With ``on_stop = "keep"`` the datapath keeps forwarding
  and the next start adopts it, as after a crash.
- systemd: ``Type=notify`` readiness, RELOADING/STOPPING, STATUS lines, and the watchdog
  (``WATCHDOG_USEC``): WATCHDOG=1 is sent only while the control loop keeps turning, so
  a stuck loop gets the daemon restarted. All of it is a no-op without ``$NOTIFY_SOCKET``.

Exit status: 0 after a clean stop, 1 on an operational failure, 2 on a config or usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyflow import __version__
from pyflow.daemon.config import DEFAULT_CONFIG, LOG_LEVELS, Config, ConfigError, load
from pyflow.errors import PyflowError, RequestError

log = logging.getLogger("pyflowd")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# How often the main thread checks that pyflowd's conntrack table is still in place.
TRACKING_CHECK_S = 10.0

# How long a request or a reload waits for the control loop. A request the loop did not
# start by then is cancelled and answered "busy" (it never runs); one it started is
# answered "still_running" and completes.
REQUEST_TIMEOUT_S = 30.0


# ---- systemd notification ----------------------------------------------------------------

class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET, written out (no libsystemd): one datagram per
    message; an address starting with '@' is in the abstract namespace."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    def notify(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify: %s", exc)


def _monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


# ---- the command line -------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyflowd", description="pyflow flow-offload daemon (runs in the "
                                "foreground, manages the devices of its network namespace)")
    p.add_argument("--version", action="version", version=f"pyflowd {__version__}")
    p.add_argument("--config", metavar="FILE", help=f"config file (default {DEFAULT_CONFIG}; "
                   "the default may be absent, then built-in defaults apply)")
    p.add_argument("--socket", metavar="PATH", help="control socket (overrides daemon.socket)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="Prometheus endpoint, \"\" for none (overrides daemon.metrics_address)")
    p.add_argument("--state-dir", metavar="DIR", help="persistent state (overrides daemon.state_dir)")
    p.add_argument("--bpffs-dir", metavar="DIR", help="BPF pin directory (overrides daemon.bpffs_dir)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="overrides daemon.log_level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    chk = sub.add_parser("check-config", help="validate a config file and exit")
    chk.add_argument("file", nargs="?", metavar="FILE", help=f"default: --config or {DEFAULT_CONFIG}")
    return p


def load_config(args: argparse.Namespace) -> Config:
    cfg = load(args.config)
    return cfg.with_overrides(socket=args.socket, metrics_address=args.metrics_address,
                              state_dir=args.state_dir, bpffs_dir=args.bpffs_dir,
                              log_level=args.log_level)


def _config_failure(exc: Exception) -> str:
    """One line for a config that could not be loaded. ConfigError names the key; anything
    else is a gap in validation, but must still be an error message, never a traceback
    that ends the daemon (at start: exit 2; at reload: the running config stays)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"cannot load the config: {type(exc).__name__}: {str(exc)[:200]}"


def _log_level(name: str) -> int:
    return int(getattr(logging, name.upper()))


def _set_log_level(name: str) -> None:
    """pyflow's loggers at ``name``; libraries no chattier than info (pyroute2's debug
    output is every netlink message)."""
    level = _log_level(name)
    logging.getLogger().setLevel(level)
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))


# ---- the running daemon ------------------------------------------------------------------

@dataclass
class _Signals:
    wake: threading.Event = field(default_factory=threading.Event)
    stop: str | None = None
    reload: bool = False

    def install(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self.stop = signal.Signals(signum).name
            self.wake.set()

        def on_hup(_signum: int, _frame: Any) -> None:
            self.reload = True
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


class Daemon:
    def __init__(self, config: Config, config_arg: str | None, overrides: dict[str, str | None],
                 notifier: Notifier):
        self.config = config
        self.config_arg = config_arg
        self.overrides = overrides
        self.notifier = notifier
        self.signals = _Signals()
        self.ops: Any = None
        self.server: Any = None
        self._shaping_watch: Any = None  # the main thread's qdisc reader (check_shaping)
        self.metrics: Any = None

    def start(self) -> None:
        from pyflow.daemon.api import ControlServer
        from pyflow.daemon.metrics import MetricsServer, kept_snapshot, registry_for
        from pyflow.daemon.operations import Operations
        from pyflow.datapath.attach.state import private_dir
        from pyflow.datapath.loader import Datapath

        d = self.config.daemon
        # root's alone (0700, owned by root, not a link): any other user who could open the
        # lock files in it could stall the control loop or block the start
        private_dir(d.state_dir, tighten=True)
        # the state dir and the socket are claimed first: a second pyflowd must fail before
        # touching the datapath
        self._lock_state_dir(d.state_dir)
        _check_socket_dir(os.path.dirname(d.socket))
        self.server = ControlServer(d.socket, self._request, group=d.socket_group)
        self.server.bind()
        _warn_private_bpffs(d.bpffs_dir)
        dp = Datapath(pin_dir=d.bpffs_dir, state_file=os.path.join(d.state_dir, "datapath.json"),
                      **self._datapath_options())
        _warn_flow_map_size(dp, d.flow_map_entries)
        ops = self.ops = Operations(self.config, dp)
        ops.apply_devices(live=False)
        ops.sync_tracking()  # before the loop's first dump: conntrack tracks from now on
        if d.metrics_address:
            ops.cp.snapshot_source = ops.stats  # kept at every tick: scrapes never enter the loop
        ops.cp.start()
        self.server.start()
        if d.metrics_address:
            snapshot = kept_snapshot(lambda: ops.cp.kept, lambda: ops.cp.config.keepalive_period_s)
            self.metrics = MetricsServer(d.metrics_address, registry_for(snapshot))
        log.info("pyflowd %s ready: %d device(s), socket %s, metrics %s", __version__,
                 len(ops.attached()), d.socket, d.metrics_address or "off")

    def _lock_state_dir(self, state_dir: str) -> None:
        """Hold an exclusive lock on STATE_DIR/pyflowd.pid while running (released by the
        kernel when the process ends, however it ends)."""
        import fcntl

        from pyflow.datapath.attach.state import open_private

        path = os.path.join(state_dir, "pyflowd.pid")
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PyflowError(f"another pyflowd (pid {other}) runs with state dir {state_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._pid_fd = fd

    def _datapath_options(self) -> dict[str, Any]:
        return {"build": self.config.daemon.datapath_build,
                "defines": {"PYFLOW_MAX_FLOWS": self.config.daemon.flow_map_entries},
                "hw_skip_hw": self.config.offload.hw_skip_hw}

    def _request(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self.ops.handlers().get(command)
        if handler is None:
            raise RequestError("unknown_command", f"unknown command {command!r}")
        from pyflow.control.runner import LoopStopped, StillRunning

        try:
            return self.ops.cp.call(lambda: handler(args), REQUEST_TIMEOUT_S)
        except LoopStopped:
            raise RequestError("stopping", "pyflowd is stopping") from None
        except StillRunning:
            raise RequestError("still_running", f"pyflowd's control loop did not finish {command} in "
                               "time: it is still running and will complete (see status, "
                               "devices and the log)") from None
        except TimeoutError:
            raise RequestError("busy", f"pyflowd's control loop did not answer in time: {command} was "
                               "not run") from None
        except RequestError:
            raise
        except PyflowError as exc:
            raise RequestError("failed", str(exc)) from None

    def _status_line(self) -> str:
        ops = self.ops
        return f"STATUS={ops.cp.offloaded_count} flows offloaded on {len(ops.devices.requested)} device(s)"

    def reload(self) -> None:
        self.notifier.notify("RELOADING=1", _monotonic_usec())
        try:
            new = load(self.config_arg).with_overrides(**self.overrides)
        except Exception as exc:  # noqa: BLE001 - see _config_failure
            log.error("reload refused, keeping the running config: %s", _config_failure(exc))
        else:
            _set_log_level(new.daemon.log_level)
            from pyflow.control.runner import LoopStopped, StillRunning

            def apply() -> None:  # in the loop: a reload that finishes late still takes effect whole
                self.ops.reload(new)
                self.ops.sync_tracking()
                self.config = self.ops.config

            try:
                self.ops.cp.call(apply, REQUEST_TIMEOUT_S)
                log.info("reloaded %s", new.path or "built-in defaults")
            except StillRunning:
                log.warning("reload still running after %.0f s: it will complete", REQUEST_TIMEOUT_S)
            except (PyflowError, LoopStopped, TimeoutError) as exc:
                log.error("reload failed: %s", exc)
        self.notifier.notify("READY=1", "STATUS=reloaded")

    def run(self) -> int:
        """Serve until a stop signal or a failure of the control loop."""
        self.notifier.notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=running")
        wd = self.notifier.watchdog_s
        ping_every = wd / 2 if wd else None
        next_ping = 0.0
        next_status = 0.0
        next_tracking = time.monotonic() + TRACKING_CHECK_S
        next_shaping = 0.0
        cp = self.ops.cp
        while True:
            self.signals.wake.wait(0.5 if ping_every is None else min(0.5, ping_every))
            self.signals.wake.clear()
            if self.signals.stop is not None:
                log.info("%s: stopping", self.signals.stop)
                return EXIT_OK
            if not cp.running:
                log.error("control loop ended: %s", cp.error or "no reason given")
                return EXIT_FAILURE
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
            now = time.monotonic()
            if ping_every is not None and now >= next_ping:
                # only a turning loop keeps the watchdog fed: a stuck one gets us restarted
                if now - cp.last_turn < (wd or 0):
                    self.notifier.notify("WATCHDOG=1")
                    next_ping = now + ping_every
            if self.notifier.address and now >= next_status:
                self.notifier.notify(self._status_line())
                next_status = now + 10
            if now >= next_tracking:
                # puts back a table a firewall reload flushed away (nft flush ruleset)
                self.ops.tracking.sync()
                next_tracking = time.monotonic() + TRACKING_CHECK_S
            if now >= next_shaping:
                from pyflow.daemon.shaping import CHECK_INTERVAL_S

                self.check_shaping()
                next_shaping = time.monotonic() + CHECK_INTERVAL_S

    def check_shaping(self) -> None:
        """Re-read the qdiscs (on this thread's own socket: one dump covers every device) and,
        when the shaping changed, re-apply the policy inside the loop (pyflow.daemon.shaping),
        which tells the engine too."""
        from pyflow.control.runner import LoopStopped, StillRunning
        from pyflow.daemon.shaping import Watcher

        ops = self.ops
        if self._shaping_watch is None:
            self._shaping_watch = Watcher()
        try:
            sh = self._shaping_watch.read(list(ops.devices.wanted()))
        except OSError as exc:
            log.debug("qdiscs unreadable: %s", exc)
            return
        if sh == ops.shaping and sh.shaped_ifindexes == ops.shaped_applied:
            return
        if sh != ops.shaping:
            log.info("traffic shaping changed: applying the policy again")
        try:
            ops.cp.call(lambda: ops.apply_devices(live=True, shaped=sh), REQUEST_TIMEOUT_S)
        except StillRunning:
            log.warning("shaping change still being applied after %.0f s", REQUEST_TIMEOUT_S)
        except (PyflowError, LoopStopped, TimeoutError) as exc:
            log.error("shaping change not applied: %s", exc)

    def shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.stop()
        if self.server is not None:
            self.server.stop()
        ops = self.ops
        if ops is None:
            return
        hand_back = self.config.daemon.on_stop == "hand-back"
        if ops.cp.running:
            ops.cp.stop(hand_back=hand_back)
        if hand_back:
            ops.detach_all()
            log.info("every flow handed back to the kernel path; devices detached")
            ops.tracking.release()
        else:
            ops.dp.close()
            log.info("datapath left running (on_stop = keep): the next start adopts it")


def _check_socket_dir(path: str) -> None:
    """The control socket's directory: created 0755 if missing (a socket_group member must
    reach the socket), else it must be a directory owned by root that nobody else can
    write, not a symbolic link: whoever could write it could put a socket of their own
    in pyflowctl's way or have the socket's chown/chmod land elsewhere."""
    from pyflow.datapath.attach.state import check_dir_stat

    os.makedirs(path, mode=0o755, exist_ok=True)
    check_dir_stat(os.lstat(path), path, "socket dir")


def _warn_flow_map_size(dp: Any, wanted: int) -> None:
    """A flow map adopted from the pins keeps the size it was made with (its entries live on
    in it): say so when the config asks for another size."""
    from pyflow.datapath.abi import MAP_FLOWS
    from pyflow.datapath.flowtable import FlowTable

    table = FlowTable(dp.map_fd(MAP_FLOWS))
    if table.max_entries != wanted:
        log.warning("daemon.flow_map_entries = %d, but the flow map pinned in %s holds %d entries "
                    "and is kept; the new size takes effect when the pins are removed (a clean "
                    "stop with on_stop = \"hand-back\" removes them)", wanted, dp.pin_dir,
                    table.max_entries)


def _warn_private_bpffs(bpffs_dir: str) -> None:
    """Say so when pins would die with the process: a mount namespace of our own (as `ip netns
    exec` makes, with a fresh /sys) without bpffs at /sys/fs/bpf. The loader then mounts a
    bpffs that only this process sees, and a restart finds nothing to adopt."""
    from pyflow.datapath.loader import BPFFS_ROOT, bpffs_mounted

    if not (bpffs_dir == BPFFS_ROOT or bpffs_dir.startswith(BPFFS_ROOT + "/")) or bpffs_mounted():
        return
    try:
        private = os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return
    if private:
        log.warning("no bpffs at %s in this mount namespace (ip netns exec?): pins made now vanish "
                    "with this process and a restart cannot adopt the datapath; enter the network "
                    "namespace alone (nsenter --net=/run/netns/NAME, or NetworkNamespacePath= in "
                    "the unit)", BPFFS_ROOT)


def _check_config(args: argparse.Namespace) -> int:
    target = args.file or args.config
    try:
        cfg = load_config(argparse.Namespace(**{**vars(args), "config": target}))
    except Exception as exc:  # noqa: BLE001 - see _config_failure
        print(f"pyflowd: {_config_failure(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    where = cfg.path or f"built-in defaults ({DEFAULT_CONFIG} absent)"
    print(f"{where}: valid ({len(cfg.devices)} device(s))")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args)
    try:
        config = load_config(args)
    except Exception as exc:  # noqa: BLE001 - see _config_failure
        print(f"pyflowd: {_config_failure(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _set_log_level(config.daemon.log_level)
    overrides = {"socket": args.socket, "metrics_address": args.metrics_address,
                 "state_dir": args.state_dir, "bpffs_dir": args.bpffs_dir, "log_level": args.log_level}
    notifier = Notifier()
    daemon = Daemon(config, args.config, overrides, notifier)
    # before start: a SIGTERM during the datapath compile stops cleanly once start is done
    # (instead of killing the process half way, which would leave hooks for the next start)
    daemon.signals.install()
    try:
        daemon.start()
    except (PyflowError, OSError) as exc:
        log.error("cannot start: %s", exc)
        notifier.notify(f"STATUS=failed: {exc}")
        daemon.shutdown()
        return EXIT_FAILURE
    try:
        return daemon.run()
    finally:
        daemon.shutdown()

