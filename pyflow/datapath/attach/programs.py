"""The loaded datapath: its two programs, its three maps, and the program pins.

The datapath comes from one of two builds of ebpf/pyflow_xdp.c (``BUILDS``):
``prebuilt``, the object compiled at build time and loaded with libbpf
(pyflow.datapath.bpfobject), the default; or ``bcc``, compiled at start. Either
way its maps are pinned in the pin dir (or adopted from the pins there) and its
two entry points are loaded: ``pyflow_xdp`` for the XDP hook, ``pyflow_tc`` for TC
ingress. Which programs count as "ours" -- ours may be on a device, or an earlier
process's -- is decided here too, from this process's programs and the pins.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyflow._native import ffi, lib
from pyflow.datapath import bpfobject, bpfsource
from pyflow.datapath.abi import MAP_FLOWS, MAP_STATS, MAP_TX_PORTS
from pyflow.datapath.attach.maps import MapTable, datapath_tables
from pyflow.datapath.attach.pins import PIN_TC, PIN_XDP, PinDir, fd_prog_id
from pyflow.errors import DatapathError


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


@dataclass
class Prog:
    """A loaded program's fd (bcc's function objects offer the same ``fd``)."""

    fd: int


class Programs:
    """Both programs and the maps, loaded from one build of the datapath."""

    def __init__(self, pins: PinDir, defines: Mapping[str, int] | None = None, *,
                 made_dir: bool = False, build: str = DEFAULT_BUILD) -> None:
        """Build or open, and load; ``made_dir``: the pin dir is new, so a failed load removes it."""
        if build not in BUILDS:
            raise DatapathError(f"unknown datapath build {build!r}: use {' or '.join(BUILDS)}")
        self.pins = pins
        self.build = build
        self.bpf: Any = None
        self._object: bpfobject.LoadedObject | None = None
        before = pins.entries()
        if build == "prebuilt":
            self._load_prebuilt(defines, before, made_dir)
            return
        try:
            self.bpf = bpfsource.compile_datapath(pin_dir=pins.path, defines=defines)
        except DatapathError:
            pins.undo(before, made_dir)
            raise
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

    def _load_prebuilt(self, defines: Mapping[str, int] | None, before: set[str], made_dir: bool) -> None:
        try:
            self._object = bpfobject.load(pin_dir=self.pins.path, defines=defines)
        except DatapathError:
            self.pins.undo(before, made_dir)
            raise
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
