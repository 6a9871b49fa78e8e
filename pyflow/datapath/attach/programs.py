"""The loaded datapath: its two programs, its three maps, and the program pins.

The datapath comes from one of two builds of ebpf/pyflow_xdp.c (``BUILDS``):
``prebuilt``, the object compiled at build time and loaded with libbpf
(pyflow.datapath.bpfobject), the default; or ``bcc``, compiled at start. Either
way its maps are pinned in the pin dir (or adopted from the pins there) and its
two entry points are loaded: ``pyflow_xdp`` for the XDP hook, ``pyflow_tc`` for TC
ingress. Which programs count as "ours" -- ours may be on a device, or an earlier
process's -- is decided here too, from this process's programs and the pins.

A restart of the prebuilt build does not load the programs again when the pinned ones
are the same programs: a :class:`LoadRecord` next to the state file (bpffs holds no
regular files) says what was loaded -- the object's sha256 and the map sizes -- and the
ids of the programs and maps pinned then. When the identity and every id still match,
the pins are opened by path and used as they are (no load, no verifier run); otherwise
(an upgrade, other map sizes, a bcc build, no or an unreadable record) the programs are
loaded fresh and swapped in atomically by the next attach.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyflow._native import ffi, lib
from pyflow.datapath import bpfobject, bpfsource
from pyflow.datapath.abi import MAP_FLOWS, MAP_STATS, MAP_TX_PORTS
from pyflow.datapath.attach.maps import MapTable, datapath_tables
from pyflow.datapath.attach.pins import PIN_TC, PIN_XDP, PinDir, fd_prog_id
from pyflow.datapath.attach.state import check_dir_stat, read_private, write_durably
from pyflow.errors import DatapathError

log = logging.getLogger(__name__)


def load_summary(text: str) -> str:
    """The verifier's complaint: the last log line before its 'processed N insns' trailer."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("processed ") and i > 0:
            return lines[i - 1]
    return lines[-1] if lines else ""


def map_info(table: Any) -> Any:
    """The kernel's bpf_map_info of a map table, bcc's or ours (max_entries, ...)."""
    info = ffi.new("struct pyflow_map_info *")
    rc = lib.pyflow_map_info(table.map_fd, info)
    if rc < 0:
        raise DatapathError(f"cannot read map info: {os.strerror(-rc)}")
    return info


BUILDS = ("prebuilt", "bcc")
DEFAULT_BUILD = "prebuilt"
RECORD_VERSION = 1
PROG_PINS = (PIN_XDP, PIN_TC)
MAP_PINS = (MAP_FLOWS, MAP_STATS, MAP_TX_PORTS)


