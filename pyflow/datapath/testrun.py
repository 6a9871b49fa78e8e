"""BPF_PROG_TEST_RUN from Python: runs a loaded program on one packet.

Used by the packet tests, the fuzz test and the micro-benchmark. The program
sees ingress device 1 (the namespace's loopback) for both hooks: XDP through
``struct xdp_md.ingress_ifindex``, TC because the kernel runs test skbs on
the loopback device.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyflow._native import ffi, lib
from pyflow.errors import DatapathError

TEST_IFINDEX = 1


@dataclass(frozen=True)
class RunResult:
    retval: int
    data: bytes
    duration_ns: int


def run(prog_fd: int, packet: bytes, *, repeat: int = 1, xdp: bool = True,
        out_capacity: int = 4096, skb_ctx: bytes | None = None) -> RunResult:
    """Run prog_fd once (or ``repeat`` times) on ``packet``.

    For XDP a context with ingress_ifindex=TEST_IFINDEX is passed. For TC,
    ``skb_ctx`` may carry a packed ``struct __sk_buff`` (e.g. with gso fields).
    """
    data_out = ffi.new("char[]", out_capacity)
    data_in = ffi.from_buffer(packet)
    args = ffi.new("struct pyflow_test_run *")
    args.data_in = data_in
    args.data_size_in = len(packet)
    args.data_out = data_out
    args.data_size_out = out_capacity
    args.repeat = repeat
    keep = None
    if xdp:
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        # egress_ifindex. data_end is the linear length: recent kernels put whatever lies
        # beyond it into frags, so 0 would hand the program an empty linear buffer.
        md = (0).to_bytes(4, "little") + len(packet).to_bytes(4, "little") + bytes(4) \
            + TEST_IFINDEX.to_bytes(4, "little") + bytes(8)
        keep = ffi.from_buffer(md)
    elif skb_ctx is not None:
        keep = ffi.from_buffer(skb_ctx)
    if keep is not None:
        args.ctx_in = keep
        args.ctx_size_in = len(keep)
    rc = lib.pyflow_prog_test_run(prog_fd, args)
    if rc < 0:
        raise DatapathError(f"BPF_PROG_TEST_RUN failed: {_strerror(-rc)}")
    return RunResult(args.retval, ffi.buffer(data_out, args.data_size_out)[:], args.duration)


def _strerror(err: int) -> str:
    import os

    return f"{os.strerror(err)} (errno {err})"
