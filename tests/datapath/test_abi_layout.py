"""The ABI as the kernel holds it equals the ABI as cffi reads it.

For the maps of a loaded datapath, of each build (the prebuilt object and bcc's
compile of the same source): the kernel's key and value sizes equal
cffi's sizeof, and the BTF the kernel keeps for each map (what clang made of
pyflow_abi.h for the BPF target) gives every member of the shared structs the
same offset and size that cffi (the host compiler) gives it. A header edit
that lays a struct out differently for the two compilers fails here, not in
a packet.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pyflow._native import ffi, lib
from pyflow.datapath import abi
from pyflow.datapath.loader import Datapath

pytestmark = pytest.mark.root

SHARED = ["pyflow_flow_key", "pyflow_flow", "pyflow_flow_action", "pyflow_flow_counters",
          "pyflow_l2_encap", "pyflow_stat"]
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_DEVMAP = 1, 6, 14


@pytest.fixture(scope="module", params=["prebuilt", "bcc"])
def dp(tmp_path_factory, request):
    pin_dir = f"/sys/fs/bpf/pft-abi-{os.getpid()}"
    d = Datapath(pin_dir, state_file=str(tmp_path_factory.mktemp("abi") / "state.json"), build=request.param)
    yield d
    d.destroy()
    assert not os.path.exists(pin_dir)


def map_info(table):
    info = ffi.new("struct pyflow_map_info *")
    assert lib.pyflow_map_info(table.map_fd, info) == 0
    return info


class Btf:
    """The kernel's BTF object, as ``bpftool btf dump id N -j`` prints it."""

    def __init__(self, btf_id: int) -> None:
        out = subprocess.run(["bpftool", "btf", "dump", "id", str(btf_id), "-j"],
                             capture_output=True, text=True, check=True).stdout
        self.types = {t["id"]: t for t in json.loads(out)["types"]}

    def resolve(self, type_id: int) -> dict:
        """Through typedef / const / volatile to the type that has a layout."""
        t = self.types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = self.types[t["type_id"]]
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t["kind"] == "ARRAY":
            return t["nr_elems"] * self.size(t["type_id"])
        return t["size"]

    def struct(self, name: str) -> dict:
        found = [t for t in self.types.values() if t["kind"] == "STRUCT" and t.get("name") == name]
        assert len(found) == 1, f"struct {name}: {len(found)} definitions in BTF"
        return found[0]


def layout_matches(btf: Btf, struct: dict, seen: set[str]) -> None:
    """Size, member names, offsets and member sizes of ``struct`` (and nested structs)."""
    name = struct["name"]
    seen.add(name)
    ctype = ffi.typeof(f"struct {name}")
    assert struct["size"] == ffi.sizeof(ctype), f"sizeof(struct {name})"
    cfields = dict(ctype.fields)
    assert [m["name"] for m in struct["members"]] == [f for f, _ in ctype.fields], f"members of {name}"
    for m in struct["members"]:
        field = cfields[m["name"]]
        assert m["bits_offset"] % 8 == 0 and "bitfield_size" not in m, f"{name}.{m['name']} is a bitfield"
        assert m["bits_offset"] // 8 == ffi.offsetof(ctype, m["name"]) == field.offset, \
            f"offsetof(struct {name}, {m['name']})"
        assert btf.size(m["type_id"]) == ffi.sizeof(field.type), f"sizeof {name}.{m['name']}"
        inner = btf.resolve(m["type_id"])
        if inner["kind"] == "STRUCT":
            layout_matches(btf, inner, seen)


def test_map_sizes_equal_cffi(dp):
    flows, stats, ports = map_info(dp.flows), map_info(dp.stats), map_info(dp.tx_ports)
    assert (flows.type, flows.key_size, flows.value_size) == (
        BPF_MAP_TYPE_HASH, ffi.sizeof("struct pyflow_flow_key"), ffi.sizeof("struct pyflow_flow"))
    assert flows.max_entries == lib.PYFLOW_MAX_FLOWS
    assert (stats.type, stats.key_size, stats.value_size) == (
        BPF_MAP_TYPE_PERCPU_ARRAY, 4, ffi.sizeof("struct pyflow_stat"))
    assert stats.max_entries == lib.PYFLOW_R__COUNT
    assert (ports.type, ports.key_size, ports.value_size) == (BPF_MAP_TYPE_DEVMAP, 4, 4)
    assert ports.max_entries == lib.PYFLOW_MAX_TX_PORTS
    named = ((dp.flows, abi.MAP_FLOWS), (dp.stats, abi.MAP_STATS), (dp.tx_ports, abi.MAP_TX_PORTS))
    for table, name in named:
        assert ffi.string(map_info(table).name).decode() == name


def test_btf_layout_of_the_flow_map_equals_cffi(dp):
    info = map_info(dp.flows)
    assert info.btf_id, "the flow map carries no BTF"
    btf = Btf(info.btf_id)
    key, value = btf.resolve(info.btf_key_type_id), btf.resolve(info.btf_value_type_id)
    assert (key.get("name"), value.get("name")) == ("pyflow_flow_key", "pyflow_flow")
    seen: set[str] = set()
    layout_matches(btf, key, seen)
    layout_matches(btf, value, seen)
    assert seen == {"pyflow_flow_key", "pyflow_flow", "pyflow_flow_action",
                    "pyflow_flow_counters", "pyflow_l2_encap"}


def test_btf_layout_of_the_stats_map_equals_cffi(dp):
    info = map_info(dp.stats)
    assert info.btf_id, "the stats map carries no BTF"
    btf = Btf(info.btf_id)
    value = btf.resolve(info.btf_value_type_id)
    assert value.get("name") == "pyflow_stat"
    seen: set[str] = set()
    layout_matches(btf, value, seen)
    assert seen == {"pyflow_stat"}


def test_every_shared_struct_is_checked_somewhere(dp):
    """All SHARED structs are in the program's BTF, once each, with cffi's layout."""
    btf = Btf(map_info(dp.flows).btf_id)
    seen: set[str] = set()
    for name in SHARED:
        layout_matches(btf, btf.struct(name), seen)
    assert seen == set(SHARED)
