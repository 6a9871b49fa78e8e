"""The devices pyflowd should run on, and what it last knew of each.

The wanted list is the union of two sources:

- ``[[device]]`` entries of the config file, owned by the file: a SIGHUP re-reads it
  and the daemon attaches, re-attaches (mode changed) or removes devices to match;
  ``del-device`` refuses them (the file would bring them back at the next reload);
- devices added at run time with ``add-device``, kept in ``STATE_DIR/devices.json``
  (written atomically) so that they survive restarts, until ``del-device``.

A device in both is the config's (its mode wins) and leaves the runtime list. A device
that cannot be attached (missing, wrong mode) stays wanted and is recorded as failed; the
next reload or restart tries again. This module only keeps the lists: attaching is
pyflow.daemon.operations' job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pyflow.daemon.config import ConfigError, DeviceConfig, check_device

log = logging.getLogger(__name__)

DEVICES_FILE = "devices.json"
DEVICES_VERSION = 1


class DeviceList:
    def __init__(self, configured: Iterable[DeviceConfig], state_dir: str | os.PathLike[str]):
        self.state_dir = Path(state_dir)
        self.configured: dict[str, str] = {d.name: d.mode for d in configured}  # from the config file
        self.runtime: dict[str, str] = read_devices(self.state_dir / DEVICES_FILE)  # added by add-device
        self.requested: dict[str, str] = {}  # name -> the mode it was last attached with
        self.failed: dict[str, str] = {}  # name -> why the last attach failed

    def set_configured(self, devices: Iterable[DeviceConfig]) -> None:
        """A re-read config file's list; a runtime device it names is the file's from now
        on (save() makes the list on disk follow)."""
        self.configured = {d.name: d.mode for d in devices}
        for name in self.configured:
            self.runtime.pop(name, None)

    def wanted(self) -> dict[str, tuple[str, str]]:
        """name -> (mode, source) of every device that should run the datapath."""
        out = {n: (m, "runtime") for n, m in self.runtime.items()}
        out.update({n: (m, "config") for n, m in self.configured.items()})
        return out

    def origin(self, name: str) -> tuple[str, str]:
        """(mode, source) of a device shown: wanted, or found attached (adopted)."""
        return self.wanted().get(name, (self.requested.get(name, "auto"), "adopted"))

    def forget_unwanted_failures(self) -> None:
        wanted = self.wanted()
        self.failed = {n: e for n, e in self.failed.items() if n in wanted}

    def save(self) -> None:
        """Write the runtime list atomically: a crash leaves the old list or the new one,
        never half of one."""
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


def read_devices(path: Path) -> dict[str, str]:
    """name -> mode of a saved runtime list; an unreadable or invalid file is logged and
    read as empty (the daemon must start; the operator re-adds)."""
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
