"""The flow map's kernel memory as status and metrics report it (FlowTable.memory_bytes):
the kernel's own account of the map (its fd's memlock), which the estimate used where the
kernel does not give one follows. All of max_entries is preallocated: the figure depends
on the size, not on the entries in it."""

from __future__ import annotations

import pytest

from pyflow.datapath.flowtable import FlowTable, estimated_memory


@pytest.mark.parametrize("size", [1024, 262144, 1 << 20])
def test_memory_is_the_kernels_account_and_the_estimate_follows_it(size):
    with FlowTable.create(size, name="pft_mem") as t:
        got = t.memory_bytes()
        with open(f"/proc/self/fdinfo/{t.fd}") as f:
            memlock = next(int(line.split()[1]) for line in f if line.startswith("memlock:"))
        assert got == memlock
        # the estimate is within 2% (the kernel adds a few spare elements per CPU and the map itself)
        assert abs(estimated_memory(size) - got) <= 0.02 * got + 65536, (estimated_memory(size), got)
