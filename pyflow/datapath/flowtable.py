"""The flow map seen from userspace: batched writes, deletes, lookups and counter reads.

Every operation packs its entries into one contiguous cffi array of
``struct pyflow_flow_key`` / ``struct pyflow_flow`` and makes one call into
csrc/flowtable.c, which makes one bpf() syscall per batch (BPF_MAP_UPDATE_BATCH,
BPF_MAP_DELETE_BATCH, BPF_MAP_LOOKUP_BATCH). Lookups of given keys have no batch
command in the kernel; they are a loop of BPF_MAP_LOOKUP_ELEM in C.

Consistency, as the kernel gives it and as callers must expect it:

- A batch is not atomic. The kernel applies elements in order and stops at the
  first that fails. ``BatchError`` (a ``MapError``) then says how many were
  applied (``applied``), which one failed (``index`` == ``applied``) and why
  (``errno``): elements ``[0, applied)`` are in the map, element ``index`` and
  everything after it are not (for ``mode="any"`` an existing entry past the
  failure keeps its old value). Nothing is rolled back.
- ``insert`` replaces the whole value, counters included; a counter increment the
  datapath makes on the old element while it is being replaced is lost.
- ``dump``/``read_counters`` walk the table bucket by bucket while the datapath
  keeps running: each entry is read whole, but the walk is not a snapshot.
- The kernel refuses BPF_NOEXIST/BPF_EXIST in batch updates (seen on 6.18:
  only BPF_F_LOCK is accepted there); ``mode="new"``/``"existing"`` therefore run as per-element syscalls in
  C (still one call from Python). That is the general fallback: whenever the
  kernel refuses a batch command as a whole, the C side does the same work one
  element at a time, and this object remembers to go there directly next time.
"""

from __future__ import annotations

import errno as errno_mod
import os
import struct
from collections.abc import Iterator
from typing import Any

from pyflow._native import ffi, lib
from pyflow.datapath.abi import (
    FLOW_SIZE,
    FLOW_TYPE,
    KEY_SIZE,
    KEY_TYPE,
    FlowAction,
    FlowKey,
    key_bytes,
    value_bytes,
)
from pyflow.errors import MapError

COUNTERS_TYPE = "struct pyflow_ft_counters"  # csrc/pyflow_native.h: what read_counters keeps
COUNTERS_SIZE = ffi.sizeof(COUNTERS_TYPE)

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_LRU_HASH = 9
# Per-CPU hash maps hold one value per CPU: the datapath's single value per flow does not fit them.
FLOW_MAP_TYPES = {BPF_MAP_TYPE_HASH: "hash", BPF_MAP_TYPE_LRU_HASH: "lru_hash"}

MODES = {"any": 0, "new": 1, "existing": 2}  # BPF_ANY, BPF_NOEXIST, BPF_EXIST

# Output arrays are written by the kernel before they are read, so skip zeroing them:
# a dump sized for max_entries then costs only the pages the entries really touch.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


def _errname(err: int) -> str:
    err = abs(err)
    name = errno_mod.errorcode.get(err, "ENOTSUPP" if err == 524 else f"errno {err}")
    return f"{name} ({os.strerror(err)})" if err != 524 else f"{name} (operation not supported)"


