"""A restart of the prebuilt datapath reuses the pinned programs when they are the same
programs (same object bytes, same map sizes), and loads afresh otherwise.

The load record lives next to the state file (``state.progs.json`` for the fixtures'
``state.json``). Whether programs were loaded is read from the kernel: the program ids on
the devices and behind the pins, and a loader that fails if it is called at all.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pyflow._native import ffi, lib
from pyflow.datapath import bpfobject
from pyflow.datapath.abi import FLOW_SIZE, KEY_SIZE, MAP_FLOWS, MAP_STATS
from pyflow.datapath.attach import programs
from pyflow.datapath.attach.pins import PinDir
from pyflow.datapath.attach.programs import map_info
from pyflow.datapath.loader import PIN_TC, PIN_XDP, Datapath
from pyflow.errors import DatapathError
from tests.support.datapath import link_xdp, our_filter

pytestmark = pytest.mark.root

XDP_ATTACHED_DRV = 1
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 6


def _tc_prog_id(ns: str, ifname: str) -> int:
    f = our_filter(ns, ifname)
    assert f is not None, f"{ifname}: no pyflow TC filter"
    return int(f["options"]["prog"]["id"])


def _pinned(dp: Datapath) -> tuple[int | None, int | None]:
    pins = PinDir(dp.pin_dir)
    return pins.pinned_prog_id(PIN_XDP), pins.pinned_prog_id(PIN_TC)


def _record(make_dp) -> Path:
    state = Path(make_dp.state_file)
    return state.with_name(state.stem + ".progs.json")


def _start(make_dp, ns: str, **kw) -> tuple[int, int]:
    """A first process: both devices attached, then gone (its programs keep running)."""
    a = make_dp(**kw)
    a.attach("pft-a", "native")
    a.attach("pft-b", "tc")
    ids = a.xdp_prog_id, a.tc_prog_id
    assert _pinned(a) == ids
    a.close()
    return ids


def _no_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the datapath object was loaded")

    monkeypatch.setattr(bpfobject, "load", refuse)


def test_restart_with_the_same_object_reuses_the_pinned_programs(make_dp, ns, monkeypatch):
    xdp_id, tc_id = _start(make_dp, ns)
    record = json.loads(_record(make_dp).read_text())
    assert record["prog_ids"] == {PIN_XDP: xdp_id, PIN_TC: tc_id}
    assert record["identity"] == bpfobject.identity()

    _no_load(monkeypatch)  # no program load, no verifier run
    b = make_dp()
    assert (b.xdp_prog_id, b.tc_prog_id) == (xdp_id, tc_id)
    assert _pinned(b) == (xdp_id, tc_id)
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, xdp_id)
    assert _tc_prog_id(ns, "pft-b") == tc_id
    # what a restarted daemon does next: attach its devices again; nothing changes
    assert b.attach("pft-a", "native").prog_id == xdp_id
    assert b.attach("pft-b", "tc").prog_id == tc_id
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, xdp_id)
    assert _tc_prog_id(ns, "pft-b") == tc_id
    # the maps in use are the pinned ones the programs were loaded with
    assert {n: map_info(t).id for n, t in b._progs.maps().items()} == record["map_ids"]
    b.close()
    monkeypatch.undo()


def test_restart_with_another_map_size_loads_afresh(make_dp, ns):
    xdp_id, tc_id = _start(make_dp, ns)
    b = make_dp(defines={"PYFLOW_MAX_FLOWS": 8192})
    assert b.xdp_prog_id not in (xdp_id, tc_id) and b.tc_prog_id not in (xdp_id, tc_id)
    # still attached: the old programs run until the new ones are swapped in
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, xdp_id)
    assert _tc_prog_id(ns, "pft-b") == tc_id
    b.attach("pft-a", "native")
    b.attach("pft-b", "tc")
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, b.xdp_prog_id)
    assert _tc_prog_id(ns, "pft-b") == b.tc_prog_id
    new = b.xdp_prog_id, b.tc_prog_id
    b.close()
    # the record now names the new programs: the same tunables reuse them
    c = make_dp(defines={"PYFLOW_MAX_FLOWS": 8192})
    assert (c.xdp_prog_id, c.tc_prog_id) == new


def test_restart_with_another_object_loads_afresh(make_dp, ns, tmp_path, monkeypatch):
    xdp_id, tc_id = _start(make_dp, ns)
    upgraded = tmp_path / "upgraded.bpf.o"
    shutil.copyfile(bpfobject.object_path(), upgraded)
    with open(upgraded, "ab") as f:  # other bytes, same programs: trailing data libelf ignores
        f.write(b"\0" * 8)
    monkeypatch.setenv("PYFLOW_BPF_OBJECT", str(upgraded))
    b = make_dp()
    assert {b.xdp_prog_id, b.tc_prog_id}.isdisjoint({xdp_id, tc_id})
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, xdp_id)
    b.attach("pft-a", "native")
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, b.xdp_prog_id)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other ids"])
def test_restart_without_a_usable_record_loads_afresh(make_dp, ns, damage):
    xdp_id, tc_id = _start(make_dp, ns)
    record = _record(make_dp)
    if damage == "missing":
        record.unlink()
    elif damage == "corrupt":
        record.write_text("{not json")
    else:  # pins replaced since the record was written (a bcc build, by hand)
        data = json.loads(record.read_text())
        data["prog_ids"][PIN_XDP] += 100000
        record.write_text(json.dumps(data))
    b = make_dp()
    assert {b.xdp_prog_id, b.tc_prog_id}.isdisjoint({xdp_id, tc_id})
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, xdp_id)
    assert _tc_prog_id(ns, "pft-b") == tc_id


def test_a_bcc_build_drops_the_record(make_dp, ns):
    _start(make_dp, ns)
    b = make_dp(build="bcc")
    b.attach("pft-a", "native")
    assert not _record(make_dp).exists()
    bcc_id = b.xdp_prog_id
    b.close()
    c = make_dp()
    assert c.xdp_prog_id != bcc_id
    assert link_xdp(ns, "pft-a") == (XDP_ATTACHED_DRV, bcc_id)


def test_destroy_removes_the_record(make_dp, ns):
    _start(make_dp, ns)
    b = make_dp()
    b.destroy()
    assert not _record(make_dp).exists()


def _pin_map(pins: PinDir, name: str, key_size: int, value_size: int, entries: int, map_type: int) -> int:
    fd = lib.pyflow_map_create(map_type, key_size, value_size, entries, name.encode())
    assert fd >= 0, f"map create: errno {-fd}"
    assert lib.pyflow_obj_pin(fd, pins.pin_path(name).encode()) == 0
    return fd


def _pinned_id(pins: PinDir, name: str) -> int:
    fd = pins.pinned_fd(name)
    assert fd is not None, f"{name} not pinned"
    try:
        info = ffi.new("struct pyflow_map_info *")
        assert lib.pyflow_map_info(fd, info) == 0
        return info.id
    finally:
        lib.pyflow_close(fd)


@pytest.mark.parametrize("build", ["prebuilt", "bcc"])
def test_maps_pinned_with_another_layout_are_replaced(make_dp, pin_dir, build, caplog, monkeypatch):
    """A flow map pinned by a version whose value had another size (112 bytes, with a
    per-flow clock) and a stats map with fewer reasons are not adopted: the load makes
    new ones and says so. A load that fails pins the old ones back, as they were."""
    pins = PinDir(pin_dir)
    pins.prepare()
    old_flows = _pin_map(pins, MAP_FLOWS, KEY_SIZE, 112, 64, BPF_MAP_TYPE_HASH)
    old_stats = _pin_map(pins, MAP_STATS, 4, 16, 3, BPF_MAP_TYPE_PERCPU_ARRAY)
    try:
        ids = {n: _pinned_id(pins, n) for n in (MAP_FLOWS, MAP_STATS)}

        def fail(fd: int) -> int:  # after the new maps were made and pinned, in both builds
            raise DatapathError("test: the load fails half way")

        monkeypatch.setattr(programs, "fd_prog_id", fail)
        with pytest.raises(DatapathError, match="half way"):
            make_dp(build=build)
        monkeypatch.undo()
        assert {n: _pinned_id(pins, n) for n in ids} == ids  # as it was
        assert sorted(pins.entries()) == sorted([MAP_FLOWS, MAP_STATS])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pyflow.datapath.attach.pins"):
            dp = make_dp(build=build)
        assert all(_pinned_id(pins, n) != ids[n] for n in ids)
        flows = map_info(dp.flows)
        assert (flows.key_size, flows.value_size) == (KEY_SIZE, FLOW_SIZE)
        assert map_info(dp.stats).max_entries == lib.PYFLOW_R__COUNT
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "48/112" in said and "another pyflow version" in said, said
    finally:
        lib.pyflow_close(old_flows)
        lib.pyflow_close(old_stats)
