"""The state file: which device runs which mode and holds which tx-port slot.

bpffs holds no regular files, so it lives in a state dir (/run/pyflow by default).
Several processes may manage the same pin dir (a restarting daemon, a CLI); the file is
their shared truth, re-read under an exclusive file lock at the start of every operation
and written back (atomically) before the lock goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/pyflow"
STATE_VERSION = 1


@dataclass
class Attachment:
    """One device running the datapath, as the state file records it."""

    ifname: str
    ifindex: int
    mode: str          # native | generic | tc
    prog_id: int       # program id seen on the device when we last attached or adopted
    reason: str        # why this mode (auto's rule, or "asked for native")
    own_clsact: bool = False  # we created the clsact qdisc, so detach may remove it
    hw: bool = False   # flows are placed as flower rules here too (mode is the software hook)


@dataclass(frozen=True)
class DeviceStatus:
    ifname: str
    ifindex: int
    mode: str | None   # None: holds a tx-port slot only (a redirect target)
    prog_id: int
    slot: int | None
    reason: str
    hw: bool = False   # a hardware device: the control plane places flower rules on it


@dataclass
class State:
    devices: dict[int, Attachment] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)   # ifindex -> tx-port slot
    names: dict[int, str] = field(default_factory=dict)   # ifindex -> name, for slot-only devices

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "devices": {str(i): asdict(a) for i, a in sorted(self.devices.items())},
            "slots": {str(i): s for i, s in sorted(self.slots.items())},
            "names": {str(i): n for i, n in sorted(self.names.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        return cls(
            devices={int(i): Attachment(**a) for i, a in data.get("devices", {}).items()},
            slots={int(i): int(s) for i, s in data.get("slots", {}).items()},
            names={int(i): str(n) for i, n in data.get("names", {}).items()},
        )

    def recorded_prog_ids(self) -> set[int]:
        return {a.prog_id for a in self.devices.values() if a.prog_id}


class StateFile:
    """The state file of one pin dir, with its lock file next to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """The file lock against other processes, and the state as the file has it now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                yield self.read()
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def read(self) -> State:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return State()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return State()
        try:
            return State.from_json(data)
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("ignoring state file %s: %s", self.path, exc)
            return State()

    def write(self, state: State) -> None:
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state.to_json(), indent=1) + "\n")
        os.replace(tmp, self.path)  # atomic: a reader sees the old or the new file

    def remove(self) -> None:
        for p in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