def struct_format(ctype: str) -> str:
    """A ``struct`` module format for an ABI struct of unsigned integers, derived from cffi's
    layout (offsets and widths), so that no layout is written down twice. Fields named ``pad``
    are skipped."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, pos = "=", 0
    for name, field in ffi.typeof(ctype).fields:
        size = ffi.sizeof(field.type)
        if field.offset > pos:
            fmt += f"{field.offset - pos}x"
        fmt += f"{size}x" if name == "pad" else codes[size]
        pos = field.offset + size
    if ffi.sizeof(ctype) > pos:
        fmt += f"{ffi.sizeof(ctype) - pos}x"
    assert struct.calcsize(fmt) == ffi.sizeof(ctype), fmt
    return fmt


_COUNTERS = struct.Struct(struct_format(COUNTERS_TYPE))


class BatchError(MapError):
    """A batch stopped part way: ``applied`` elements done, element ``index`` failed with ``errno``."""

    def __init__(self, message: str, *, op: str, errno: int, applied: int, index: int, total: int):
        super().__init__(message)
        self.op = op
        self.errno = errno
        self.applied = applied
        self.index = index
        self.total = total


class FlowBatch:
    """Contiguous key and value arrays ready for one syscall (``values`` may be None for keys only)."""

    __slots__ = ("keys", "values", "n")

    def __init__(self, keys: Any, values: Any, n: int):
        self.keys, self.values, self.n = keys, values, n

    def __len__(self) -> int:
        return self.n


def _buffer_count(buf: Any, size: int, what: str) -> int:
    if isinstance(buf, ffi.CData):
        if ffi.typeof(buf).kind != "array":
            raise TypeError(f"{what}: a cffi pointer has no length; pass a cffi array or a FlowBatch")
        total = ffi.sizeof(buf)
    else:
        total = memoryview(buf).nbytes
    if total % size:
        raise ValueError(f"{what}: {total} bytes is not a whole number of {size}-byte entries")
    return total // size


def _as_c(buf: Any) -> Any:
    return buf if isinstance(buf, ffi.CData) else ffi.from_buffer(buf)


def _is_raw(obj: Any) -> bool:
    return isinstance(obj, ffi.CData | bytes | bytearray | memoryview)


def pack(items: Any) -> FlowBatch:
    """Items -> FlowBatch. Items: a FlowBatch; a ``(keys, values)`` pair of cffi arrays or byte
    buffers holding whole structs; or an iterable of ``(key, value)`` where key is a FlowKey or its
    bytes and value a FlowAction (counters start at zero) or the bytes of a ``struct pyflow_flow``."""
    if isinstance(items, FlowBatch):
        if items.values is None:
            raise ValueError("this FlowBatch holds keys only; insert needs values")
        return items
    if isinstance(items, tuple) and len(items) == 2 and _is_raw(items[0]) and _is_raw(items[1]):
        nk = _buffer_count(items[0], KEY_SIZE, "keys")
        nv = _buffer_count(items[1], FLOW_SIZE, "values")
        if nk != nv:
            raise ValueError(f"{nk} keys but {nv} values")
        return FlowBatch(_as_c(items[0]), _as_c(items[1]), nk)
    seq = items if isinstance(items, list | tuple) else list(items)
    n = len(seq)
    # Bytes first, then one copy into the arrays: struct packing (abi.key_bytes/value_bytes)
    # is several times cheaper than filling cffi structs field by field.
    kparts: list[bytes] = []
    vparts: list[bytes] = []
    for i, (k, v) in enumerate(seq):
        if type(k) is FlowKey:
            kparts.append(key_bytes(k))
        elif isinstance(k, bytes | bytearray | memoryview) and len(k) == KEY_SIZE:
            kparts.append(bytes(k))
        else:
            raise TypeError(f"item {i}: key must be a FlowKey or {KEY_SIZE} bytes, got {type(k).__name__}")
        if type(v) is FlowAction:
            if type(k) is not FlowKey:
                raise TypeError(f"item {i}: a FlowAction needs a FlowKey (NAT defaults come from the key)")
            vparts.append(value_bytes(v, k))
        elif isinstance(v, bytes | bytearray | memoryview) and len(v) == FLOW_SIZE:
            vparts.append(bytes(v))
        else:
            raise TypeError(f"item {i}: value must be a FlowAction or {FLOW_SIZE} bytes, "
                            f"got {type(v).__name__}")
    return FlowBatch(_array(KEY_TYPE, kparts, n), _array(FLOW_TYPE, vparts, n), n)


def _array(ctype: str, parts: list[bytes], n: int) -> Any:
    """A cffi array of n ``ctype`` (at least one element) holding the joined parts."""
    arr = _alloc(f"{ctype}[]", max(n, 1))
    if n:
        ffi.memmove(arr, b"".join(parts), n * ffi.sizeof(ctype))
    return arr


def pack_keys(keys: Any) -> FlowBatch:
    """Keys -> FlowBatch (values None): a FlowBatch, Dump or Counters (their keys), a cffi array or
    buffer of whole keys, or an iterable of FlowKey / key bytes."""
    if isinstance(keys, FlowBatch | Dump | Counters):
        return FlowBatch(keys.keys, None, keys.n)
    if _is_raw(keys):
        return FlowBatch(_as_c(keys), None, _buffer_count(keys, KEY_SIZE, "keys"))
    seq = keys if isinstance(keys, list | tuple) else list(keys)
    n = len(seq)
    if n and all(type(k) is bytes for k in seq):
        joined = b"".join(seq)
        if len(joined) != n * KEY_SIZE:
            raise ValueError(f"key bytes must be {KEY_SIZE} long each")
        return FlowBatch(ffi.from_buffer(joined), None, n)
    parts: list[bytes] = []
    for i, k in enumerate(seq):
        if type(k) is FlowKey:
            parts.append(key_bytes(k))
        elif isinstance(k, bytes | bytearray | memoryview) and len(k) == KEY_SIZE:
            parts.append(bytes(k))
        else:
            raise TypeError(f"key {i}: must be a FlowKey or {KEY_SIZE} bytes, got {type(k).__name__}")
    return FlowBatch(_array(KEY_TYPE, parts, n), None, n)


def _split(buf: Any, n: int, size: int) -> list[bytes]:
    raw = ffi.buffer(buf, n * size)[:]
    return [raw[i : i + size] for i in range(0, n * size, size)]


class Lookup:
    """Result of ``FlowTable.lookup``: ``values[i]`` is valid where ``found[i]``."""

    __slots__ = ("keys", "values", "found", "n", "hits")

    def __init__(self, keys: Any, values: Any, found: Any, n: int, hits: int):
        self.keys, self.values, self.found, self.n, self.hits = keys, values, found, n, hits

    def __len__(self) -> int:
        return self.n

    @property
    def missing(self) -> list[int]:
        """Indices of the keys that were not in the map."""
        flags = ffi.buffer(self.found, self.n)[:]
        return [i for i, f in enumerate(flags) if not f]

    def value(self, i: int) -> Any:
        """``struct pyflow_flow`` of key i (a view into this result), or None if it was missing."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.values[i] if self.found[i] else None

    def value_bytes(self, i: int) -> bytes | None:
        v = self.value(i)
        return None if v is None else bytes(ffi.buffer(self.values + i, FLOW_SIZE))


