"""A systemd of its own, as PID 1 of fresh namespaces, to run pyflowd.service for real.

The test machine's PID 1 is not systemd, so ``systemctl start`` has nothing to talk to.
systemd runs fine as PID 1 of a new PID namespace (as in a container): this module
starts one with its own mount, UTS, IPC and cgroup namespaces, inside a given test
network namespace, and with nothing of the host's configuration: the unit directories,
/run and /var/lib are empty tmpfs in its mount namespace (so StateDirectory= and
RuntimeDirectory= land there), and its cgroup namespace is rooted in a ``pft-`` cgroup
made for it in every hierarchy, so everything it creates is removed with that cgroup.
Only the units handed to :class:`SystemdNamespace` exist for it; they need
``DefaultDependencies=no`` (no sysinit.target or basic.target here).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
TARGET = "pft.target"

# Runs as PID 1 of the new namespaces, then becomes systemd. Arguments: the directory
# with units/, and the cgroup mounts to redo (type, options, mount point per line).
_INNER = r"""
set -eu
dir=$1
# cgroupfs mounted from inside the cgroup namespace shows that namespace's root
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
fi
while read -r fstype opts mnt; do
    mkdir -p "$mnt"
    mount -t "$fstype" -o "$opts" cgroup "$mnt"
done < "$dir/cgroup-mounts"
for d in /etc/systemd/system /lib/systemd/system /lib/systemd/system-generators /run /var/lib; do
    [ -d "$d" ] && mount -t tmpfs -o mode=755 tmpfs "$d"
done
: > "$dir/console"
mount --bind "$dir/console" /dev/console
cp -r "$dir/units/." /lib/systemd/system/
mkdir -p /run/pft-sd
cp -r "$dir/run/." /run/pft-sd/
export container=pft
exec __SYSTEMD__ --system --unit=__TARGET__ --log-target=console --log-level=info
"""


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """(fstype, options, mount point) of every cgroup hierarchy mounted here."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _src, mnt, fstype, opts, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                out.append((fstype, opts, mnt))
    return out


class SystemdNamespace:
    """``with SystemdNamespace(netns_name, workdir, units) as sd: sd.systemctl("start", ...)``

    ``units`` maps file names (``pyflowd.service``, ``pyflowd.service.d/test.conf``) to
    their text; ``run_files`` are placed under /run/pft-sd in systemd's mount namespace
    (outside any service's PrivateTmp=).
    """

    def __init__(self, netns_name: str, workdir: Path, units: dict[str, str],
                 run_files: dict[str, str] | None = None) -> None:
        self.netns_name = netns_name
        self.dir = workdir
        self.units = {**units, TARGET: "[Unit]\nDescription=pft test target\n"}
        self.run_files = run_files or {}
        self.cgroup_name = f"pft-sd-{os.getpid()}-{netns_name}"
        self.cgroups: list[Path] = []
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None  # systemd's pid as the host sees it

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> SystemdNamespace:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        for name, text in self.units.items():
            path = self.dir / "units" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (self.dir / "run").mkdir(exist_ok=True)
        for name, text in self.run_files.items():
            (self.dir / "run" / name).write_text(text)
        mounts = _cgroup_mounts()
        (self.dir / "cgroup-mounts").write_text("".join(f"{t} {o} {m}\n" for t, o, m in mounts))
        inner = _INNER.replace("__SYSTEMD__", SYSTEMD).replace("__TARGET__", TARGET)
        (self.dir / "inner.sh").write_text(inner)
        procs_files = [self._make_cgroup(Path(mnt)) for _t, _o, mnt in mounts]
        # enter the pft- cgroups, then the namespaces; --kill-child: if unshare goes, so does
        # PID 1 of the new PID namespace, and with it every process in there
        join = "; ".join(f"echo $$ > {shlex.quote(str(p))}" for p in procs_files)
        # nsenter joins the test's network namespace (unshare --net=FILE would make a new one
        # and mount it over FILE)
        unshare = ["nsenter", f"--net=/run/netns/{self.netns_name}",
                   "unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc", "--cgroup",
                   "--mount-proc", "--propagation", "private",
                   "bash", str(self.dir / "inner.sh"), str(self.dir)]
        with open(self.dir / "outer.log", "w") as log:
            self.proc = subprocess.Popen(["bash", "-c", f"{join}; exec {shlex.join(unshare)}"],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd namespace ended ({self.proc.returncode}): {self.log()}")
            self.pid1 = self.pid1 or self._find_pid1()
            if self.pid1 is not None:
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"systemd did not come up: {self.log()}")

    def _make_cgroup(self, mnt: Path) -> Path:
        cg = mnt / self.cgroup_name
        cg.mkdir()
        self.cgroups.append(cg)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset group takes no task while empty
            if (cg / knob).exists():
                (cg / knob).write_text((mnt / knob).read_text())
        return cg / "cgroup.procs"

    def _find_pid1(self) -> int | None:
        """The host pid of the unshare'd child once it runs systemd."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                if Path(f"/proc/{child}/exe").resolve() == Path(SYSTEMD).resolve():
                    return int(child)
        return None

    def close(self) -> None:
        # SIGKILL to PID 1 of a PID namespace ends every process in it (systemd would take a
        # SIGTERM as "re-execute"); unshare then returns
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            if self.pid1 is None:  # not started yet: --kill-child takes the child along
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for cg in self.cgroups:
            self._remove_cgroup(cg)

    @staticmethod
    def _remove_cgroup(cg: Path) -> None:
        """Remove a cgroup tree once its processes are gone (deepest first)."""
        deadline = time.monotonic() + 10
        dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, cg]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # its last processes are still exiting

    # ---- talking to it ---------------------------------------------------------------------------

    def enter(self, *argv: str, net: bool = False, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in systemd's mount and PID namespaces (and its network one with ``net``)."""
        assert self.pid1 is not None
        ns = ["-m", "-p"] + (["-n"] if net else [])
        res = subprocess.run(["nsenter", "-t", str(self.pid1), *ns, *argv], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()} "
                               f"{res.stdout.strip()}")
        return res

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 200) -> subprocess.CompletedProcess[str]:
        return self.enter("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def log(self) -> str:
        texts = []
        for name in ("outer.log", "console"):
            with contextlib.suppress(OSError):
                texts.append((self.dir / name).read_text()[-3000:])
        return "\n".join(texts)
