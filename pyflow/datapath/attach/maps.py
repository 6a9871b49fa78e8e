"""The datapath's maps seen through their fds, for the prebuilt (libbpf) datapath.

The loader and its tests use a map the way bcc's table objects are used:
``t[t.Key(...)]``, ``t[k] = t.Leaf(...)``, ``del t[k]``, ``t.map_fd``; these
tables offer that on a plain fd (one bpf() call per element, through
csrc/flowtable.c), so that both datapath builds look the same to the code
above them and no bcc is imported on the default path. Bulk flow-map work goes
through pyflow.datapath.flowtable, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from typing import Any

from pyflow._native import ffi, lib
from pyflow.datapath import abi
from pyflow.errors import DatapathError


@functools.cache
def possible_cpus() -> int:
    """CPUs a per-CPU map holds a value for (the kernel's cpu_possible_mask)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def struct_leaf(ctype: str) -> type:
    """A ctypes byte array of the struct's size whose fields read through cffi
    (``leaf.counters.packets``), so that a leaf is both bytes and a struct."""
    size = ffi.sizeof(ctype)

    class Leaf(ctypes.c_ubyte * size):  # type: ignore[misc]
        def __getattr__(self, name: str) -> Any:
            return getattr(ffi.from_buffer(ctype + " *", self), name)

    return Leaf


class MapTable:
    """One map behind an fd this object owns (closed by :meth:`close`)."""

    def __init__(self, fd: int, name: str, key: Any, leaf: Any, *, percpu: str | None = None) -> None:
        self.map_fd = fd
        self.name = name
        self.Key = key
        self.Leaf = leaf
        self._percpu = percpu
        value_size = ctypes.sizeof(leaf)
        if percpu is not None:
            # per-CPU values come as one array, each slot rounded up to 8 bytes
            self._slot = (ffi.sizeof(percpu) + 7) & ~7
            value_size = self._slot * possible_cpus()
        self._ft = ffi.new("struct pyflow_ft *", {"fd": fd, "key_size": ctypes.sizeof(key),
                                                   "value_size": value_size})
        self._value_size = value_size
        self._res = ffi.new("struct pyflow_ft_result *")

    def _fail(self, what: str, rc: int) -> DatapathError:
        return DatapathError(f"map {self.name}: {what}: {os.strerror(-rc)}")

    def __getitem__(self, key: Any) -> Any:
        value = bytearray(self._value_size)
        found = ffi.new("uint8_t[1]")
        rc = lib.pyflow_ft_lookup(self._ft, ffi.from_buffer(bytes(key)), ffi.from_buffer(value), 1, found,
                                  lib.PYFLOW_FT_NO_BATCH, self._res)
        if rc < 0:
            raise self._fail("lookup", rc)
        if not found[0]:
            raise KeyError(key)
        if self._percpu is not None:
            out = []
            for cpu in range(self._value_size // self._slot):
                v = ffi.new(self._percpu + " *")
                ffi.memmove(v, value[cpu * self._slot:], ffi.sizeof(self._percpu))
                out.append(v)
            return out
        return self.Leaf.from_buffer_copy(value)

    def __setitem__(self, key: Any, leaf: Any) -> None:
        rc = lib.pyflow_ft_update(self._ft, ffi.from_buffer(bytes(key)), ffi.from_buffer(bytes(leaf)), 1,
                                  0, lib.PYFLOW_FT_NO_BATCH, self._res)
        if rc < 0:
            raise self._fail("update", rc)

    def __delitem__(self, key: Any) -> None:
        rc = lib.pyflow_ft_delete(self._ft, ffi.from_buffer(bytes(key)), 1, ffi.NULL,
                                  lib.PYFLOW_FT_NO_BATCH, self._res)
        if rc == -errno.ENOENT:
            raise KeyError(key)
        if rc < 0:
            raise self._fail("delete", rc)

    def clear(self) -> None:
        """Delete every entry (hash maps: arrays cannot lose entries)."""
        cap = 4096
        while True:
            keys = bytearray(cap * ctypes.sizeof(self.Key))
            values = bytearray(cap * self._value_size)
            rc = lib.pyflow_ft_dump(self._ft, ffi.from_buffer(keys), ffi.from_buffer(values), cap, 256,
                                    lib.PYFLOW_FT_NO_BATCH, self._res)
            if rc == -errno.ENOSPC and cap < 1 << 22:  # more entries than room
                cap *= 4
                continue
            if rc < 0:
                raise self._fail("dump", rc)
            break
        n = self._res.done
        if n:
            missing = ffi.new("uint8_t[]", n)
            rc = lib.pyflow_ft_delete(self._ft, ffi.from_buffer(keys), n, missing, 0, self._res)
            if rc < 0:
                raise self._fail("delete", rc)

    def close(self) -> None:
        if self.map_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.map_fd)
            self.map_fd = -1


def datapath_tables(fds: dict[str, int]) -> dict[str, MapTable]:
    """The three maps of the datapath, typed as the ABI header declares them."""
    u32 = ctypes.c_uint32
    key = ctypes.c_ubyte * abi.KEY_SIZE
    return {
        abi.MAP_FLOWS: MapTable(fds[abi.MAP_FLOWS], abi.MAP_FLOWS, key, struct_leaf(abi.FLOW_TYPE)),
        abi.MAP_STATS: MapTable(fds[abi.MAP_STATS], abi.MAP_STATS, u32, struct_leaf("struct pyflow_stat"),
                                percpu="struct pyflow_stat"),
        abi.MAP_TX_PORTS: MapTable(fds[abi.MAP_TX_PORTS], abi.MAP_TX_PORTS, u32, ctypes.c_int),
    }