class Dump:
    """The whole table: ``keys[i]`` / ``values[i]`` for i < n (cffi arrays owned by this object)."""

    __slots__ = ("keys", "values", "n")

    def __init__(self, keys: Any, values: Any, n: int):
        self.keys, self.values, self.n = keys, values, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for i in range(self.n):
            yield self.keys[i], self.values[i]

    def key_bytes(self) -> list[bytes]:
        return _split(self.keys, self.n, KEY_SIZE)

    def value_bytes(self) -> list[bytes]:
        return _split(self.values, self.n, FLOW_SIZE)

    def as_dict(self) -> dict[bytes, bytes]:
        """key bytes -> value bytes (for tests and tools; the arrays are the fast path)."""
        return dict(zip(self.key_bytes(), self.value_bytes(), strict=True))

    def batch(self) -> FlowBatch:
        return FlowBatch(self.keys, self.values, self.n)


class Counters:
    """Keys with what the keep-alive needs of each value (``struct pyflow_ft_counters``:
    packets, bytes, the closing flag); the rest of the value is not copied."""

    __slots__ = ("keys", "counters", "n")

    def __init__(self, keys: Any, counters: Any, n: int):
        self.keys, self.counters, self.n = keys, counters, n

    def __len__(self) -> int:
        return self.n

    def key_bytes(self) -> list[bytes]:
        """The keys alone (no counters decoded)."""
        return _split(self.keys, self.n, KEY_SIZE)

    def rows(self) -> Iterator[tuple[bytes, tuple[int, ...]]]:
        """(key bytes, (packets, bytes, closing)) per entry, decoded in bulk."""
        tuples = _COUNTERS.iter_unpack(ffi.buffer(self.counters, self.n * COUNTERS_SIZE))
        return zip(_split(self.keys, self.n, KEY_SIZE), tuples, strict=True)

    def as_dict(self) -> dict[bytes, tuple[int, ...]]:
        return dict(self.rows())


def estimated_memory(max_entries: int) -> int:
    """The kernel memory of a preallocated flow map of max_entries (FlowTable.memory_bytes
    when the kernel does not say): per element its 48-byte header, the key and the value
    (each rounded to 8 bytes), per bucket 16 bytes, buckets a power of two."""
    elem = 48 + (KEY_SIZE + 7) // 8 * 8 + (FLOW_SIZE + 7) // 8 * 8
    return max_entries * elem + (1 << max(0, max_entries - 1).bit_length()) * 16


