"""The prebuilt datapath: the BPF object compiled at build time, loaded with libbpf.

``make`` and the wheel build compile ebpf/pyflow_xdp.c once with clang into
pyflow/datapath/pyflow_xdp.bpf.o (csrc/build_bpf.py); loading it needs libbpf
(through pyflow._native, csrc/loader.c) and no compiler, kernel headers or bcc.
What bcc builds take as -D defines, the object takes as map sizes set before
the maps are created, so a bigger flow table needs no recompile.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyflow._native import ffi, lib
from pyflow.datapath import abi
from pyflow.datapath.bpfsource import TC_FUNC, XDP_FUNC
from pyflow.errors import DatapathError

OBJECT_NAME = "pyflow_xdp.bpf.o"
MAP_NAMES = (abi.MAP_FLOWS, abi.MAP_STATS, abi.MAP_TX_PORTS)
PROG_NAMES = (XDP_FUNC, TC_FUNC)
# the compile-time limits of the source, as the maps they size
TUNABLES = {"PYFLOW_MAX_FLOWS": abi.MAP_FLOWS, "PYFLOW_MAX_TX_PORTS": abi.MAP_TX_PORTS}
VERIFIER_LINES = 3  # of the verifier's log, in a refusal's message


def object_path() -> Path:
    """$PYFLOW_BPF_OBJECT, else the object next to this module (the wheel's, or the
    source tree's after `make`)."""
    if "PYFLOW_BPF_OBJECT" in os.environ:
        return Path(os.environ["PYFLOW_BPF_OBJECT"])
    return Path(__file__).resolve().parent / OBJECT_NAME


@dataclass
class LoadedObject:
    """Fds of the loaded object's programs and maps, by name; the caller closes them."""

    progs: dict[str, int]
    maps: dict[str, int]

    def close(self) -> None:
        for fd in (*self.progs.values(), *self.maps.values()):
            if fd >= 0:
                os.close(fd)
        self.progs, self.maps = {}, {}


def map_sizes(defines: Mapping[str, int] | None) -> dict[str, int]:
    sizes = {}
    for name, value in (defines or {}).items():
        if name not in TUNABLES:
            raise DatapathError(f"{name} is not a setting of the prebuilt datapath (it sets only "
                                f"{', '.join(sorted(TUNABLES))}); build it with bcc for other defines")
        sizes[TUNABLES[name]] = int(value)
    return sizes


def identity(defines: Mapping[str, int] | None = None, path: Path | None = None) -> dict[str, object]:
    """What a load of the object depends on: the object's bytes (sha256) and the map sizes set
    before load. Two loads with the same identity give the same programs, so a restart whose
    identity matches the one recorded for the pinned programs can reuse them as they are."""
    path = path or object_path()
    if not path.is_file():
        raise DatapathError(f"prebuilt datapath missing: {path} (run `make`, or use the bcc build)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return {"object_sha256": digest.hexdigest(), "map_sizes": map_sizes(defines)}


def failure(path: Path, rc: int, log: str) -> str:
    """One line: the object, what failed and the kernel's reason; for a verifier
    refusal, the last lines of its log before the 'processed N insns' trailer."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    begin = next((i for i, ln in enumerate(lines) if "-- BEGIN PROG LOAD LOG --" in ln), None)
    if begin is not None:
        prog = lines[begin].partition("prog '")[2].partition("'")[0] or "?"
        end = next((i for i in range(begin, len(lines)) if "-- END PROG LOAD LOG --" in lines[i]), len(lines))
        body = [ln for ln in lines[begin + 1:end] if not ln.startswith(("processed ", "verification time"))]
        tail = " / ".join(body[-VERIFIER_LINES:]) or os.strerror(-rc)
        return f"datapath load of {path} failed: program {prog} refused by the verifier: {tail}"
    said = [ln.removeprefix("libbpf: ") for ln in lines]
    # libbpf names the failing map or program first; later lines only repeat "failed to load object"
    detail = next((ln for ln in said if "failed to load object" not in ln), "") or os.strerror(-rc)
    return f"datapath load of {path} failed: {detail} ({os.strerror(-rc)})"


def load(pin_dir: str | None = None, defines: Mapping[str, int] | None = None,
         path: Path | None = None) -> LoadedObject:
    """Open, size, pin (or adopt the pins in ``pin_dir``) and load the object."""
    path = path or object_path()
    if not path.is_file():
        raise DatapathError(f"prebuilt datapath missing: {path} (run `make`, or use the bcc build)")
    sizes = map_sizes(defines)
    keep = [ffi.new("char[]", n.encode()) for n in (*MAP_NAMES, *PROG_NAMES)]
    maps = ffi.new("struct pyflow_bpf_map[]", len(MAP_NAMES))
    for i, name in enumerate(MAP_NAMES):
        maps[i].name = keep[i]
        maps[i].max_entries = sizes.get(name, -1)
    progs = ffi.new("struct pyflow_bpf_prog[]", len(PROG_NAMES))
    for i, _ in enumerate(PROG_NAMES):
        progs[i].name = keep[len(MAP_NAMES) + i]
    c_path = ffi.new("char[]", str(path).encode())
    c_pins = ffi.new("char[]", pin_dir.rstrip("/").encode()) if pin_dir else ffi.NULL
    req = ffi.new("struct pyflow_bpf_load *", {"object": c_path, "pin_dir": c_pins, "maps": maps,
                                                "nmaps": len(MAP_NAMES), "progs": progs,
                                                "nprogs": len(PROG_NAMES)})
    rc = lib.pyflow_bpf_load(req)
    if rc < 0:
        raise DatapathError(failure(path, rc, ffi.string(req.log).decode(errors="replace")))
    return LoadedObject({n: progs[i].fd for i, n in enumerate(PROG_NAMES)},
                        {n: maps[i].fd for i, n in enumerate(MAP_NAMES)})