class LoadRecord:
    """The identity of the pinned programs, in a private file next to the state file.

    ``{"version", "identity": bpfobject.identity(), "prog_ids": {pin: id}, "map_ids": {pin: id}}``,
    written atomically once the program pins name this process's prebuilt programs. The ids
    tie the record to the very objects pinned: a pin replaced since (by a bcc build, by hand)
    no longer matches, so a stale record never makes a restart reuse the wrong programs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any] | None:
        """The record, or None when there is none or it cannot be trusted or parsed (the
        caller then loads fresh: a lost record costs a load, never correctness)."""
        try:
            check_dir_stat(os.lstat(self.path.parent), str(self.path.parent), "state dir")
            text = read_private(self.path)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, DatapathError) as exc:
            log.warning("load record %s unreadable (%s): loading the datapath afresh", self.path, exc)
            return None
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            log.warning("load record %s is corrupt (%s): loading the datapath afresh", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            return None
        return data

    def write(self, data: Mapping[str, Any]) -> None:
        """``data``: a whole record, version included."""
        write_durably(self.path, json.dumps(dict(data), sort_keys=True) + "\n")

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Prog:
    """A loaded program's fd (bcc's function objects offer the same ``fd``)."""

    fd: int


class Programs:
    """Both programs and the maps, loaded from one build of the datapath."""

    def __init__(self, pins: PinDir, defines: Mapping[str, int] | None = None, *,
                 made_dir: bool = False, build: str = DEFAULT_BUILD,
                 record: LoadRecord | None = None) -> None:
        """Build or open, and load (or, prebuilt, reuse the pinned programs when ``record``
        says they are these); ``made_dir``: the pin dir is new, so a failed load removes it."""
        if build not in BUILDS:
            raise DatapathError(f"unknown datapath build {build!r}: use {' or '.join(BUILDS)}")
        self.pins = pins
        self.build = build
        self.bpf: Any = None
        self._object: bpfobject.LoadedObject | None = None
        self._record = record
        self._identity: dict[str, object] | None = None
        self.adopted = False  # the programs are the pinned ones, not loaded by this process
        aside = pins.set_aside_other_shapes()
        before = pins.entries()
        try:
            self._open(defines, reuse=not aside)
        except BaseException:
            # bcc pins each map as it makes it: a failure half way leaves no new pin behind
            # for the next start to adopt, and the maps set aside are pinned back
            pins.undo(before, made_dir)
            raise
        pins.release_aside()

    def _open(self, defines: Mapping[str, int] | None, *, reuse: bool) -> None:
        """Load (or reuse the pinned programs when ``reuse`` and the record allow); the
        caller undoes the pins when this fails."""
        record = self._record
        if self.build == "prebuilt":
            self._identity = bpfobject.identity(defines)
            if reuse and record is not None and self._adopt_pinned(record):
                return
            self._object = bpfobject.load(pin_dir=self.pins.path, defines=defines)
            self._take_object()
            return
        self.bpf = bpfsource.compile_datapath(pin_dir=self.pins.path, defines=defines)
        try:
            from bcc import BPF

            self.xdp = self._load(bpfsource.XDP_FUNC, BPF.XDP)
            self.tc = self._load(bpfsource.TC_FUNC, BPF.SCHED_CLS)
            self.xdp_prog_id = fd_prog_id(self.xdp.fd)
            self.tc_prog_id = fd_prog_id(self.tc.fd)
            # bcc wants bytes names (str works but warns)
            self.flows = self.bpf[MAP_FLOWS.encode()]
            self.stats = self.bpf[MAP_STATS.encode()]
            self.tx_ports = self.bpf[MAP_TX_PORTS.encode()]
        except BaseException:
            self.close()
            raise

    def _take_object(self) -> None:
        """Wrap the fds of ``self._object`` (loaded, or opened from the pins)."""
        assert self._object is not None
        try:
            progs, tables = self._object.progs, datapath_tables(self._object.maps)
            self._object.maps = {}  # the tables own the map fds now
            self.xdp = Prog(progs[bpfsource.XDP_FUNC])
            self.tc = Prog(progs[bpfsource.TC_FUNC])
            self.xdp_prog_id = fd_prog_id(self.xdp.fd)
            self.tc_prog_id = fd_prog_id(self.tc.fd)
            self.flows, self.stats, self.tx_ports = tables[MAP_FLOWS], tables[MAP_STATS], tables[MAP_TX_PORTS]
        except BaseException:
            self.close()
            raise

    def _adopt_pinned(self, record: LoadRecord) -> bool:
        """Open the pinned programs and maps by path and use them, if ``record`` says they
        are what this identity would load and every pin is still the object it recorded."""
        rec = record.read()
        if rec is None:
            return False
        if rec.get("identity") != self._identity:
            log.info("pinned datapath programs differ from %s or its map sizes: loading afresh",
                     bpfobject.object_path())
            return False
        fds: dict[str, int] = {}
        try:
            for pin in (*PROG_PINS, *MAP_PINS):
                fd = self.pins.pinned_fd(pin)
                if fd is None:
                    return False
                fds[pin] = fd
            prog_ids = {pin: fd_prog_id(fds[pin]) for pin in PROG_PINS}
            map_ids = {}
            for pin in MAP_PINS:
                info = ffi.new("struct pyflow_map_info *")
                if lib.pyflow_map_info(fds[pin], info) < 0:
                    return False
                map_ids[pin] = int(info.id)
            if prog_ids != rec.get("prog_ids") or map_ids != rec.get("map_ids"):
                log.info("pins in %s changed since they were recorded: loading the datapath afresh",
                         self.pins.path)
                return False
            self._object = bpfobject.LoadedObject(
                {bpfsource.XDP_FUNC: fds.pop(PIN_XDP), bpfsource.TC_FUNC: fds.pop(PIN_TC)},
                {pin: fds.pop(pin) for pin in MAP_PINS})
        except DatapathError:  # a pin that is no program (fd_prog_id)
            return False
        finally:
            for fd in fds.values():
                lib.pyflow_close(fd)
        self._take_object()
        self.adopted = True
        log.info("reusing the pinned datapath programs (xdp id %d, tc id %d)",
                 self.xdp_prog_id, self.tc_prog_id)
        return True

    def _load(self, func: str, prog_type: int) -> Any:
        captured = io.StringIO()
        try:
            with bpfsource._capture_stderr(captured):
                return self.bpf.load_func(func.encode(), prog_type)
        except Exception as exc:
            detail = load_summary(captured.getvalue()) or str(exc)
            raise DatapathError(f"datapath load of {func} failed: {detail}") from exc

    def maps(self) -> dict[str, Any]:
        return {MAP_FLOWS: self.flows, MAP_STATS: self.stats, MAP_TX_PORTS: self.tx_ports}

    def pin(self, *, only_missing: bool = False) -> None:
        """Point prog_xdp / prog_tc at these programs. The pins let the next process find
        the programs that run on the devices, and give it an fd to name as the expected
        program in an XDP replace."""
        self.pins.pin_prog(PIN_XDP, self.xdp.fd, self.xdp_prog_id, only_missing=only_missing)
        self.pins.pin_prog(PIN_TC, self.tc.fd, self.tc_prog_id, only_missing=only_missing)
        self._note_pins()

    def _note_pins(self) -> None:
        """Keep the load record in step with the program pins: once they name this process's
        programs, record them (prebuilt) or drop the record (bcc: no identity to compare).
        While they still name an earlier process's programs (kept until the first attach
        swaps them), the record that describes those stays."""
        if self._record is None:
            return
        pinned = {pin: self.pins.pinned_prog_id(pin) for pin in PROG_PINS}
        if pinned != {PIN_XDP: self.xdp_prog_id, PIN_TC: self.tc_prog_id}:
            return
        if self._identity is None:
            self._record.remove()
            return
        want = {"version": RECORD_VERSION, "identity": self._identity, "prog_ids": pinned,
                "map_ids": {pin: int(map_info(t).id) for pin, t in self.maps().items()}}
        # another process may have pinned and recorded its programs in between: compare with
        # the file, not with what this process wrote last (an fsync only when it changes)
        if self._record.read() != want:
            self._record.write(want)

    def known_ids(self, recorded: Iterable[int]) -> set[int]:
        """Program ids that are ours: these programs', the pinned ones, and ``recorded``
        (those the state file lists)."""
        ids = {self.xdp_prog_id, self.tc_prog_id, *recorded}
        for pin in (PIN_XDP, PIN_TC):
            pinned = self.pins.pinned_prog_id(pin)
            if pinned is not None:
                ids.add(pinned)
        ids.discard(0)
        return ids

    @contextlib.contextmanager
    def xdp_fd_of(self, prog_id: int) -> Iterator[int | None]:
        """An fd for XDP program ``prog_id`` if we can get one (ours or pinned), else None."""
        if prog_id == self.xdp_prog_id:
            yield self.xdp.fd
            return
        fd = self.pins.pinned_fd(PIN_XDP)
        try:
            if fd is not None and fd_prog_id(fd) == prog_id:
                yield fd
            else:
                yield None
        finally:
            if fd is not None:
                lib.pyflow_close(fd)

    def close(self) -> None:
        if self._object is not None:
            for table in (getattr(self, "flows", None), getattr(self, "stats", None),
                          getattr(self, "tx_ports", None)):
                if isinstance(table, MapTable):
                    table.close()
            self._object.close()
            self._object = None
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None
