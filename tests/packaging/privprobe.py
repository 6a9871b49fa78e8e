"""Do, one step at a time, every privileged thing pyflowd does, and report each step.

Run as a program inside a test network namespace, usually under ``setpriv`` with a
reduced capability set (tests/packaging/test_privileges.py); prints one line per step,
``ok <step>`` or ``FAIL <step>: <error>``, then exits 0 when every step passed. The
steps are the daemon's own calls (pyflow.datapath.loader, pyflow.control), except where those
fall back quietly when a privilege is missing (SO_RCVBUFFORCE, the conntrack events
sysctl): those are tried directly, so that a missing privilege shows as a failure.

    python -m tests.packaging.privprobe --pin-dir /sys/fs/bpf/pft-x --state-dir DIR \
        --tc-dev pft-a --xdp-dev pft-b
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import traceback
from collections.abc import Callable

SO_RCVBUFFORCE = 33
NETLINK_NETFILTER = 12
CT_EVENT_GROUPS = 0b111  # NFNLGRP_CONNTRACK_NEW | _UPDATE | _DESTROY
CT_EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.failed: list[str] = []
        self.dp = None

    def step(self, name: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            print(f"FAIL {name}: {_error_text(exc)}", flush=True)
            if os.environ.get("PYFLOW_PROBE_TRACE"):
                traceback.print_exc()
            self.failed.append(name)
            return False
        print(f"ok {name}", flush=True)
        return True

    # -- the datapath --------------------------------------------------------

    def load(self) -> None:
        from pyflow.datapath.loader import Datapath

        # loads the prebuilt object (or compiles with bcc, reading kernel headers), creates
        # and pins the maps, loads both programs (XDP and SCHED_CLS) and pins them
        self.dp = Datapath(self.args.pin_dir, state_file=os.path.join(self.args.state_dir, "probe.json"),
                           build=self.args.build)

    def attach(self, dev: str, mode: str) -> None:
        assert self.dp is not None, "no datapath"
        st = self.dp.attach(dev, mode)
        if st.mode != mode:
            raise RuntimeError(f"{dev}: attached as {st.mode}, asked for {mode}")

    def adopt(self) -> None:
        """A restarted daemon: a second Datapath on the same pins (BPF_OBJ_GET of every pin)."""
        from pyflow.datapath.loader import Datapath

        assert self.dp is not None, "no datapath"
        self.dp.close()
        self.dp = None  # closed: a failed re-open leaves the attachments to the namespace's removal
        self.dp = Datapath(self.args.pin_dir, state_file=os.path.join(self.args.state_dir, "probe.json"),
                           build=self.args.build)
        modes = {st.ifname: st.mode for st in self.dp.status()}
        want = {self.args.tc_dev: "tc", self.args.xdp_dev: "native"}
        if modes != want:
            raise RuntimeError(f"adopted {modes}, expected {want}")

    def detach(self) -> None:
        assert self.dp is not None, "no datapath"
        self.dp.destroy()
        self.dp = None

    # -- conntrack and rtnetlink ------------------------------------------------

    @staticmethod
    def conntrack() -> None:
        from pyflow.control.conntrack import CtNetlink

        with CtNetlink() as ct:  # binds the NEW/UPDATE/DESTROY event groups, then dumps
            ct.dump()

    @staticmethod
    def rcvbuf_force() -> None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)

    @staticmethod
    def ct_events_sysctl() -> None:
        with open(CT_EVENTS_SYSCTL) as f:
            current = f.read().strip()
        with open(CT_EVENTS_SYSCTL, "w") as f:
            f.write(current)

    @staticmethod
    def rtnetlink_watch() -> None:
        from pyflow.control.paths import PathWatcher, RtPaths

        PathWatcher().sock.close()
        RtPaths().close()

    # -- what the unit leaves to systemd -------------------------------------------

    def mount_bpffs(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        target = os.path.join(self.args.state_dir, "bpffs")
        os.makedirs(target, exist_ok=True)
        if libc.mount(b"bpf", target.encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount -t bpf: {os.strerror(err)}")
        libc.umount(target.encode())

    def run(self) -> int:
        a = self.args
        if self.step("datapath-load-and-pin", self.load):
            self.step("attach-tc", lambda: self.attach(a.tc_dev, "tc"))
            self.step("attach-xdp-native", lambda: self.attach(a.xdp_dev, "native"))
            self.step("adopt-pins", self.adopt)
            self.step("detach-and-unpin", self.detach)
        self.step("conntrack-netlink", self.conntrack)
        self.step("so-rcvbufforce", self.rcvbuf_force)
        self.step("conntrack-events-sysctl", self.ct_events_sysctl)
        self.step("rtnetlink-watch", self.rtnetlink_watch)
        if a.mount_bpffs:
            self.step("mount-bpffs", self.mount_bpffs)
        if self.dp is not None:  # a step failed half way: leave nothing attached or pinned behind
            try:
                self.dp.destroy()
            except Exception as exc:  # noqa: BLE001
                print(f"cleanup: {_error_text(exc)}", file=sys.stderr)
        return 1 if self.failed else 0


def deny_write_execute() -> None:
    """The kernel's form of the unit's MemoryDenyWriteExecute=: no mapping may become
    writable and executable (inherited by children, cannot be undone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MDWE): {os.strerror(err)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pin-dir", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--tc-dev", required=True)
    p.add_argument("--xdp-dev", required=True)
    p.add_argument("--build", default="prebuilt", choices=("prebuilt", "bcc"),
                   help="the datapath build to load (daemon.datapath_build)")
    p.add_argument("--mount-bpffs", action="store_true", help="also try mounting a bpffs (the unit does not)")
    p.add_argument("--deny-write-execute", action="store_true",
                   help="run under PR_SET_MDWE, as MemoryDenyWriteExecute= does")
    args = p.parse_args(argv)
    if args.deny_write_execute:
        deny_write_execute()
    return Probe(args).run()


if __name__ == "__main__":
    sys.exit(main())
