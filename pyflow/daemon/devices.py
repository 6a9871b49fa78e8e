"""The devices pyflowd should run on, and what it last knew of each.

The wanted list is the union of two sources:

- ``[[device]]`` entries of the config file, owned by the file: a SIGHUP re-reads it
  and the daemon attaches, re-attaches (mode changed) or removes devices to match;
  ``del-device`` refuses them (the file would bring them back at the next reload);
- devices added at run time with ``add-device``, kept in ``STATE_DIR/devices.json``
  (written atomically and durably, mode 0600) so that they survive restarts, until
  ``del-device``. A file of the wrong shape is moved aside to ``devices.json.corrupt``
  (logged with the reason); a file that cannot be read at all leaves the list unsaveable
  until a restart reads it, since saving would overwrite the devices it holds.

A device in both is the config's (its mode wins) and leaves the runtime list. A device
that cannot be attached (missing, wrong mode) stays wanted and is recorded as failed; the
next reload or restart tries again. This module only keeps the lists: attaching is
pyflow.daemon.operations' job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pyflow.daemon.config import ConfigError, DeviceConfig, check_device
from pyflow.datapath.attach.state import private_dir, read_private, set_aside, write_durably
from pyflow.errors import PyflowError

log = logging.getLogger(__name__)

DEVICES_FILE = "devices.json"
DEVICES_VERSION = 1


class DeviceList:
    def __init__(self, configured: Iterable[DeviceConfig], state_dir: str | os.PathLike[str]):
        self.state_dir = Path(state_dir)
        self.configured: dict[str, str] = {d.name: d.mode for d in configured}  # from the config file
        self.unread: str | None = None  # why the saved list could not be read (then never overwritten)
        self.runtime: dict[str, str] = self._read()  # added by add-device
        self.requested: dict[str, str] = {}  # name -> the mode it was last attached with
        self.failed: dict[str, str] = {}  # name -> why the last attach failed

    def _read(self) -> dict[str, str]:
        path = self.state_dir / DEVICES_FILE
        try:
            return read_devices(path)
        except (OSError, UnicodeDecodeError, PyflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.unread = f"{path} could not be read ({reason}); fix it and restart"
            log.error("%s: runtime devices are not restored and add-device/del-device refuse to "
                      "overwrite it", self.unread)
            return {}

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
        """Write the runtime list atomically and durably: a crash leaves the old list or
        the new one, never half of one. OSError when it cannot, or when the list on disk
        was never read (it would be lost)."""
        if self.unread is not None:
            raise OSError(errno.EIO, self.unread)
        try:
            private_dir(self.state_dir, tighten=True)
        except PyflowError as exc:
            raise OSError(errno.EACCES, str(exc)) from None
        data = {"version": DEVICES_VERSION,
                "devices": [{"name": n, "mode": m} for n, m in sorted(self.runtime.items())]}
        write_durably(self.state_dir / DEVICES_FILE, json.dumps(data, indent=1) + "\n")


def read_devices(path: Path) -> dict[str, str]:
    """name -> mode of a saved runtime list. A file of the wrong shape is moved aside
    (``devices.json.corrupt``, logged) and read as empty, so that the daemon starts and the
    devices stay on record; OSError when the file cannot be read or moved aside."""
    text = read_private(path)
    if text is None:
        return {}
    out: dict[str, str] = {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if type(data.get("version")) is not int or data["version"] != DEVICES_VERSION:
            raise ValueError(f"version {data.get('version')!r:.40}, expected {DEVICES_VERSION}")
        entries = data.get("devices")
        if not isinstance(entries, list):
            raise ValueError("devices: not a list")
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"{entry!r:.40} is not a device object")
            dev = check_device(entry.get("name"), entry.get("mode", "auto"), "device")
            out[dev.name] = dev.mode
    except (ConfigError, ValueError, RecursionError) as exc:
        set_aside(path, str(exc))
        return {}
    return out
