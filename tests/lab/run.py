"""The kernel lab: run a pytest selection of tests/lab/guest/ inside Debian's stock kernel.

The machine's own kernel lacks cls_flower, the nf flowtable, 802.1Q and PPP. Debian's
linux-image-amd64 has them as modules, so this boots that kernel under qemu through
virtme-ng (``vng``), with the host's root filesystem shared read-only, loads the modules
the guest tests need and runs pytest on this tree inside, once for the whole selection.

Only two directories are writable from the guest: a fresh per-run directory (the guest
script, pytest's output, its exit code, JUnit XML, the module report) and the repository's
``bench-results/`` (figures written by the side-by-side comparison). virtme-ng does not
pass the guest's exit status back, so the guest writes pytest's status into the run
directory and this runner exits with it; while the guest runs, its pytest output is
streamed here as it is written.

KVM is not used (``--disable-kvm``): on this kind of machine qemu either aborts or hangs
with it. Emulation is slow, which is why one boot runs every selected test.

    python tests/lab/run.py [--timeout S] [--keep] [-- PYTEST ARGS...]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = "tests/lab/guest"
RESULTS_DIR = REPO / "bench-results"
# What the guest tests use; autoloading would get most of them, loading them up front makes
# a missing one visible in the module report instead of as an obscure netlink error.
MODULES = (
    "veth", "8021q", "sch_ingress", "cls_bpf", "cls_flower", "cls_matchall", "act_pedit", "act_csum",
    "act_mirred", "act_vlan", "act_gact", "act_skbedit", "act_ct", "nf_conntrack", "nf_conntrack_netlink",
    "nf_nat", "nf_tables", "nft_ct", "nft_nat", "nft_masq", "nft_chain_nat", "nf_flow_table",
    "nf_flow_table_inet", "nft_flow_offload", "pppoe", "pppox", "ppp_generic", "bridge",
    "sch_cake", "sch_htb", "ifb",
)
# The guest's own bound sits below the runner's, so a hung test still leaves its output and
# a status behind before the runner gives up on the whole machine.
GUEST_MARGIN_S = 90
EXIT_NO_TESTS = 5  # pytest's "no tests were collected"
# Guest tests too slow for `make lab` (and so for `make test`): they run only when named,
# e.g. the nf flowtable side-by-side through `make lab-parity`.
EXPLICIT_ONLY = ("tests/lab/guest/test_flowtable_parity.py", "tests/lab/guest/test_openwrt.py")


class LabError(Exception):
    """The lab cannot run here; the message names what is missing."""


def kernel_version(image: Path) -> str:
    return image.name.removeprefix("vmlinuz-")


def find_kernel(explicit: str | None = None) -> Path:
    """The lab kernel: the given image, or the newest /boot image whose modules have cls_flower."""
    if explicit:
        image = Path(explicit)
        if not image.is_file():
            raise LabError(f"lab kernel {image} does not exist")
        return image
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        ver = kernel_version(image)
        if (Path("/lib/modules") / ver / "kernel/net/sched/cls_flower.ko").exists():
            candidates.append(image)
    if not candidates:
        raise LabError("no kernel image in /boot with cls_flower among its modules; "
                       "install Debian's linux-image-amd64 (make setup)")
    return max(candidates, key=lambda p: _version_key(kernel_version(p)))


def _version_key(ver: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", ver))


def find_vng() -> Path:
    """vng from this tree's virtualenv (where make setup puts it), else from PATH."""
    local = Path(sys.executable).parent / "vng"
    if local.is_file():
        return local
    found = shutil.which("vng")
    if found is None:
        raise LabError("vng (virtme-ng) not found; make setup installs it into the virtualenv")
    return Path(found)


def check_tools() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found; install Debian's {package} (make setup)")


def guest_script(run_dir: Path, pytest_args: list[str], guest_timeout: int) -> str:
    """The shell script the guest runs: modules, bpffs, then pytest with its status saved."""
    q = shlex.quote
    python = q(sys.executable)
    out = q(str(run_dir))
    args = " ".join(q(a) for a in pytest_args)
    mods = " ".join(MODULES)
    return f"""#!/bin/sh
# written by tests/lab/run.py; runs inside the lab kernel
cd {q(str(REPO))} || {{ echo 2 > {out}/status; exit 2; }}
: > {out}/modules.txt
for m in {mods}; do
    if modprobe "$m" 2>> {out}/modules.txt; then echo "loaded $m" >> {out}/modules.txt;
    else echo "FAILED $m" >> {out}/modules.txt; fi
done
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
uname -r > {out}/kernel.txt
export PYFLOW_LAB=1 PYFLOW_LAB_RESULTS={q(str(RESULTS_DIR))} PYFLOW_LAB_OUT={out}
export PYFLOW_LAB_FULL={q(os.environ.get('PYFLOW_LAB_FULL', '0'))}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
started=$(date +%s)
timeout -k 10 {guest_timeout} {python} -m pytest -p no:cacheprovider -rs \\
    --junitxml={out}/junit.xml {args} > {out}/pytest.log 2>&1
status=$?
echo "lab: pytest ran $(( $(date +%s) - started )) s in the guest" >> {out}/pytest.log
echo $status > {out}/status
sync
"""


