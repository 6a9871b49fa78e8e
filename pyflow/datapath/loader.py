"""Loading the datapath and attaching it to devices.

One :class:`Datapath` loads the datapath built from ebpf/pyflow_xdp.c (by default
the object compiled at build time, with libbpf; or compiled at start with bcc)
with its two entry points (``pyflow_xdp`` for the XDP hook, ``pyflow_tc`` for TC ingress)
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
the pins: libbpf's pin paths, or bcc's BPF_TABLE_PINNED), the programs are pinned there too
(``prog_xdp``, ``prog_tc``), and a JSON state file (bpffs holds no regular
files, so it lives in a state dir, /run/pyflow by default) records which
device runs which mode and owns which tx-port slot. A restarted process reads
it, checks it against the devices and the devmap, and so adopts the running
datapath without touching traffic: the programs stay attached while no process
runs. A prebuilt restart whose object and map sizes are those recorded for the
pinned programs (``<state file stem>.progs.json``) reuses those programs as they
are; otherwise the next :meth:`Datapath.attach` swaps in the new programs atomically.

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
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pyflow.datapath import netdev
from pyflow.datapath.abi import REASONS
from pyflow.datapath.attach import switch
from pyflow.datapath.attach.adopt import Adoption
from pyflow.datapath.attach.devmap import TxPorts
from pyflow.datapath.attach.pins import (
    BPF_FS_TYPE,
    BPFFS_ROOT,
    DEFAULT_PIN_DIR,
    PIN_TC,
    PIN_XDP,
    PinDir,
    bpffs_mounted,
    ensure_bpffs,
    fd_prog_id,
)
from pyflow.datapath.attach.programs import DEFAULT_BUILD, LoadRecord, Programs, map_info
from pyflow.datapath.attach.state import (
    DEFAULT_STATE_DIR,
    STATE_VERSION,
    Attachment,
    DeviceStatus,
    State,
    StateFile,
)
from pyflow.datapath.attach.tc import ETH_P_ALL, TC_HANDLE, TC_NAME, TC_PRIO, TCA_BPF_ID, TcHook
from pyflow.datapath.attach.xdp import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    XdpHook,
)
from pyflow.errors import DatapathError, DeviceError
from pyflow.netlink.tc import CLSACT_HANDLE as TC_CLSACT_HANDLE
from pyflow.netlink.tc import PARENT_EGRESS as TC_PARENT_EGRESS
from pyflow.netlink.tc import PARENT_INGRESS as TC_PARENT_INGRESS

# the names other modules import from here, wherever they now live
__all__ = [
    "BPFFS_ROOT", "BPF_FS_TYPE", "DEFAULT_PIN_DIR", "DEFAULT_STATE_DIR", "ETH_P_ALL", "PIN_TC",
    "PIN_XDP", "STATE_VERSION", "TCA_BPF_ID", "TC_CLSACT_HANDLE", "TC_HANDLE", "TC_NAME",
    "TC_PARENT_EGRESS", "TC_PARENT_INGRESS", "TC_PRIO", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_REPLACE",
    "XDP_FLAGS_SKB_MODE", "XDP_FLAGS_UPDATE_IF_NOEXIST", "Attachment", "Datapath", "DeviceStatus",
    "bpffs_mounted", "ensure_bpffs", "fd_prog_id",
]

log = logging.getLogger(__name__)


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


class Datapath:
    """The loaded datapath: maps, both programs, and the devices they run on.

    A facade: the work is done by the parts in pyflow.datapath.attach (pins, programs,
    state file, XDP and TC hooks, tx-port slots, mode switches, adoption); this class
    holds them, runs each public call as one locked operation on the state file, and
    writes the state back.
    """

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, *, state_file: str | None = None,
                 defines: Mapping[str, int] | None = None, hw_skip_hw: bool = False,
                 build: str = DEFAULT_BUILD) -> None:
        """``build``: ``prebuilt`` loads the object compiled at build time with libbpf (no
        compiler needed); ``bcc`` compiles ebpf/ at start. ``defines``: for bcc, -D flags;
        for the object, only its map sizes (PYFLOW_MAX_FLOWS, PYFLOW_MAX_TX_PORTS)."""
        self._pins = PinDir(pin_dir)
        self.pin_dir = self._pins.path
        self.hw_skip_hw = hw_skip_hw  # hw mode without hw-tc-offload: software flower rules
        name = os.path.basename(self.pin_dir) or "pyflow"
        self.state_file = Path(state_file) if state_file else Path(DEFAULT_STATE_DIR) / f"{name}.json"
        self._store = StateFile(self.state_file)
        # what the pinned programs are (bpffs holds no regular files): lets a restart reuse them
        self._record = LoadRecord(self.state_file.with_name(self.state_file.stem + ".progs.json"))
        self._lock = threading.RLock()
        self._netns = _netns_inode()
        self._closed = False
        self._ipr: Any = None
        made_dir = self._pins.prepare()
        self._progs = Programs(self._pins, defines, made_dir=made_dir, build=build, record=self._record)
        self.build = build
        try:
            progs = self._progs
            self.xdp_prog_id = progs.xdp_prog_id
            self.tc_prog_id = progs.tc_prog_id
            self.flows, self.stats, self.tx_ports = progs.flows, progs.stats, progs.tx_ports
            self.max_tx_ports = map_info(self.tx_ports).max_entries
            from pyroute2.iproute import IPRoute

            self._ipr = IPRoute(ext_ack=True)
            self._slots = TxPorts(self.tx_ports, self.max_tx_ports)
            self._xdp = XdpHook(self._ipr, progs)
            self._tc = TcHook(self._ipr, progs)
            self._switch = switch.ModeSwitch(self._ipr, self._xdp, self._tc)
            self._adoption = Adoption(self._ipr, self._tc, self._slots)
            with self._op() as st:
                progs.pin(only_missing=True)
                self._adoption.adopt(st, self._known_prog_ids(st))
                self._store.write(st)
        except BaseException:
            self.close()
            raise

    # -- one operation ---------------------------------------------------------------

    @contextlib.contextmanager
    def _op(self) -> Iterator[State]:
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
        with self._lock, self._store.locked() as st:
            yield st

    def _known_prog_ids(self, st: State) -> set[int]:
        """Program ids that are ours: this instance's, the pinned ones, those in the state file."""
        return self._progs.known_ids(st.recorded_prog_ids())

    # -- devices ----------------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto", *, no_xdp: str | None = None) -> DeviceStatus:
        """Run the datapath on ``ifname`` in ``mode``; returns the device's status.

        Re-attaching a device that runs our program replaces it atomically (XDP:
        one netlink request swapping the program; TC: a filter replace). A mode
        switch attaches the new hook first and removes the old one after
        (pyflow.datapath.attach.switch says why that is safe).

        ``no_xdp``: the caller's reason why this device must not forward by XDP or by
        rules in the NIC (traffic shaping it must not skip; switch.choose): auto takes
        TC, an explicit XDP or hw mode is refused with that reason.

        Raises DeviceError (missing device, bad mode, a mode the device cannot
        run, a foreign program in the way) or DatapathError; on error the device,
        the devmap and the state file are as they were.
        """
        if mode not in netdev.ALL_MODES:
            raise DeviceError(f"unknown attach mode {mode!r} for {ifname}: "
                              f"use native, generic, tc, hw or auto")
        with self._op() as st:
            facts = netdev.read_facts(self._ipr, ifname)
            if mode != "tc":  # only XDP cares about VLAN uppers and tag stripping
                facts = netdev.read_vlan_facts(self._ipr, facts)
            choice = switch.choose(facts, mode, skip_hw=self.hw_skip_hw, no_xdp=no_xdp)
            known = self._known_prog_ids(st)
            if facts.xdp_prog_id and facts.xdp_prog_id not in known and choice.mode != "tc":
                raise DeviceError(f"{ifname}: runs another XDP program (id {facts.xdp_prog_id}), "
                                  f"not replacing it")
            before = st.devices.get(facts.ifindex)
            slot, new_slot = self._slots.take(st, facts.ifindex, facts.ifname)
            try:
                mode, reason, own_clsact = self._switch.apply(facts, before, choice, known)
            except BaseException:
                if new_slot:
                    self._slots.free(st, facts.ifindex)
                raise
            prog_id = self.tc_prog_id if mode == "tc" else self.xdp_prog_id
            st.devices[facts.ifindex] = Attachment(facts.ifname, facts.ifindex, mode, prog_id,
                                                   reason, own_clsact, choice.hw)
            self._store.write(st)
            self._progs.pin()
            log.info("%s: attached in %s mode%s (slot %d): %s", ifname, mode,
                     " + hw" if choice.hw else "", slot, reason)
            return DeviceStatus(facts.ifname, facts.ifindex, mode, prog_id, slot, reason, choice.hw)

    def detach(self, ifname: str) -> None:
        """Remove our program from ``ifname`` (only ours) and free its tx-port slot."""
        with self._op() as st:
            self._detach_locked(st, ifname)

    def _detach_locked(self, st: State, ifname: str) -> None:
        try:
            facts = netdev.read_facts(self._ipr, ifname)
        except DeviceError:
            gone = [i for i, a in st.devices.items() if a.ifname == ifname]
            if not gone:
                raise
            for ifindex in gone:  # the device vanished: its hooks went with it
                del st.devices[ifindex]
                self._slots.free(st, ifindex)
            self._store.write(st)
            return
        att = st.devices.get(facts.ifindex)
        if att is None:
            raise DeviceError(f"{ifname}: pyflow is not attached")
        if facts.xdp_prog_id in self._known_prog_ids(st):
            self._xdp.remove(facts)
        self._tc.remove(facts.ifindex, ifname, att.own_clsact)
        del st.devices[facts.ifindex]
        self._slots.free(st, facts.ifindex)
        self._store.write(st)
        log.info("%s: detached", ifname)

    def detach_all(self) -> None:
        """Detach every device and release every slot."""
        with self._op() as st:
            for att in list(st.devices.values()):
                try:
                    self._detach_locked(st, att.ifname)
                except DeviceError as exc:
                    log.warning("%s", exc)
                    st.devices.pop(att.ifindex, None)
                    self._slots.free(st, att.ifindex)
            for ifindex in list(st.slots):
                self._slots.free(st, ifindex)
            self._store.write(st)

    def reserve_tx_port(self, ifname: str) -> int:
        """A tx-port slot for a device that XDP redirects to but that is not attached."""
        with self._op() as st:
            facts = netdev.read_facts(self._ipr, ifname)
            slot, _ = self._slots.take(st, facts.ifindex, facts.ifname)
            self._store.write(st)
            return slot

    def release_tx_port(self, ifname: str) -> None:
        """Give back the slot of a device that is not attached (attached ones keep theirs)."""
        with self._op() as st:
            facts = netdev.read_facts(self._ipr, ifname)
            if facts.ifindex in st.devices:
                raise DeviceError(f"{ifname}: attached, its tx-port slot goes with detach")
            self._slots.free(st, facts.ifindex)
            self._store.write(st)

    def slot_of(self, ifname: str) -> int | None:
        with self._op() as st:
            for ifindex, name in st.names.items():
                if name == ifname:
                    return st.slots.get(ifindex)
            return None

    def status(self, *, live: bool = True) -> list[DeviceStatus]:
        """Every device we run on or hold a slot for, with the program id live on it.

        ``live=False`` leaves prog_id 0 instead of reading each device's hooks from the
        kernel (a netlink round trip per device, parsed in Python): for callers that only
        need which devices are attached and how, such as the stats snapshot the control
        loop keeps after every keep-alive tick."""
        out = []
        with self._op() as st:
            for ifindex in sorted(set(st.devices) | set(st.slots)):
                att = st.devices.get(ifindex)
                slot = st.slots.get(ifindex)
                if att is None:
                    out.append(DeviceStatus(st.names.get(ifindex, "?"), ifindex, None, 0, slot,
                                            "redirect target: tx-port slot only"))
                    continue
                now = self._adoption.live(ifindex) if live else None
                prog_id = now[1] if now is not None and now[0] == att.mode else 0
                out.append(DeviceStatus(att.ifname, ifindex, att.mode, prog_id, slot, att.reason, att.hw))
        return out

    # -- maps and programs ----------------------------------------------------------

    def reason_counts(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) per verdict reason, summed over CPUs (names: pyflow.datapath.abi.REASONS)."""
        out = {}
        for i, name in enumerate(REASONS):
            per_cpu = self.stats[self.stats.Key(i)]
            out[name] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def map_fd(self, name: str) -> int:
        return self._progs.maps()[name].map_fd

    @property
    def xdp_fd(self) -> int:
        return int(self._progs.xdp.fd)

    @property
    def tc_fd(self) -> int:
        return int(self._progs.tc.fd)

    # -- lifetime ---------------------------------------------------------------------

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
        self._progs.close()

    def destroy(self) -> None:
        """Detach everything, then remove the pins, the pin dir and the state file."""
        if not self._closed:
            self.detach_all()
            self.close()
        self._pins.remove()
        self._store.remove()
        self._record.remove()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
