"""FlowTable and csrc/flowtable.c against real kernel maps (root, BPF).

The maps are made with pyflow_map_create (a hash map with the ABI's key and value
sizes), so these tests do not depend on the datapath source. Every operation is
checked on the batch path and, where it matters, against the forced per-element
fallback, which must give identical results and identical partial-failure reports.
"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from pyflow._native import ffi, lib
from pyflow.datapath.abi import (
    FLOW_SIZE,
    FLOW_TYPE,
    KEY_SIZE,
    KEY_TYPE,
    FlowAction,
    FlowKey,
    flow_value,
    key_bytes,
)
from pyflow.datapath.flowtable import (
    BPF_MAP_TYPE_HASH,
    BatchError,
    Counters,
    Dump,
    FlowBatch,
    FlowTable,
    pack,
    pack_keys,
)
from pyflow.errors import MapError

pytestmark = pytest.mark.root

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5

ACTION_A = FlowAction(out_ifindex=2, tx_port=0, mtu=1500, in_mac="02:00:00:00:00:01",
                      dmac="02:00:00:00:00:02", smac="02:00:00:00:00:03",
                      nat_saddr="198.19.0.1", nat_sport=40000)
ACTION_B = FlowAction(out_ifindex=3, tx_port=1, mtu=1400, in_mac="02:00:00:00:00:11",
                      dmac="02:00:00:00:00:12", smac="02:00:00:00:00:13")


def key(i: int, v6: bool = False) -> FlowKey:
    if v6:
        return FlowKey(ifindex=7, proto=17, saddr=f"2001:2::{i:x}", daddr="2001:2:0:1::1",
                       sport=1024 + i % 60000, dport=53)
    return FlowKey(ifindex=5, proto=6, saddr=f"198.18.{(i >> 8) & 255}.{i & 255}", daddr="198.19.1.1",
                   sport=1024 + (i >> 16), dport=443)


def items(lo: int, hi: int, action: FlowAction = ACTION_A) -> list[tuple[FlowKey, FlowAction]]:
    return [(key(i, v6=bool(i % 2)), action) for i in range(lo, hi)]


def expected(pairs) -> dict[bytes, bytes]:
    return {key_bytes(k): bytes(ffi.buffer(flow_value(a, k))) for k, a in pairs}


def with_counters(k: FlowKey, a: FlowAction, packets: int, nbytes: int, closing: int) -> bytes:
    """The value as the datapath leaves it after forwarding (and, closing, FIN/RST)."""
    v = flow_value(a, k)
    v.counters.packets, v.counters.bytes, v.action.closing = packets, nbytes, closing
    return bytes(ffi.buffer(v))


@pytest.fixture(params=["batch", "per_element"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def table(mode):
    with FlowTable.create(1024, per_element=(mode == "per_element")) as t:
        yield t


# ---- round trips -------------------------------------------------------------------------


def test_one_entry_round_trip(table):
    pairs = items(0, 1)
    assert table.insert(pairs) == 1
    assert table.count() == 1
    d = table.dump()
    assert isinstance(d, Dump) and d.as_dict() == expected(pairs)
    found = table.lookup([pairs[0][0]])
    assert found.hits == 1 and found.missing == []
    assert found.value_bytes(0) == expected(pairs)[key_bytes(pairs[0][0])]
    assert table.get(pairs[0][0]).action.mtu == 1500
    assert table.delete([pairs[0][0]]) == []
    assert table.count() == 0 and len(table.dump()) == 0
    assert table.get(pairs[0][0]) is None


def test_many_entries_round_trip_one_syscall_per_batch():
    n = 50_000
    pairs = items(0, n)
    batch = pack(pairs)
    with FlowTable.create(65536) as t:
        assert t.insert(batch) == n
        assert t.last.syscalls == 1 and t.last.fallback == 0
        assert t.count() == n
        d = t.dump()
        assert d.n == n and d.as_dict() == expected(pairs)
        look = t.lookup(batch)
        assert look.hits == n and look.missing == []
        assert ffi.buffer(look.values, n * FLOW_SIZE)[:] == ffi.buffer(batch.values, n * FLOW_SIZE)[:]
        c = t.read_counters()
        assert isinstance(c, Counters) and c.n == n
        assert set(c.as_dict()) == set(d.key_bytes())
        assert t.delete(batch) == []
        assert t.last.syscalls == 1
        assert t.count() == 0


def test_per_element_fallback_gives_identical_results():
    n = 3000
    pairs = items(0, n)
    with FlowTable.create(4096) as fast, FlowTable.create(4096, per_element=True) as slow:
        for t in (fast, slow):
            t.insert(pairs)
            t.insert(items(0, 500, ACTION_B), mode="existing")
            assert t.delete([k for k, _ in pairs[2500:2600]] + [key(999_999)]) == [100]
        assert slow.last.syscalls == 101  # one per key: the fallback really ran
        assert fast.dump().as_dict() == slow.dump().as_dict()
        assert fast.read_counters().as_dict() == slow.read_counters().as_dict()
        assert slow.last.fallback == 0 and slow.last.syscalls > n  # GET_NEXT_KEY + LOOKUP per entry
        probe = [k for k, _ in pairs[2450:2650]]
        lf, ls = fast.lookup(probe), slow.lookup(probe)
        assert lf.missing == ls.missing == list(range(50, 150))
        assert fast.count() == slow.count() == n - 100


# ---- modes ---------------------------------------------------------------------------------


def test_mode_any_replaces_values(table):
    table.insert(items(0, 10))
    table.insert(items(5, 15, ACTION_B), mode="any")
    assert table.dump().as_dict() == expected(items(0, 5) + items(5, 15, ACTION_B))


def test_mode_new_inserts_and_stops_at_existing_key(table):
    table.insert(items(0, 10), mode="new")
    assert table.count() == 10
    with pytest.raises(BatchError) as exc:
        table.insert(items(10, 20) + items(5, 6, ACTION_B) + items(20, 30), mode="new")
    e = exc.value
    assert isinstance(e, MapError)
    assert (e.errno, e.applied, e.index, e.total, e.op) == (errno.EEXIST, 10, 10, 21, "insert")
    assert "EEXIST" in str(e) and "10 applied" in str(e) and "\n" not in str(e)
    # Elements before the failure are in, the failing one kept its old value, later ones were not tried.
    assert table.dump().as_dict() == expected(items(0, 20))


def test_mode_existing_updates_and_stops_at_missing_key(table):
    table.insert(items(0, 10))
    table.insert(items(0, 10, ACTION_B), mode="existing")
    assert table.dump().as_dict() == expected(items(0, 10, ACTION_B))
    with pytest.raises(BatchError) as exc:
        table.insert(items(0, 3) + items(50, 51) + items(3, 10), mode="existing")
    assert (exc.value.errno, exc.value.applied, exc.value.index) == (errno.ENOENT, 3, 3)
    assert table.dump().as_dict() == expected(items(0, 3) + items(3, 10, ACTION_B))


def test_kernel_refusing_batch_flags_falls_back_transparently_and_remembers():
    """The kernel's update_batch accepts no BPF_NOEXIST/BPF_EXIST: the C side must notice the
    refusal (nothing applied), redo it per element, and the table must skip the try next time."""
    with FlowTable.create(256) as t:
        t.insert(items(0, 20), mode="new")
        assert t.last.fallback == 1 and t.last.syscalls == 21
        t.insert(items(20, 40), mode="new")
        assert t.last.fallback == 0 and t.last.syscalls == 20
        t.insert(items(40, 60), mode="any")
        assert t.last.syscalls == 1
        assert t.dump().as_dict() == expected(items(0, 60))


def test_bad_mode_is_refused(table):
    with pytest.raises(ValueError, match="mode"):
        table.insert(items(0, 1), mode="upsert")


# ---- lookups and deletes of absent keys -----------------------------------------------------


def test_lookup_reports_missing_keys(table):
    table.insert(items(0, 10))
    probe = [key(i, v6=bool(i % 2)) for i in (0, 100, 3, 101, 9)]
    r = table.lookup(probe)
    assert r.n == 5 and r.hits == 3 and r.missing == [1, 3]
    assert r.value(1) is None and r.value_bytes(3) is None
    assert r.value_bytes(2) == expected(items(3, 4))[key_bytes(probe[2])]


def test_delete_skips_and_reports_missing_keys(table):
    table.insert(items(0, 10))
    ks = [key(i, v6=bool(i % 2)) for i in (100, 0, 1, 101, 102, 2)]
    assert table.delete(ks) == [0, 3, 4]
    assert table.last.done == 3 and table.last.missing == 3
    assert table.dump().as_dict() == expected(items(3, 10))


def test_strict_delete_stops_at_first_missing_key(table):
    table.insert(items(0, 10))
    ks = [key(i, v6=bool(i % 2)) for i in (0, 1, 100, 2)]
    with pytest.raises(BatchError) as exc:
        table.delete(ks, missing_ok=False)
    e = exc.value
    assert (e.errno, e.applied, e.index, e.op) == (errno.ENOENT, 2, 2, "delete")
    assert table.dump().as_dict() == expected(items(2, 10))


# ---- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("per_element", [False, True])
def test_map_full_reports_partial_count(per_element):
    with FlowTable.create(100, per_element=per_element) as t:
        with pytest.raises(BatchError) as exc:
            t.insert(items(0, 150))
        e = exc.value
        assert e.errno == errno.E2BIG and e.applied == 100 and e.index == 100 and e.total == 150
        assert "map full" in str(e) and "pyflow_flows" in str(e)
        assert t.dump().as_dict() == expected(items(0, 100))


def test_lru_map_evicts_instead_of_failing():
    with FlowTable.create(100, lru=True) as t:
        assert t.map_type == "lru_hash"
        assert t.insert(items(0, 150)) == 150
        assert 0 < t.count() <= 100


def test_dump_grows_batch_when_a_bucket_does_not_fit(mode):
    """64 keys in 64 buckets always collide somewhere: with room for one entry per call the
    kernel answers ENOSPC for a two-entry bucket, and the walk must grow the batch and go on."""
    with FlowTable.create(64, per_element=(mode == "per_element")) as t:
        t.insert(items(0, 64))
        t.dump_chunk = 1
        d = t.dump()
        assert d.as_dict() == expected(items(0, 64))
        if mode == "batch":
            assert t.dump_chunk > 1  # grown, and remembered for the next walk
        assert t.read_counters().n == 64 and t.count() == 64


@pytest.mark.parametrize("flags", [0, 1])
def test_native_dump_reports_too_small_buffer(flags):
    with FlowTable.create(64) as t:
        t.insert(items(0, 20))
        res = ffi.new("struct pyflow_ft_result *")
        inserted = expected(items(0, 20))
        for cap, want_ret, want_done in ((10, -errno.ENOSPC, 10), (20, 0, 20), (21, 0, 20)):
            keys = ffi.new(f"{KEY_TYPE}[]", cap)
            values = ffi.new(f"{FLOW_TYPE}[]", cap)
            ret = lib.pyflow_ft_dump(t._ft, keys, values, cap, 0, flags, res)
            assert ret == want_ret, cap
            if ret == -errno.ENOSPC and not flags:
                # the batch walk copies whole buckets: with a random hash seed the bucket
                # that would cross the end of the room is left out, so done may fall short
                assert 0 < res.done <= want_done, cap
            else:
                assert res.done == want_done, cap
            for i in range(res.done):
                kb = bytes(ffi.buffer(keys + i, KEY_SIZE))
                assert inserted[kb] == bytes(ffi.buffer(values + i, FLOW_SIZE))


# ---- counters -------------------------------------------------------------------------------


def test_read_counters_copies_the_counters_part(table):
    ks = [key(i) for i in range(5)]
    raw_keys = b"".join(key_bytes(k) for k in ks)
    raw_vals = b"".join(with_counters(k, ACTION_A, 10 + i, 1500 * i, i % 2) for i, k in enumerate(ks))
    table.insert((raw_keys, raw_vals))
    got = table.read_counters().as_dict()
    assert got == {key_bytes(k): (10 + i, 1500 * i, i % 2) for i, k in enumerate(ks)}
    # and the same numbers as the full dump holds
    for k, v in table.dump():
        kb = bytes(ffi.buffer(ffi.addressof(k), KEY_SIZE))
        assert got[kb] == (v.counters.packets, v.counters.bytes, v.action.closing)


# ---- inputs ---------------------------------------------------------------------------------


def test_raw_inputs_cffi_arrays_buffers_and_batches(table):
    pairs = items(0, 8)
    b = pack(pairs)
    table.insert((b.keys, b.values))  # cffi arrays (sized: 8 entries)
    with FlowTable.create(64) as other:
        other.insert(table.dump().batch())  # a dump re-inserted elsewhere
        assert other.dump().as_dict() == expected(pairs)
        raw = list(expected(items(8, 12)).items())
        other.insert(raw)  # pairs of bytes
        assert other.count() == 12
    assert table.delete(pack_keys(b"".join(key_bytes(k) for k, _ in pairs[:4]))) == []
    assert table.count() == 4
    with pytest.raises(ValueError, match="keys but"):
        table.insert((b.keys, bytes(FLOW_SIZE)))
    with pytest.raises(ValueError, match="whole number"):
        table.insert((bytes(KEY_SIZE + 1), bytes(FLOW_SIZE)))
    with pytest.raises(TypeError, match="item 0"):
        table.insert([("not a key", ACTION_A)])
    with pytest.raises(ValueError, match="keys only"):
        table.insert(FlowBatch(b.keys, None, 8))
    assert table.insert([]) == 0 and table.delete([]) == [] and table.lookup([]).n == 0


# ---- opening: ABI checks, pins, closed and invalid fds ----------------------------------------


@pytest.mark.parametrize(
    "mtype,ksize,vsize,what",
    [
        (BPF_MAP_TYPE_HASH, KEY_SIZE - 8, FLOW_SIZE, f"key/value size {KEY_SIZE - 8}/{FLOW_SIZE}"),
        (BPF_MAP_TYPE_HASH, KEY_SIZE, FLOW_SIZE + 8, f"key/value size {KEY_SIZE}/{FLOW_SIZE + 8}"),
        (BPF_MAP_TYPE_PERCPU_HASH, KEY_SIZE, FLOW_SIZE, "map type 5 is not a flow map"),
        (BPF_MAP_TYPE_ARRAY, 4, FLOW_SIZE, "map type 2 is not a flow map"),
    ],
)
def test_wrong_map_layout_is_refused(mtype, ksize, vsize, what):
    fd = lib.pyflow_map_create(mtype, ksize, vsize, 16, b"pft_wrong")
    assert fd >= 0, os.strerror(-fd)
    try:
        with pytest.raises(MapError, match="pft_wrong") as exc:
            FlowTable(fd)
        assert what in str(exc.value)
    finally:
        os.close(fd)


def test_refused_owned_fd_is_closed():
    fd = lib.pyflow_map_create(BPF_MAP_TYPE_HASH, 8, 8, 4, b"pft_small")
    with pytest.raises(MapError):
        FlowTable(fd, owns_fd=True)
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_from_pin_opens_the_same_map():
    path = f"/sys/fs/bpf/pft-flowtable-{os.getpid()}"
    with FlowTable.create(64) as t:
        assert lib.pyflow_obj_pin(t.fd, path.encode()) == 0
        try:
            with FlowTable.from_pin(path) as pinned:
                assert pinned.id == t.id and pinned.fd != t.fd
                pinned.insert(items(0, 3))
            assert pinned.closed
            assert t.dump().as_dict() == expected(items(0, 3))
        finally:
            os.unlink(path)
    with pytest.raises(MapError, match=f"{path}: cannot open pinned map: ENOENT"):
        FlowTable.from_pin(path)


def test_invalid_fds_are_refused():
    with pytest.raises(MapError, match="fd 99999: not an open BPF map: EBADF"):
        FlowTable(99999)
    with tempfile.TemporaryFile() as f, pytest.raises(MapError, match="not an open BPF map"):
        FlowTable(f.fileno())


def test_closed_table_refuses_every_operation():
    t = FlowTable.create(16)
    fd = t.fd
    t.close()
    t.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)  # owned fd really closed
    for call in (lambda: t.insert(items(0, 1)), lambda: t.delete([key(0)]), lambda: t.lookup([key(0)]),
                 t.dump, t.read_counters, t.count, t.clear, lambda: t.fd):
        with pytest.raises(MapError, match="flow table is closed"):
            call()


def test_fd_closed_behind_the_tables_back_gives_ebadf():
    fd = lib.pyflow_map_create(BPF_MAP_TYPE_HASH, KEY_SIZE, FLOW_SIZE, 16, b"pft_borrowed")
    t = FlowTable(fd)  # borrowed: the table must not close it
    t.close()
    os.fstat(fd)  # still open
    t = FlowTable(fd)
    os.close(fd)
    with pytest.raises(BatchError) as exc:
        t.insert(items(0, 2))
    assert exc.value.errno == errno.EBADF and exc.value.applied == 0 and "EBADF" in str(exc.value)
    with pytest.raises(MapError, match="dump failed after 0 entries: EBADF"):
        t.dump()


def test_clear_empties_the_table(table):
    table.insert(items(0, 300))
    assert table.clear() == 300
    assert table.count() == 0