class Streamer:
    """Prints what the guest appends to a file, as it appears."""

    def __init__(self, path: Path, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix
        self.offset = 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if self.prefix:
            chunk = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only, each with the prefix
        if chunk:
            self.offset += len(chunk)
            text = chunk.decode(errors="replace")
            if self.prefix:
                text = "".join(f"{self.prefix}{line}\n" for line in text.splitlines())
            sys.stdout.write(text)
            sys.stdout.flush()


def guest_selection(pytest_args: list[str]) -> list[str]:
    """pytest's arguments in the guest: the guest tests unless a path is given, and never an
    EXPLICIT_ONLY file that is not named itself (a directory or -k does not name it)."""
    selection = list(pytest_args)
    candidates = (a.split("::")[0] for a in selection if not a.startswith("-"))
    paths = [p for p in candidates if (REPO / p).exists()]
    if not paths:
        selection.insert(0, GUEST_TESTS)  # no test path given: the options apply to the guest tests
    named = {(REPO / p).resolve() for p in paths}
    return selection + [f"--ignore={p}" for p in EXPLICIT_ONLY if (REPO / p).resolve() not in named]


def run_lab(pytest_args: list[str], *, timeout: int, kernel: str | None, cpus: int, memory: str,
            keep: bool) -> int:
    image = find_kernel(kernel)
    vng = find_vng()
    check_tools()
    RESULTS_DIR.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="pyflow-lab-"))
    selection = guest_selection(pytest_args)
    script = run_dir / "guest.sh"
    script.write_text(guest_script(run_dir, selection, max(60, timeout - GUEST_MARGIN_S)))
    cmd = [str(vng), "--run", str(image), "--disable-kvm", "--cpus", str(cpus), "--memory", memory,
           "--rwdir", str(run_dir), "--rwdir", str(RESULTS_DIR), "--cwd", str(REPO),
           "--exec", f"sh {shlex.quote(str(script))}"]
    env = dict(os.environ, PATH=f"{vng.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    print(f"lab: booting {image.name} under qemu (no KVM, {cpus} CPUs, {memory}); "
          f"pytest {' '.join(selection)}", flush=True)
    t0 = time.monotonic()
    console = open(run_dir / "console.log", "wb")
    # a session of its own, so that on timeout the whole tree this runner started (vng and
    # its qemu) can be ended by that one process group id
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)
    # pytest's own output, and the progress long guest fixtures report (tests/lab/guest/conftest.py)
    streamers = [Streamer(run_dir / "pytest.log"), Streamer(run_dir / "progress.log", prefix="lab: ")]
    timed_out = False
    try:
        while proc.poll() is None:
            for streamer in streamers:
                streamer.pump()
            if time.monotonic() - t0 > timeout:
                timed_out = True
                _stop(proc)
                break
            time.sleep(1)
    except KeyboardInterrupt:
        _stop(proc)
        raise
    finally:
        console.close()
    for streamer in streamers:
        streamer.pump()
    elapsed = time.monotonic() - t0
    status = _read_status(run_dir / "status")
    mods = _failed_modules(run_dir / "modules.txt")
    if mods:
        print(f"lab: modules that did not load: {', '.join(mods)}")
    if timed_out:
        print(f"lab: gave up after {timeout} s; the machine was stopped")
    if status is None:
        tail = (run_dir / "console.log").read_bytes()[-3000:].decode(errors="replace")
        print(f"lab: the guest left no pytest status; console tail:\n{tail}")
        status = 1
    elif status == EXIT_NO_TESTS:
        print("lab: no tests ran (pytest status 5) - counted as a failure")
        status = 1
    print(f"lab: {elapsed:.0f} s from boot to power-off, pytest status {status}"
          f"{'' if not keep else f', run directory {run_dir}'}", flush=True)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return status


def _stop(proc: subprocess.Popen) -> None:
    """End the process group this runner started (vng and its qemu), gently, then for sure."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _failed_modules(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=int(os.environ.get("PYFLOW_LAB_TIMEOUT", "900")),
                        help="seconds from boot to giving up on the machine (default 900)")
    parser.add_argument("--kernel", default=os.environ.get("PYFLOW_LAB_KERNEL"),
                        help="kernel image (default: newest /boot/vmlinuz-* with cls_flower)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (guest script, logs)")
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments (after --)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: needs root (the guest runs the host's tools as root)", file=sys.stderr)
        return 2
    try:
        return run_lab(args.pytest_args, timeout=args.timeout, kernel=args.kernel, cpus=args.cpus,
                       memory=args.memory, keep=args.keep)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
