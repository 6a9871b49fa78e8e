"""Loading the datapath and attaching it to devices.

One :class:`Datapath` compiles ebpf/pyflow_xdp.c once (bcc), loads its two
entry points (``pyflow_xdp`` for the XDP hook, ``pyflow_tc`` for TC ingress)
and attaches them to devices in one of three modes:

``native``   XDP in the driver (IFLA_XDP with XDP_FLAGS_DRV_MODE)
``generic``  XDP after the skb is built (XDP_FLAGS_SKB_MODE), for any device
``tc``       a cls_bpf direct-action filter on the device's clsact ingress hook
``auto``     chosen per device by :func:`pyflow.datapath.netdev.choose_mode`; hw as well
             when the device reports hw-tc-offload on
``hw``       flower rules in the NIC (pyflow.hw), plus the software hook ``auto``
             would pick, which carries every flow the NIC refuses. Refused on a
             device without hw-tc-offload, unless ``hw_skip_hw`` (the rules then
             run in the kernel's software flower: labs and tests)

Persistence: the maps are created pinned under the pin dir (or adopted from
the pins, bcc's BPF_TABLE_PINNED), the programs are pinned there too
(``prog_xdp``, ``prog_tc``), and a JSON state file (bpffs holds no regular
files, so it lives in a state dir, /run/pyflow by default) records which
device runs which mode and owns which tx-port slot. A restarted process reads
it, checks it against the devices and the devmap, and so adopts the running
datapath without touching traffic: the programs stay attached while no process
runs, the next :meth:`Datapath.attach` swaps in the new programs atomically.

Every attached device holds a slot in the tx-port devmap (value = its
ifindex), whatever its own mode: XDP on *another* device redirects into it
through that slot. Devices that are only redirect targets can hold a slot
without being attached (:meth:`Datapath.reserve_tx_port`).

A Datapath works in the network namespace of the thread that created it (its
netlink socket lives there and devmap ifindexes are resolved there); calls
from a thread in another namespace are refused. bpffs is not per namespace:
datapaths in different namespaces need different pin dirs and state files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyflow._native import ffi, lib
from pyflow.datapath import bpfsource, netdev
from pyflow.datapath.abi import MAP_FLOWS, MAP_STATS, MAP_TX_PORTS, REASONS
from pyflow.errors import DatapathError, DeviceError

log = logging.getLogger(__name__)

BPFFS_ROOT = "/sys/fs/bpf"
DEFAULT_PIN_DIR = f"{BPFFS_ROOT}/pyflow"
DEFAULT_STATE_DIR = "/run/pyflow"
PIN_XDP = "prog_xdp"
PIN_TC = "prog_tc"
STATE_VERSION = 1
BPF_FS_TYPE = "bpf"

# XDP attach flags (uapi/linux/if_link.h)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
# IFLA_XDP_ATTACHED values as pyroute2 names them, per mode
_XDP_ATTACHED = {"native": "xdp", "generic": "xdpgeneric"}
_XDP_FLAG = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_ATTACHED_MODE = {v: k for k, v in _XDP_ATTACHED.items()}

# TC: our filter sits at a fixed priority and handle on clsact ingress, so that
# re-attaching is a plain "replace" of that one filter. The priority is far from
# the 1..10 people type by hand and from tc's automatic ones (49152 and down).
TC_PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_PARENT_EGRESS = 0xFFFFFFF3
TC_CLSACT_HANDLE = 0xFFFF0000
TC_PRIO = 0x2F10
TC_HANDLE = 1
TC_NAME = bpfsource.TC_FUNC
ETH_P_ALL = 0x0003
TCA_OPTIONS = 2
TCA_BPF_ID = 11  # pyroute2 0.9.7 does not decode it: read from the raw attribute


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
class _State:
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
    def from_json(cls, data: Mapping[str, Any]) -> _State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        return cls(
            devices={int(i): Attachment(**a) for i, a in data.get("devices", {}).items()},
            slots={int(i): int(s) for i, s in data.get("slots", {}).items()},
            names={int(i): str(n) for i, n in data.get("names", {}).items()},
        )


# ---- small kernel facts ---------------------------------------------------------

def bpffs_mounted(path: str = BPFFS_ROOT) -> bool:
    """True when a bpf filesystem is mounted exactly at ``path`` (per /proc/mounts)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == path and parts[2] == BPF_FS_TYPE:
                return True
    return False


