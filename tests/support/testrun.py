"""The datapath for BPF_PROG_TEST_RUN: both hooks loaded from one build (the prebuilt
object through libbpf, or bcc's compile of the same source), the map operations packet
tests need, and how to judge a run's verdict and output frame."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyflow._native import ffi
from pyflow.datapath import abi, bpfobject
from pyflow.datapath.attach.maps import datapath_tables
from pyflow.datapath.bpfsource import TC_FUNC, XDP_FUNC, compile_datapath
from pyflow.datapath.testrun import TEST_IFINDEX, RunResult, run
from tests.support.packets import TX_SLOT

XDP_PASS, XDP_REDIRECT = 2, 4
TC_ACT_UNSPEC, TC_ACT_REDIRECT = 0xFFFFFFFF, 7  # test run reports -1 as u32
# UAPI values (linux/bpf.h, linux/pkt_cls.h): the verdicts a pass and a redirect return
VERDICTS = {"xdp": (XDP_PASS, XDP_REDIRECT), "tc": (TC_ACT_UNSPEC, TC_ACT_REDIRECT)}

# Small maps: the packet tests need a handful of entries, not 256k preallocated ones.
# (bcc wants function and map names as bytes.)
TEST_DEFINES = {"PYFLOW_MAX_FLOWS": 1024}
BUILDS = ("prebuilt", "bcc")


@dataclass
class CompiledDatapath:
    """The datapath loaded for both hooks, with the map operations the packet tests need.

    Flows go in through a table API (bcc's, or its equal on the object's fds in
    pyflow.datapath.attach.maps): the tests must not depend on the control plane's
    batched map layer."""

    build: str
    tables: dict[str, Any]
    xdp_fd: int
    tc_fd: int

    @property
    def flows(self):
        return self.tables[abi.MAP_FLOWS]

    def install(self, flows: Iterable[tuple[abi.FlowKey, abi.FlowAction]]) -> None:
        t = self.flows
        for key, action in flows:
            t[t.Key.from_buffer_copy(abi.key_bytes(key))] = t.Leaf.from_buffer_copy(
                abi.value_bytes(action, key))

    def clear_flows(self) -> None:
        self.flows.clear()

    def flow(self, key: abi.FlowKey):
        """The flow value (struct pyflow_flow, a cffi copy) stored under key."""
        t = self.flows
        leaf = t[t.Key.from_buffer_copy(abi.key_bytes(key))]
        buf = ffi.new(abi.FLOW_TYPE + " *")
        ffi.memmove(buf, bytes(leaf), abi.FLOW_SIZE)
        return buf

    def stats(self) -> list[tuple[int, int]]:
        """(packets, bytes) per reason, summed over the CPUs."""
        t = self.tables[abi.MAP_STATS]
        out = []
        for i in range(len(abi.REASONS)):
            per_cpu = t[t.Key(i)]
            out.append((sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu)))
        return out

    def run(self, hook: str, packet: bytes, *, skb_ctx: bytes | None = None, repeat: int = 1) -> RunResult:
        if hook == "xdp":
            return run(self.xdp_fd, packet, xdp=True, repeat=repeat)
        return run(self.tc_fd, packet, xdp=False, skb_ctx=skb_ctx, repeat=repeat)


def load(build: str = "prebuilt") -> Iterator[CompiledDatapath]:
    """Load the datapath of ``build`` (small maps, no pins), yield it, and unload it."""
    if build == "prebuilt":
        obj = bpfobject.load(defines=TEST_DEFINES)
        tables = datapath_tables(obj.maps)
        obj.maps = {}
        try:
            yield from _loaded(CompiledDatapath(build, tables, obj.progs[XDP_FUNC], obj.progs[TC_FUNC]))
        finally:
            for t in tables.values():
                t.close()
            obj.close()
        return
    from bcc import BPF

    b = compile_datapath(defines=TEST_DEFINES)
    xdp = b.load_func(XDP_FUNC.encode(), BPF.XDP)
    tc = b.load_func(TC_FUNC.encode(), BPF.SCHED_CLS)
    tables = {name: b[name.encode()] for name in (abi.MAP_FLOWS, abi.MAP_STATS, abi.MAP_TX_PORTS)}
    try:
        yield from _loaded(CompiledDatapath(build, tables, xdp.fd, tc.fd))
    finally:
        b.cleanup()


def _loaded(dp: CompiledDatapath) -> Iterator[CompiledDatapath]:
    # The XDP redirect needs a device in the devmap slot; the test run never transmits.
    tx = dp.tables[abi.MAP_TX_PORTS]
    tx[tx.Key(TX_SLOT)] = tx.Leaf(TEST_IFINDEX)
    yield dp


def first_difference(got: bytes, want: bytes) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"first difference at byte {i}: got {got[i:i + 8].hex()} want {want[i:i + 8].hex()}"
    return f"lengths differ: got {len(got)} want {len(want)}"