class FlowTable:
    """A kernel flow map (``struct pyflow_flow_key`` -> ``struct pyflow_flow``) by its fd.

    The map's key and value sizes are checked against the ABI on open. ``per_element=True``
    forces the per-element syscall path everywhere (the fallback; tests compare the two).
    One object is for one thread: it reuses one native result struct (``last``) across calls.
    """

    def __init__(self, fd: int, *, name: str | None = None, owns_fd: bool = False, per_element: bool = False):
        self._fd = -1
        self._owns = owns_fd
        self._force = per_element
        self._refused: set[str] = set()
        self._ft = ffi.new("struct pyflow_ft *")
        self._res = ffi.new("struct pyflow_ft_result *")
        self.last = self._res  # result of the latest native call: syscalls, fallback, chunk ...
        self.dump_chunk = 0  # 0: csrc default; grown after -ENOSPC and remembered
        info = ffi.new("struct pyflow_map_info *")
        ret = lib.pyflow_map_info(fd, info)
        label = name or f"fd {fd}"
        try:
            if ret < 0:
                raise MapError(f"{label}: not an open BPF map: {_errname(ret)}")
            self.name = name or ffi.string(info.name).decode(errors="replace") or f"map id {info.id}"
            if info.type not in FLOW_MAP_TYPES:
                raise MapError(f"{self.name}: map type {info.type} is not a flow map (need hash or lru_hash)")
            if info.key_size != KEY_SIZE or info.value_size != FLOW_SIZE:
                raise MapError(
                    f"{self.name}: key/value size {info.key_size}/{info.value_size} does not match the ABI's "
                    f"{KEY_TYPE}/{FLOW_TYPE} {KEY_SIZE}/{FLOW_SIZE} (built from another pyflow_abi.h?)"
                )
        except MapError:
            if owns_fd and fd >= 0:
                os.close(fd)
            raise
        self._fd = fd
        self.id = info.id
        self.map_type = FLOW_MAP_TYPES[info.type]
        self.max_entries = info.max_entries
        self._ft.fd, self._ft.key_size, self._ft.value_size = fd, KEY_SIZE, FLOW_SIZE

    # ---- opening and closing ------------------------------------------------------------

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str], *, per_element: bool = False) -> FlowTable:
        """Open a map pinned in bpffs; the table owns (and closes) the new fd."""
        p = os.fspath(path)
        fd = lib.pyflow_obj_get(p.encode())
        if fd < 0:
            raise MapError(f"{p}: cannot open pinned map: {_errname(fd)}")
        return cls(fd, name=p, owns_fd=True, per_element=per_element)

    @classmethod
    def create(cls, max_entries: int, *, name: str = "pyflow_flows", lru: bool = False,
               per_element: bool = False) -> FlowTable:
        """A new, unpinned flow map with the ABI's layout (tests, benchmarks, tools); owned."""
        mtype = BPF_MAP_TYPE_LRU_HASH if lru else BPF_MAP_TYPE_HASH
        fd = lib.pyflow_map_create(mtype, KEY_SIZE, FLOW_SIZE, max_entries, name.encode()[:15])
        if fd < 0:
            raise MapError(f"{name}: cannot create map of {max_entries} entries: {_errname(fd)}")
        return cls(fd, owns_fd=True, per_element=per_element)

    @property
    def fd(self) -> int:
        return self._check()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Forget the map; closes the fd if this table opened it. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owns:
            os.close(fd)

    def __enter__(self) -> FlowTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return f"<FlowTable {getattr(self, 'name', '?')} {state}>"

    def _check(self) -> int:
        if self._fd < 0:
            raise MapError(f"{getattr(self, 'name', 'flow table')}: flow table is closed")
        return self._fd

    def _flags(self, op: str) -> int:
        return lib.PYFLOW_FT_NO_BATCH if self._force or op in self._refused else 0

    def _note(self, op: str) -> None:
        if self._res.fallback:
            self._refused.add(op)  # the kernel will refuse it again for this map: skip the try

    def _fail(self, op: str, ret: int, total: int, what: str = "") -> BatchError:
        r = self._res
        hint = ""
        if -ret in (errno_mod.E2BIG, errno_mod.ENOSPC, errno_mod.ENOMEM) and op == "insert":
            hint = f" (map full? max_entries {self.max_entries})"
        msg = (f"{self.name}: {op}{what} stopped at element {r.index} of {total}, {r.done} applied: "
               f"{_errname(ret)}{hint}")
        return BatchError(msg, op=op, errno=-ret, applied=r.done, index=r.index, total=total)

    # ---- writes -------------------------------------------------------------------------

    def insert(self, items: Any, *, mode: str = "any") -> int:
        """Write entries; returns how many. mode: "any" (create or replace), "new" (fail with EEXIST
        on an existing key), "existing" (fail with ENOENT on a missing key). Raises BatchError
        (a MapError) naming how many were applied on a partial failure."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self._check()
        b = pack(items)
        if b.n == 0:
            return 0
        op = f"update:{mode}"
        ret = lib.pyflow_ft_update(self._ft, b.keys, b.values, b.n, MODES[mode], self._flags(op), self._res)
        self._note(op)
        if ret < 0:
            raise self._fail("insert", ret, b.n, f" (mode {mode})")
        return b.n

    def delete(self, keys: Any, *, missing_ok: bool = True) -> list[int]:
        """Delete keys; returns the indices of keys that were not in the map. With
        ``missing_ok=False`` an absent key stops the batch with BatchError (ENOENT)."""
        self._check()
        b = pack_keys(keys)
        if b.n == 0:
            return []
        missing = _alloc("uint8_t[]", b.n) if missing_ok else ffi.NULL
        ret = lib.pyflow_ft_delete(self._ft, b.keys, b.n, missing, self._flags("delete"), self._res)
        self._note("delete")
        if ret < 0:
            raise self._fail("delete", ret, b.n)
        if not missing_ok or self._res.missing == 0:
            return []
        flags = ffi.buffer(missing, b.n)[:]
        return [i for i, f in enumerate(flags) if f]

    def clear(self) -> int:
        """Delete every entry; returns how many were deleted."""
        d = self.dump()
        if d.n:
            self.delete(d, missing_ok=True)
        return self._res.done

    # ---- reads --------------------------------------------------------------------------

    def lookup(self, keys: Any) -> Lookup:
        """Values of the given keys (one BPF_MAP_LOOKUP_ELEM each, looped in C)."""
        self._check()
        b = pack_keys(keys)
        values = _alloc(f"{FLOW_TYPE}[]", max(b.n, 1))
        found = _alloc("uint8_t[]", max(b.n, 1))
        ret = lib.pyflow_ft_lookup(self._ft, b.keys, values, b.n, found, 0, self._res)
        if ret < 0:
            raise self._fail("lookup", ret, b.n)
        return Lookup(b.keys, values, found, b.n, self._res.done)

    def get(self, key: FlowKey | bytes) -> Any:
        """One key's ``struct pyflow_flow`` (a cffi object), or None."""
        return self.lookup([key]).value(0)

    def _walk(self, op: str, call: Any, out_type: str) -> tuple[Any, Any, int]:
        """Run a table walk into arrays sized for the whole map, growing them if the table
        held more than that (entries added and removed while it was walked)."""
        self._check()
        cap = self.max_entries + 1
        for _ in range(4):
            keys = _alloc(f"{KEY_TYPE}[]", cap)
            out = _alloc(f"{out_type}[]", cap)
            ret = call(self._ft, keys, out, cap, self.dump_chunk, self._flags("walk"), self._res)
            self._note("walk")
            if self._res.chunk > self.dump_chunk:
                self.dump_chunk = self._res.chunk  # a bucket needed more room once: keep it
            if ret == -errno_mod.ENOSPC:
                cap *= 2
                continue
            if ret < 0:
                raise MapError(f"{self.name}: {op} failed after {self._res.done} entries: {_errname(ret)}")
            return keys, out, self._res.done
        raise MapError(f"{self.name}: {op} gave up: the table kept outgrowing {cap // 2} entries")

    def dump(self) -> Dump:
        """Every key and value (BPF_MAP_LOOKUP_BATCH, one syscall per chunk)."""
        return Dump(*self._walk("dump", lib.pyflow_ft_dump, FLOW_TYPE))

    def read_counters(self) -> Counters:
        """Every key with its counters (the dump, keeping only the counters part in C)."""
        return Counters(*self._walk("read_counters", lib.pyflow_ft_read_counters, COUNTERS_TYPE))

    def memory_bytes(self) -> int:
        """Kernel memory the map holds: what the kernel accounts for it (the map fd's
        ``memlock`` line), else an estimate. A hash map preallocates all of max_entries:
        each element is the kernel's 48-byte header with the key and the value, plus a
        16-byte bucket per entry rounded up to a power of two."""
        self._check()
        try:
            with open(f"/proc/self/fdinfo/{self._fd}") as f:
                for line in f:
                    if line.startswith("memlock:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return estimated_memory(self.max_entries)

    def count(self) -> int:
        """Entries in the map. A full walk (no cheap count exists for hash maps): O(entries)."""
        self._check()
        ret = lib.pyflow_ft_count(self._ft, self.dump_chunk, self._flags("walk"), self._res)
        self._note("walk")
        if ret < 0:
            raise MapError(f"{self.name}: count failed after {self._res.done} entries: {_errname(ret)}")
        return self._res.done