def _mount_of(path: str) -> tuple[str, str]:
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


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _nl_text(exc: Exception) -> str:
    """The kernel's extack text if it sent one, else strerror."""
    code = getattr(exc, "code", 0)
    text = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else ""
    # errno.errorcode says ENOTSUP for 95; the kernel (and its docs) say EOPNOTSUPP
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, str(code))
    return f"{text or os.strerror(code)} ({name})"


def _raw_u32_attr(nla_obj, attr_type: int) -> int | None:
    """Value of a u32 attribute nested in ``nla_obj``, read from its raw bytes."""
    data, start, length = nla_obj.data, nla_obj.offset, nla_obj.length
    pos, end = start + 4, start + length
    while pos + 4 <= end:
        alen = int.from_bytes(data[pos:pos + 2], "little")
        atype = int.from_bytes(data[pos + 2:pos + 4], "little") & 0x3FFF
        if alen < 4:
            break
        if atype == attr_type and alen >= 8:
            return int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += (alen + 3) & ~3
    return None


def _load_summary(text: str) -> str:
    """The verifier's complaint: the last log line before its 'processed N insns' trailer."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("processed ") and i > 0:
            return lines[i - 1]
    return lines[-1] if lines else ""


# ---- the datapath ---------------------------------------------------------------

class Datapath:
    """The loaded datapath: maps, both programs, and the devices they run on."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, *, state_file: str | None = None,
                 defines: Mapping[str, int] | None = None, hw_skip_hw: bool = False) -> None:
        self.pin_dir = pin_dir.rstrip("/")
        self.hw_skip_hw = hw_skip_hw  # hw mode without hw-tc-offload: software flower rules
        name = os.path.basename(self.pin_dir) or "pyflow"
        self.state_file = Path(state_file) if state_file else Path(DEFAULT_STATE_DIR) / f"{name}.json"
        self._lock = threading.RLock()
        self._netns = _netns_inode()
        self._closed = False
        self._bpf: Any = None
        self._ipr: Any = None
        made_dir = self._prepare_pin_dir()
        before = set(os.listdir(self.pin_dir))
        try:
            self._bpf = bpfsource.compile_datapath(pin_dir=self.pin_dir, defines=defines)
        except DatapathError:
            # bcc pins each map as it creates it: a failure half way must not leave
            # new pins behind for the next start to adopt (old pins stay untouched)
            for entry in set(os.listdir(self.pin_dir)) - before:
                with contextlib.suppress(OSError):
                    os.unlink(self._pin_path(entry))
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self.pin_dir)
            raise
        try:
            from bcc import BPF

            self._xdp = self._load(bpfsource.XDP_FUNC, BPF.XDP)
            self._tc = self._load(bpfsource.TC_FUNC, BPF.SCHED_CLS)
            self.xdp_prog_id = fd_prog_id(self._xdp.fd)
            self.tc_prog_id = fd_prog_id(self._tc.fd)
            # bcc wants bytes names (str works but warns)
            self.flows = self._bpf[MAP_FLOWS.encode()]
            self.stats = self._bpf[MAP_STATS.encode()]
            self.tx_ports = self._bpf[MAP_TX_PORTS.encode()]
            self.max_tx_ports = self._map_info(self.tx_ports).max_entries
            from pyroute2 import IPRoute

            self._ipr = IPRoute(ext_ack=True)
            self._state = _State()
            with self._op():
                self._pin_progs(only_missing=True)
                self._adopt()
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------

    def _prepare_pin_dir(self) -> bool:
        """Mount bpffs if needed and create the pin dir; True if the dir is new."""
        if self.pin_dir == BPFFS_ROOT or self.pin_dir.startswith(BPFFS_ROOT + "/"):
            ensure_bpffs(BPFFS_ROOT)
        made = not os.path.isdir(self.pin_dir)
        try:
            os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatapathError(f"cannot create pin dir {self.pin_dir}: {exc.strerror}") from None
        mnt, fstype = _mount_of(self.pin_dir)
        if fstype != BPF_FS_TYPE:
            if made:
                os.rmdir(self.pin_dir)
            raise DatapathError(f"pin dir {self.pin_dir} is not on a bpf filesystem ({mnt} is {fstype})")
        return made

    def _load(self, func: str, prog_type: int):
        captured = io.StringIO()
        try:
            with bpfsource._capture_stderr(captured):
                return self._bpf.load_func(func.encode(), prog_type)
        except Exception as exc:
            detail = _load_summary(captured.getvalue()) or str(exc)
            raise DatapathError(f"datapath load of {func} failed: {detail}") from exc

    @staticmethod
    def _map_info(table):
        info = ffi.new("struct pyflow_map_info *")
        rc = lib.pyflow_map_info(table.map_fd, info)
        if rc < 0:
            raise DatapathError(f"cannot read map info: {os.strerror(-rc)}")
        return info

    # -- locking and state file -------------------------------------------------

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """One operation: thread lock, file lock against other processes, fresh state.

        Several processes may manage the same pin dir (a restarting daemon, a
        CLI); the state file is their shared truth, re-read under the lock.
        """
        if self._closed:
            raise DatapathError(f"datapath {self.pin_dir} is closed")
        if _netns_inode() != self._netns:
            raise DatapathError(
                f"datapath {self.pin_dir} belongs to network namespace net:[{self._netns}], "
                f"called from net:[{_netns_inode()}]")
        with self._lock:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.state_file.with_name(self.state_file.name + ".lock")
            with open(lock_path, "a") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    self._state = self._read_state()
                    yield
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)

    def _read_state(self) -> _State:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.state_file, exc)
            return _State()
        try:
            return _State.from_json(data)
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("ignoring state file %s: %s", self.state_file, exc)
            return _State()

    def _write_state(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._state.to_json(), indent=1) + "\n")
        os.replace(tmp, self.state_file)  # atomic: a reader sees the old or the new file

    # -- program pins and ownership ----------------------------------------------

    def _pin_path(self, name: str) -> str:
        return f"{self.pin_dir}/{name}"

    def _pinned_fd(self, name: str) -> int | None:
        fd = lib.pyflow_obj_get(self._pin_path(name).encode())
        return fd if fd >= 0 else None

    def _pin_progs(self, only_missing: bool = False) -> None:
        """Point prog_xdp / prog_tc at our programs (atomically: pin aside, rename over).

        The pins let the next process find the programs that run on the devices,
        and give it an fd to name as the expected program in an XDP replace.
        """
        for pin, fd, prog_id in ((PIN_XDP, self._xdp.fd, self.xdp_prog_id),
                                 (PIN_TC, self._tc.fd, self.tc_prog_id)):
            path = self._pin_path(pin)
            old = self._pinned_fd(pin)
            if old is not None:
                same = fd_prog_id(old) == prog_id
                lib.pyflow_close(old)
                if same or only_missing:
                    continue
            tmp = f"{path}_tmp{os.getpid()}"  # bpffs refuses names with a dot
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            rc = lib.pyflow_obj_pin(fd, tmp.encode())
            if rc < 0:
                raise DatapathError(f"cannot pin program at {tmp}: {os.strerror(-rc)}")
            os.rename(tmp, path)

    def _known_prog_ids(self) -> set[int]:
        """Program ids that are ours: this instance's, the pinned ones, those in the state file."""
        ids = {self.xdp_prog_id, self.tc_prog_id}
        for pin in (PIN_XDP, PIN_TC):
            fd = self._pinned_fd(pin)
            if fd is not None:
                with contextlib.suppress(DatapathError):
                    ids.add(fd_prog_id(fd))
                lib.pyflow_close(fd)
        ids.update(a.prog_id for a in self._state.devices.values() if a.prog_id)
        ids.discard(0)
        return ids

    @contextlib.contextmanager
    def _fd_of_prog(self, prog_id: int) -> Iterator[int | None]:
        """An fd for program ``prog_id`` if we can get one (ours or pinned), else None."""
        if prog_id == self.xdp_prog_id:
            yield self._xdp.fd
            return
        fd = self._pinned_fd(PIN_XDP)
        try:
            if fd is not None and fd_prog_id(fd) == prog_id:
                yield fd
            else:
                yield None
        finally:
            if fd is not None:
                lib.pyflow_close(fd)

    # -- XDP through rtnetlink --------------------------------------------------------

    def _xdp_set(self, facts: netdev.DeviceFacts, fd: int, flags: int, expected_fd: int | None,
                 what: str, mode: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
        if expected_fd is not None:
            flags |= XDP_FLAGS_REPLACE
            attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
        attrs.append(("IFLA_XDP_FLAGS", flags))
        try:
            self._ipr.link("set", index=facts.ifindex, xdp={"attrs": attrs})
        except NetlinkError as exc:
            err = DeviceError(f"{facts.ifname}: cannot {what} XDP in {mode} mode: {_nl_text(exc)}")
            err.errno = exc.code  # type: ignore[attr-defined]
            raise err from None

    def _xdp_install(self, facts: netdev.DeviceFacts, mode: str) -> None:
        """Put our XDP program on the device in ``mode``.

        When one of ours already runs there in that mode it is swapped in one
        netlink request: the kernel exchanges the program pointer, so no packet
        meets a device without a program. XDP_FLAGS_REPLACE with the old program
        as expected fd makes the swap a compare-and-exchange (it fails rather
        than clobber a program someone else attached meanwhile); without an fd
        for the old program (an older generation that is no longer pinned) it is
        a plain replace, which is just as atomic.
        """
        flags = _XDP_FLAG[mode]
        if facts.xdp_prog_id and _ATTACHED_MODE.get(facts.xdp_mode or "") == mode:
            with self._fd_of_prog(facts.xdp_prog_id) as old_fd:
                self._xdp_set(facts, self._xdp.fd, flags, old_fd, "replace", mode)
        else:
            self._xdp_set(facts, self._xdp.fd, flags | XDP_FLAGS_UPDATE_IF_NOEXIST, None, "attach", mode)

    def _xdp_remove(self, facts: netdev.DeviceFacts) -> None:
        mode = _ATTACHED_MODE.get(facts.xdp_mode or "")
        if not facts.xdp_prog_id or mode is None:
            return
        with self._fd_of_prog(facts.xdp_prog_id) as old_fd:
            self._xdp_set(facts, -1, _XDP_FLAG[mode], old_fd, "detach", mode)

    # -- TC through rtnetlink ---------------------------------------------------------

    def _tc_filter(self, ifindex: int) -> tuple[str | None, int] | None:
        """(name, prog id) of the filter at our prio/handle on clsact ingress, or None."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = self._ipr.get_filters(ifindex, parent=TC_PARENT_INGRESS)
        except NetlinkError:
            return None  # no clsact qdisc: nothing can be there
        for m in msgs:
            if m["handle"] != TC_HANDLE or (m["info"] >> 16) != TC_PRIO:
                continue
            if m.get_attr("TCA_KIND") != "bpf":
                return ("(" + str(m.get_attr("TCA_KIND")) + ")", 0)
            opts = m.get_attr("TCA_OPTIONS")
            if opts is None:
                return (None, 0)
            return (opts.get_attr("TCA_BPF_NAME"), _raw_u32_attr(opts, TCA_BPF_ID) or 0)
        return None

    def _qdisc_kind(self, ifindex: int) -> str | None:
        """Kind of the qdisc at handle ffff: (clsact or ingress), None when absent."""
        for q in self._ipr.get_qdiscs(ifindex):
            if q["handle"] == TC_CLSACT_HANDLE:
                return q.get_attr("TCA_KIND")
        return None

    def _tc_install(self, facts: netdev.DeviceFacts) -> bool:
        """Put our filter on clsact ingress (replace if there); True if we made the qdisc."""
        from pyroute2.netlink.exceptions import NetlinkError

        made = False
        kind = self._qdisc_kind(facts.ifindex)
        if kind is None:
            try:
                self._ipr.tc("add", "clsact", facts.ifindex)
                made = True
            except NetlinkError as exc:
                raise DeviceError(f"{facts.ifname}: cannot add clsact qdisc: {_nl_text(exc)}") from None
        elif kind != "clsact":
            raise DeviceError(f"{facts.ifname}: has an {kind} qdisc at ffff:, pyflow needs clsact")
        current = self._tc_filter(facts.ifindex)
        if current is not None and current[0] != TC_NAME:
            if made:
                self._tc_drop_qdisc(facts.ifindex)
            raise DeviceError(f"{facts.ifname}: another filter ({current[0]}) holds TC prio "
                              f"{TC_PRIO} handle {TC_HANDLE} on ingress")
        try:
            # "replace" swaps the classifier's program under RCU: the filter never disappears
            self._ipr.tc("replace-filter", "bpf", facts.ifindex, TC_HANDLE, fd=self._tc.fd, name=TC_NAME,
                         parent=TC_PARENT_INGRESS, prio=TC_PRIO, protocol=ETH_P_ALL, direct_action=True)
        except NetlinkError as exc:
            if made:
                self._tc_drop_qdisc(facts.ifindex)
            raise DeviceError(f"{facts.ifname}: cannot attach TC filter: {_nl_text(exc)}") from None
        return made

    def _tc_remove(self, ifindex: int, ifname: str, drop_qdisc: bool) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        current = self._tc_filter(ifindex)
        if current is not None and current[0] == TC_NAME:
            try:
                self._ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=TC_PARENT_INGRESS,
                             prio=TC_PRIO, protocol=ETH_P_ALL)
            except NetlinkError as exc:
                raise DeviceError(f"{ifname}: cannot remove TC filter: {_nl_text(exc)}") from None
        if drop_qdisc:
            self._tc_drop_qdisc(ifindex)

    def _tc_drop_qdisc(self, ifindex: int) -> None:
        """Remove the clsact qdisc we made, unless someone else's filters now live on it."""
        from pyroute2.netlink.exceptions import NetlinkError

        if self._qdisc_kind(ifindex) != "clsact":
            return
        for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
            with contextlib.suppress(NetlinkError):
                if any(m["handle"] for m in self._ipr.get_filters(ifindex, parent=parent)):
                    return
        with contextlib.suppress(NetlinkError):
            self._ipr.tc("del", "clsact", ifindex)

    # -- tx-port slots ------------------------------------------------------------

    def _devmap_get(self, slot: int) -> int | None:
        try:
            return int(self.tx_ports[self.tx_ports.Key(slot)].value)
        except KeyError:
            return None

    def _devmap_set(self, slot: int, ifindex: int, ifname: str) -> None:
        try:
            self.tx_ports[self.tx_ports.Key(slot)] = self.tx_ports.Leaf(ifindex)
        except Exception as exc:  # bcc raises a bare Exception with strerror
            raise DeviceError(f"{ifname}: cannot enter tx-port slot {slot}: {exc}") from None

    def _devmap_clear(self, slot: int) -> None:
        with contextlib.suppress(KeyError):
            del self.tx_ports[self.tx_ports.Key(slot)]

    def _take_slot(self, ifindex: int, ifname: str) -> tuple[int, bool]:
        """(slot, newly taken). The devmap entry is written before any hook runs, so
        no flow can ever point XDP at an empty slot of an attached device."""
        st = self._state
        if ifindex in st.slots:
            slot = st.slots[ifindex]
            if self._devmap_get(slot) != ifindex:
                self._devmap_set(slot, ifindex, ifname)
            return slot, False
        used = set(st.slots.values())
        free = next((s for s in range(self.max_tx_ports) if s not in used), None)
        if free is None:
            raise DatapathError(f"{ifname}: tx-port map {MAP_TX_PORTS} is full ({self.max_tx_ports} slots)")
        self._devmap_set(free, ifindex, ifname)
        st.slots[ifindex] = free
        st.names[ifindex] = ifname
        return free, True

    def _free_slot(self, ifindex: int) -> None:
        slot = self._state.slots.pop(ifindex, None)
        self._state.names.pop(ifindex, None)
        if slot is not None:
            self._devmap_clear(slot)

    # -- adoption -----------------------------------------------------------------

    def _adopt(self) -> None:
        """Reconcile the state file with the devices and the devmap (at start-up).

        Kept: devices that still exist under the recorded ifindex and still run
        one of our programs in the recorded mode (their prog id is refreshed).
        Dropped: the rest, with their slots. Found: devices running one of our
        programs that the state does not list (a lost state file). Then the
        devmap is made to hold exactly the recorded slots.
        """
        st = self._state
        known = self._known_prog_ids()
        for ifindex, att in list(st.devices.items()):
            live = self._live_attachment(ifindex)
            if live is None or live[1] not in known:
                log.warning("%s (ifindex %d): %s attachment gone, forgetting it",
                            att.ifname, ifindex, att.mode)
                del st.devices[ifindex]
                continue
            att.mode, att.prog_id = live[0], live[1]
            att.ifname = live[2]
            st.names[ifindex] = live[2]
        for ifindex in list(st.slots):
            if ifindex not in st.devices:
                try:
                    facts = netdev.read_facts(self._ipr, ifindex=ifindex)
                except DeviceError:
                    self._free_slot(ifindex)
                    continue
                st.names[ifindex] = facts.ifname
        for msg in self._ipr.link("dump"):
            facts = netdev.facts_from_msg(msg)
            if facts.ifindex in st.devices:
                continue
            live = self._live_attachment(facts.ifindex, facts)
            if live is not None and live[1] in known:
                st.devices[facts.ifindex] = Attachment(facts.ifname, facts.ifindex, live[0], live[1],
                                                       "adopted: found running on the device")
                log.info("%s: adopted a running %s attachment", facts.ifname, live[0])
        entries = [(slot, self._devmap_get(slot)) for slot in range(self.max_tx_ports)]
        on_map: dict[int, int] = {}  # ifindex -> slot, as the pinned devmap holds them
        for slot, have in entries:
            if have is not None:
                on_map.setdefault(have, slot)
        for ifindex, att in st.devices.items():
            # without a state entry (lost file) keep the slot the devmap still has:
            # flows installed before the restart point at it
            kept = on_map.get(ifindex)
            if ifindex not in st.slots and kept is not None and kept not in st.slots.values():
                st.slots[ifindex] = kept
                st.names[ifindex] = att.ifname
            self._take_slot(ifindex, att.ifname)
        wanted = {s: i for i, s in st.slots.items()}
        for slot, have in entries:
            if have is not None and wanted.get(slot) != have:
                self._devmap_clear(slot)
        self._write_state()

    def _live_attachment(self, ifindex: int, facts: netdev.DeviceFacts | None = None
                         ) -> tuple[str, int, str] | None:
        """(mode, prog id, ifname) of the pyflow hook the device runs, or None.

        XDP wins over TC when both are present (a crash between the two halves
        of a mode switch): XDP sees the packets first.
        """
        if facts is None:
            try:
                facts = netdev.read_facts(self._ipr, ifindex=ifindex)
            except DeviceError:
                return None
        mode = _ATTACHED_MODE.get(facts.xdp_mode or "")
        if mode is not None and facts.xdp_prog_id:
            return mode, facts.xdp_prog_id, facts.ifname
        tc = self._tc_filter(ifindex)
        if tc is not None and tc[0] == TC_NAME:
            return "tc", tc[1], facts.ifname
        return None

    # -- public API ---------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> DeviceStatus:
        """Run the datapath on ``ifname`` in ``mode``; returns the device's status.

        Re-attaching a device that runs our program replaces it atomically (XDP:
        one netlink request swapping the program, see ``_xdp_install``; TC: a
        filter replace). A mode switch attaches the new hook first and removes
        the old one after. The brief overlap is harmless: both programs share the
        flow map, so they take the same decision, and a packet XDP redirected
        never reaches TC ingress of that device (while a packet XDP passed meets
        the TC program, which forwards it exactly as XDP would have). Native and
        generic XDP cannot both be on one device (the kernel refuses), so a
        switch between them goes through TC: TC in, old XDP out, new XDP in,
        TC out.

        Raises DeviceError (missing device, bad mode, a mode the device cannot
        run, a foreign program in the way) or DatapathError; on error the device,
        the devmap and the state file are as they were.
        """
        if mode not in netdev.ALL_MODES:
            raise DeviceError(f"unknown attach mode {mode!r} for {ifname}: "
                              f"use native, generic, tc, hw or auto")
        with self._op():
            facts = netdev.read_facts(self._ipr, ifname)
            reason = f"asked for {mode}"
            fallback = False
            hw = False
            if mode in ("hw", "auto"):
                hw, hw_reason = self._hw_choice(ifname, asked=mode == "hw")
                mode, reason = netdev.choose_mode(facts)
                fallback = mode == "native"
                if hw:
                    reason = f"{hw_reason}; software hook for refused flows: {reason}"
            known = self._known_prog_ids()
            if facts.xdp_prog_id and facts.xdp_prog_id not in known and mode != "tc":
                raise DeviceError(f"{ifname}: runs another XDP program (id {facts.xdp_prog_id}), "
                                  f"not replacing it")
            before = self._state.devices.get(facts.ifindex)
            slot, new_slot = self._take_slot(facts.ifindex, facts.ifname)
            try:
                try:
                    own_clsact = self._switch(facts, before, mode, known)
                except DeviceError as exc:
                    if not (fallback and getattr(exc, "errno", 0) == errno.EOPNOTSUPP):
                        raise
                    reason = (f"NIC driver {facts.driver or '?'} has no native XDP "
                              f"({_nl_text_of(exc)}): TC ingress")
                    mode = "tc"
                    own_clsact = self._switch(facts, before, mode, known)
            except BaseException:
                if new_slot:
                    self._free_slot(facts.ifindex)
                raise
            prog_id = self.tc_prog_id if mode == "tc" else self.xdp_prog_id
            self._state.devices[facts.ifindex] = Attachment(facts.ifname, facts.ifindex, mode, prog_id,
                                                            reason, own_clsact, hw)
            self._write_state()
            self._pin_progs()
            log.info("%s: attached in %s mode%s (slot %d): %s", ifname, mode, " + hw" if hw else "", slot,
                     reason)
            return DeviceStatus(facts.ifname, facts.ifindex, mode, prog_id, slot, reason, hw)

    def _hw_choice(self, ifname: str, *, asked: bool) -> tuple[bool, str]:
        """(place flower rules on ifname, why) for mode hw (asked) or auto. hw on a device
        without hw-tc-offload is refused, unless hw_skip_hw makes the rules software ones."""
        from pyflow.hw.capability import tc_offload

        try:
            cap = tc_offload(ifname)
            active, why_not = cap.active, cap.why_not()
        except DeviceError as exc:
            active, why_not = False, str(exc)
        if active:
            return True, "hw-tc-offload is on: flower rules in the NIC"
        if not asked:
            return False, ""
        if self.hw_skip_hw:
            return True, f"hw with hw_skip_hw: flower rules in software ({why_not})"
        raise DeviceError(f"{ifname} cannot offload to hardware ({why_not}); use --mode auto or tc")

    def _switch(self, facts: netdev.DeviceFacts, before: Attachment | None, mode: str,
                known: set[int]) -> bool:
        """Move the device to ``mode``, never leaving it without a hook. Returns own_clsact."""
        own_clsact = bool(before and before.own_clsact)
        xdp_mode = _ATTACHED_MODE.get(facts.xdp_mode or "") if facts.xdp_prog_id in known else None
        tc_ours = (self._tc_filter(facts.ifindex) or ("", 0))[0] == TC_NAME
        if mode == "tc":
            made = self._tc_install(facts)
            if xdp_mode is not None:
                self._xdp_remove_after_tc(facts, tc_ours, made)
            return own_clsact or made
        if xdp_mode is not None and xdp_mode != mode:
            return self._switch_xdp_mode(facts, mode, tc_ours, own_clsact)
        self._xdp_install(facts, mode)
        if tc_ours:
            self._tc_remove(facts.ifindex, facts.ifname, own_clsact)
            own_clsact = False
        return own_clsact

    def _xdp_remove_after_tc(self, facts: netdev.DeviceFacts, tc_ours: bool, made_clsact: bool) -> None:
        """Remove XDP once TC carries the device; if that fails, take back the TC hook
        this call added (not one that was ours before), so nothing changed."""
        try:
            self._xdp_remove(facts)
        except DeviceError:
            if not tc_ours:
                self._tc_remove(facts.ifindex, facts.ifname, made_clsact)
            raise

    def _switch_xdp_mode(self, facts: netdev.DeviceFacts, mode: str, tc_ours: bool,
                         own_clsact: bool) -> bool:
        """native <-> generic, bridged by TC so the device always has a fast path."""
        made = False if tc_ours else self._tc_install(facts)
        self._xdp_remove_after_tc(facts, tc_ours, made)
        fresh = netdev.read_facts(self._ipr, ifindex=facts.ifindex)
        try:
            self._xdp_install(fresh, mode)
        except DeviceError:
            # put the old mode back (our current program) before giving up
            with contextlib.suppress(DeviceError):
                self._xdp_install(fresh, _ATTACHED_MODE[facts.xdp_mode or ""])
            if not tc_ours:
                self._tc_remove(facts.ifindex, facts.ifname, made)
            raise
        self._tc_remove(facts.ifindex, facts.ifname, made or own_clsact)
        return False

    def detach(self, ifname: str) -> None:
        """Remove our program from ``ifname`` (only ours) and free its tx-port slot."""
        with self._op():
            self._detach_locked(ifname)

    def _detach_locked(self, ifname: str) -> None:
        st = self._state
        try:
            facts = netdev.read_facts(self._ipr, ifname)
        except DeviceError:
            gone = [i for i, a in st.devices.items() if a.ifname == ifname]
            if not gone:
                raise
            for ifindex in gone:  # the device vanished: its hooks went with it
                del st.devices[ifindex]
                self._free_slot(ifindex)
            self._write_state()
            return
        att = st.devices.get(facts.ifindex)
        if att is None:
            raise DeviceError(f"{ifname}: pyflow is not attached")
        known = self._known_prog_ids()
        if facts.xdp_prog_id in known:
            self._xdp_remove(facts)
        self._tc_remove(facts.ifindex, ifname, att.own_clsact)
        del st.devices[facts.ifindex]
        self._free_slot(facts.ifindex)
        self._write_state()
        log.info("%s: detached", ifname)

    def detach_all(self) -> None:
        """Detach every device and release every slot."""
        with self._op():
            for att in list(self._state.devices.values()):
                try:
                    self._detach_locked(att.ifname)
                except DeviceError as exc:
                    log.warning("%s", exc)
                    self._state.devices.pop(att.ifindex, None)
                    self._free_slot(att.ifindex)
            for ifindex in list(self._state.slots):
                self._free_slot(ifindex)
            self._write_state()

    def reserve_tx_port(self, ifname: str) -> int:
        """A tx-port slot for a device that XDP redirects to but that is not attached."""
        with self._op():
            facts = netdev.read_facts(self._ipr, ifname)
            slot, _ = self._take_slot(facts.ifindex, facts.ifname)
            self._write_state()
            return slot

    def release_tx_port(self, ifname: str) -> None:
        """Give back the slot of a device that is not attached (attached ones keep theirs)."""
        with self._op():
            facts = netdev.read_facts(self._ipr, ifname)
            if facts.ifindex in self._state.devices:
                raise DeviceError(f"{ifname}: attached, its tx-port slot goes with detach")
            self._free_slot(facts.ifindex)
            self._write_state()

    def slot_of(self, ifname: str) -> int | None:
        with self._op():
            for ifindex, name in self._state.names.items():
                if name == ifname:
                    return self._state.slots.get(ifindex)
            return None

    def status(self) -> list[DeviceStatus]:
        """Every device we run on or hold a slot for, with the program id live on it."""
        out = []
        with self._op():
            st = self._state
            for ifindex in sorted(set(st.devices) | set(st.slots)):
                att = st.devices.get(ifindex)
                slot = st.slots.get(ifindex)
                if att is None:
                    out.append(DeviceStatus(st.names.get(ifindex, "?"), ifindex, None, 0, slot,
                                            "redirect target: tx-port slot only"))
                    continue
                live = self._live_attachment(ifindex)
                prog_id = live[1] if live is not None and live[0] == att.mode else 0
                out.append(DeviceStatus(att.ifname, ifindex, att.mode, prog_id, slot, att.reason, att.hw))
        return out

    def reason_counts(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) per verdict reason, summed over CPUs (names: pyflow.datapath.abi.REASONS)."""
        out = {}
        for i, name in enumerate(REASONS):
            per_cpu = self.stats[self.stats.Key(i)]
            out[name] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def map_fd(self, name: str) -> int:
        return {MAP_FLOWS: self.flows, MAP_STATS: self.stats, MAP_TX_PORTS: self.tx_ports}[name].map_fd

    @property
    def xdp_fd(self) -> int:
        return self._xdp.fd

    @property
    def tc_fd(self) -> int:
        return self._tc.fd

    def close(self) -> None:
        """Release this process's handles. Attached programs keep running (pins and
        attachments hold them), ready for the next process to adopt."""
        if self._closed:
            return
        self._closed = True
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def destroy(self) -> None:
        """Detach everything, then remove the pins, the pin dir and the state file."""
        if not self._closed:
            self.detach_all()
            self.close()
        for name in (PIN_XDP, PIN_TC, MAP_FLOWS, MAP_STATS, MAP_TX_PORTS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pin_path(name))
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)
        for p in (self.state_file, self.state_file.with_name(self.state_file.name + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nl_text_of(exc: DeviceError) -> str:
    """The kernel's part of a DeviceError message (after the last ': ')."""
    return str(exc).rsplit(": ", 1)[-1]
