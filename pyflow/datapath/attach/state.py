"""The state file: which device runs which mode and holds which tx-port slot.

bpffs holds no regular files, so it lives in a state dir (/run/pyflow by default).
Several processes may manage the same pin dir (a restarting daemon, a CLI); the file is
their shared truth, re-read under an exclusive file lock at the start of every operation
and written back (atomically and durably) before the lock goes.

A root daemon keeps it, so nobody else may touch it: the state dir is owned by the user
running (root), writable by nobody else (the daemon keeps its own at 0700), and its files
are 0600 whatever the umask, so no other user can open them, not even to lock; links are
not followed; the lock is taken without blocking (bounded retries, then an error), so no
process can stall the control loop by holding it. A file of the wrong shape is moved
aside to ``<name>.corrupt`` (and logged) rather than read as empty and overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pyflow.errors import DatapathError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/pyflow"
STATE_VERSION = 1
LOCK_WAIT_S = 1.0   # how long an operation waits for another process's lock before failing
LOCK_RETRY_S = 0.02
CORRUPT_SUFFIX = ".corrupt"


def _owner_name(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def check_dir_stat(st: os.stat_result, path: str, what: str) -> None:
    """Refuse a directory someone else controls: ``st`` (from lstat or an O_NOFOLLOW open)
    must be a directory, not a link, owned by the user running, writable by nobody else."""
    if not stat.S_ISDIR(st.st_mode):
        raise DatapathError(f"{what} {path} is not a directory (a symbolic link is not followed)")
    if st.st_uid != os.geteuid():
        raise DatapathError(f"{what} {path} is owned by {_owner_name(st.st_uid)}, not "
                            f"{_owner_name(os.geteuid())}: refusing it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DatapathError(f"{what} {path} is writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing it")


def private_dir(path: str | os.PathLike[str], what: str = "state dir", *, tighten: bool = False) -> None:
    """Create ``path`` (mode 0700) or check the one there: a directory, not a symbolic link,
    owned by the user running, writable by nobody else (whoever could write it could swap
    the files inside). ``tighten``: the dir is pyflow's own (the daemon's state dir, which
    an older pyflow made 0755), so group and world bits are taken away; never for a
    caller's state file path, whose dir may be /run."""
    path = os.fspath(path)
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DatapathError(f"{what} {path} is not a directory (a symbolic link is not "
                                "followed)") from None
        raise DatapathError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        check_dir_stat(st, path, what)
        if tighten and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """A file of a private dir opened without following a link, mode 0600 whatever the umask
    (checked and set on the open file, not on a path that could be swapped)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise DatapathError(f"{path}: not a regular file of {_owner_name(os.geteuid())}: refusing it")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically and durably: a temporary file written and fsynced,
    renamed over, then the directory fsynced, so that after a crash or power loss the
    file is the old one or the new one, never empty or half written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_private(path: Path) -> str | None:
    """The text of a private file; None when absent. Any other failure raises OSError:
    a file that could not be read must not be taken for an empty one and overwritten."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read().decode("utf-8", errors="strict")
    finally:
        os.close(fd)


def set_aside(path: Path, reason: str) -> None:
    """Keep a file of the wrong shape for the operator as ``<name>.corrupt`` and say so."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, aside)
    log.error("%s is corrupt (%s): moved aside to %s, starting from an empty one", path, reason, aside)


def _check_fields(cls: type, data: Any) -> dict[str, Any]:
    """The fields of dataclass ``cls`` from a JSON object, each of its declared type."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: not an object")
    kinds = {"str": str, "int": int, "bool": bool}
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING:
                continue
            raise ValueError(f"{cls.__name__}.{f.name}: missing")
        value, want = data[f.name], kinds[str(f.type).split()[0]]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"{cls.__name__}.{f.name}: {value!r:.40} is not {want.__name__}")
        out[f.name] = value
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)!r:.80}")
    return out


def _index_map(data: Mapping[str, Any], key: str) -> dict[int, Any]:
    """An object keyed by interface index (a decimal string) -> {ifindex: value}."""
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"{key}: not an object")
    out: dict[int, Any] = {}
    for k, v in table.items():
        if not (isinstance(k, str) and k.isdigit() and 0 < int(k) < 2**31):
            raise ValueError(f"{key}: {k!r:.40} is not an interface index")
        out[int(k)] = v
    return out


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
    def from_json(cls, data: Any) -> State:
        """The state of a parsed file; ValueError naming what is wrong with its shape
        (every field is checked: a wrong type must not surface later as an AttributeError)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if type(data.get("version")) is not int or data["version"] != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r:.40}, expected {STATE_VERSION}")
        devices = {i: Attachment(**_check_fields(Attachment, a))
                   for i, a in _index_map(data, "devices").items()}
        slots = _index_map(data, "slots")
        names = _index_map(data, "names")
        for i, slot in slots.items():
            if type(slot) is not int or slot < 0:
                raise ValueError(f"slots: {slot!r:.40} of {i} is not a slot")
        for i, name in names.items():
            if not isinstance(name, str):
                raise ValueError(f"names: {name!r:.40} of {i} is not a name")
        return cls(devices=devices, slots=slots, names=names)

    def recorded_prog_ids(self) -> set[int]:
        return {a.prog_id for a in self.devices.values() if a.prog_id}


class StateFile:
    """The state file of one pin dir, with its lock file next to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """The file lock against other processes, and the state as the file has it now.
        The lock is tried, not waited for: a holder that keeps it past LOCK_WAIT_S makes
        this operation fail with a DatapathError instead of stalling the caller's loop."""
        private_dir(self.path.parent)
        try:
            fd = open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise DatapathError(f"cannot open {self.lock_path}: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DatapathError(f"{self.lock_path} is locked by another process "
                                            f"(held over {LOCK_WAIT_S:g} s): try again") from None
                    time.sleep(LOCK_RETRY_S)
            yield self.read()
        finally:
            os.close(fd)  # closing the only descriptor releases the lock

    def read(self) -> State:
        try:
            text = read_private(self.path)
        except (OSError, UnicodeDecodeError) as exc:
            # not read is not empty: writing an empty state over it would lose it
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise DatapathError(f"cannot read state file {self.path}: {reason}") from None
        if text is None:
            return State()
        try:
            return State.from_json(json.loads(text))
        except (ValueError, RecursionError) as exc:
            try:
                set_aside(self.path, str(exc))
            except OSError as err:
                raise DatapathError(f"state file {self.path} is corrupt ({exc}) and cannot be moved "
                                    f"aside: {err.strerror}") from None
            return State()

    def write(self, state: State) -> None:
        write_durably(self.path, json.dumps(state.to_json(), indent=1) + "\n")

    def remove(self) -> None:
        for p in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
