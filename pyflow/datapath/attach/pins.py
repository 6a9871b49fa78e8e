"""The pin dir: bpffs, the directory the maps and programs are pinned in, and the pins.

The datapath's loader creates the maps pinned there, or adopts the pins: libbpf's load of
the prebuilt object (csrc/loader.c) by default, bcc's BPF_TABLE_PINNED in the bcc build.
The programs are pinned next to them (``prog_xdp``, ``prog_tc``) so that the next process
can tell which program on a device is pyflow's, name it as the expected program of an XDP
replace, and (prebuilt, same object and map sizes) reuse it without loading it again.
"""

from __future__ import annotations

import contextlib
import logging
import os

from pyflow._native import ffi, lib
from pyflow.datapath.abi import FLOW_SIZE, KEY_SIZE, MAP_FLOWS, MAP_STATS, MAP_TX_PORTS
from pyflow.datapath.attach.state import check_dir_stat
from pyflow.errors import DatapathError

log = logging.getLogger(__name__)

BPFFS_ROOT = "/sys/fs/bpf"
DEFAULT_PIN_DIR = f"{BPFFS_ROOT}/pyflow"
PIN_XDP = "prog_xdp"
PIN_TC = "prog_tc"
BPF_FS_TYPE = "bpf"
ALL_PINS = (PIN_XDP, PIN_TC, MAP_FLOWS, MAP_STATS, MAP_TX_PORTS)
# (key size, value size, entries or None: the pinned map's own) of each map this build's
# programs and control plane expect; a pinned map of another shape is another version's
MAP_SHAPES: dict[str, tuple[int, int, int | None]] = {
    MAP_FLOWS: (KEY_SIZE, FLOW_SIZE, None),
    MAP_STATS: (4, ffi.sizeof("struct pyflow_stat"), lib.PYFLOW_R__COUNT),
    MAP_TX_PORTS: (4, 4, None),
}


def bpffs_mounted(path: str = BPFFS_ROOT) -> bool:
    """True when a bpf filesystem is mounted exactly at ``path`` (per /proc/mounts)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == path and parts[2] == BPF_FS_TYPE:
                return True
    return False


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the mount that holds ``path``."""
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return best, fstype


def ensure_bpffs(path: str = BPFFS_ROOT) -> None:
    """Mount bpffs at ``path`` unless one is there (distributions do not always)."""
    if bpffs_mounted(path):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(path, exist_ok=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"cannot mount bpffs at {path}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", path)


def fd_prog_id(fd: int) -> int:
    """The kernel id of the BPF program behind ``fd`` (from /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise DatapathError(f"fd {fd} is not a BPF program")


class PinDir:
    """One pin dir on bpffs and the pins in it."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self._aside: dict[str, int] = {}  # pin name -> fd of a map set aside (set_aside_other_shapes)

    def prepare(self) -> bool:
        """Mount bpffs if needed and create the pin dir; True if the dir is new."""
        if self.path == BPFFS_ROOT or self.path.startswith(BPFFS_ROOT + "/"):
            ensure_bpffs(BPFFS_ROOT)
        made = not os.path.isdir(self.path)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatapathError(f"cannot create pin dir {self.path}: {exc.strerror}") from None
        self._check_owner()
        mnt, fstype = mount_of(self.path)
        if fstype != BPF_FS_TYPE:
            if made:
                os.rmdir(self.path)
            raise DatapathError(f"pin dir {self.path} is not on a bpf filesystem ({mnt} is {fstype})")
        return made

    def _check_owner(self) -> None:
        """The pin dir must be ours: /sys/fs/bpf is often world-writable, so any user could
        have planted a symbolic link or a directory of their own there for us to adopt (and
        then swap the pins we trust). lstat: a link is refused, never followed."""
        check_dir_stat(os.lstat(self.path), self.path, "pin dir")

    def entries(self) -> set[str]:
        return set(os.listdir(self.path))

    def set_aside_other_shapes(self) -> list[str]:
        """Unpin the maps whose shape is not MAP_SHAPES' (pinned by a pyflow whose flow map
        had another layout), holding an fd of each: the loaders would adopt them, and the
        programs or the control plane could not use them. The load then makes new maps;
        undo() pins the old ones back, release_aside() lets them go. Their flows are not
        lost: the first resync offloads again what conntrack still holds. Returns the
        names set aside."""
        for name, (key_size, value_size, entries) in MAP_SHAPES.items():
            fd = self.pinned_fd(name)
            if fd is None:
                continue
            info = ffi.new("struct pyflow_map_info *")
            known = lib.pyflow_map_info(fd, info) == 0
            if known and (info.key_size, info.value_size) == (key_size, value_size) \
                    and entries in (None, info.max_entries):
                lib.pyflow_close(fd)
                continue
            log.warning("pinned map %s has key/value size %d/%d and %d entries, this datapath's %d/%d%s "
                        "(another pyflow version): making a new one, its flows are offloaded again "
                        "from conntrack", self.pin_path(name), info.key_size, info.value_size,
                        info.max_entries, key_size, value_size, f" and {entries} entries" if entries else "")
            try:
                os.unlink(self.pin_path(name))
            except OSError as exc:
                lib.pyflow_close(fd)
                raise DatapathError(f"cannot unpin {self.pin_path(name)}: {exc.strerror}") from None
            self._aside[name] = fd
        return sorted(self._aside)

    def release_aside(self) -> None:
        """The load that replaced the maps set aside succeeded: their fds go."""
        for fd in self._aside.values():
            lib.pyflow_close(fd)
        self._aside = {}

    def undo(self, before: set[str], made_dir: bool) -> None:
        """Remove what appeared since ``before`` (and the dir if it was new): bcc pins each
        map as it creates it, and a failure half way must not leave new pins behind for the
        next start to adopt. Old pins stay untouched; maps set aside are pinned back."""
        for entry in self.entries() - before:
            with contextlib.suppress(OSError):
                os.unlink(self.pin_path(entry))
        for name, fd in self._aside.items():
            if lib.pyflow_obj_pin(fd, self.pin_path(name).encode()) < 0:
                log.error("could not pin %s back after the failed load", self.pin_path(name))
        self.release_aside()
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def pin_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def pinned_fd(self, name: str) -> int | None:
        fd = lib.pyflow_obj_get(self.pin_path(name).encode())
        return fd if fd >= 0 else None

    def pinned_prog_id(self, name: str) -> int | None:
        """The id of the program pinned as ``name``; None when nothing (usable) is."""
        fd = self.pinned_fd(name)
        if fd is None:
            return None
        try:
            return fd_prog_id(fd)
        except DatapathError:
            return None
        finally:
            lib.pyflow_close(fd)

    def pin_prog(self, name: str, fd: int, prog_id: int, *, only_missing: bool = False) -> None:
        """Point pin ``name`` at the program ``fd`` (atomically: pin aside, rename over),
        unless it names that program already (or names any, with only_missing)."""
        path = self.pin_path(name)
        old = self.pinned_fd(name)
        if old is not None:
            same = fd_prog_id(old) == prog_id
            lib.pyflow_close(old)
            if same or only_missing:
                return
        tmp = f"{path}_tmp{os.getpid()}"  # bpffs refuses names with a dot
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        rc = lib.pyflow_obj_pin(fd, tmp.encode())
        if rc < 0:
            raise DatapathError(f"cannot pin program at {tmp}: {os.strerror(-rc)}")
        os.rename(tmp, path)

    def remove(self) -> None:
        """Unlink pyflow's pins and the dir (if nothing else is left in it)."""
        for name in ALL_PINS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pin_path(name))
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
