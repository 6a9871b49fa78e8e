"""pyflowd as a process for tests and benchmarks: started in router r1's network namespace
of the integration topology with its files in a directory of its own, driven through
pyflowctl and /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests import netns
from tests.pins import remove_pin_dir
from tests.support.topology import LAN, UP, UP2

ROOT = Path(__file__).resolve().parents[2]
METRICS_PORT = 9469


class Pyflowd:
    """One pyflowd process in r1, with its files in a directory of its own."""

    def __init__(self, topo, workdir: Path, *, group: str = "", devices=((LAN, "auto"), (UP, "auto")),
                 notify: str | None = None):
        self.topo = topo
        self.dir = workdir
        self.socket = str(workdir / "run" / "pyflowd.sock")
        self.state_dir = workdir / "state"
        self.bpffs = f"/sys/fs/bpf/pft-pyflowd-{os.getpid()}"
        self.config = workdir / "pyflowd.toml"
        self.log = workdir / "pyflowd.log"
        self.notify = notify
        self.proc: subprocess.Popen | None = None
        self.write_config(group=group, devices=devices)

    def write_config(self, *, group: str = "", devices=(), idle_timeout: float = 30.0,
                     extra: str = "") -> None:
        text = (f'[daemon]\nsocket_group = "{group}"\nlog_level = "info"\n{extra}'
                f"[offload]\nidle_timeout = {idle_timeout}\nkeepalive_interval = 0.2\noffload_mark = 256\n")
        for name, mode in devices:
            text += f'[[device]]\nname = "{name}"\nmode = "{mode}"\n'
        self.config.write_text(text)

    def argv(self) -> list[str]:
        return [*in_netns(self.topo.r1), sys.executable, "-m", "pyflow.daemon",
                "--config", str(self.config), "--socket", self.socket, "--state-dir", str(self.state_dir),
                "--bpffs-dir", self.bpffs, "--metrics-address", f"127.0.0.1:{METRICS_PORT}"]

    def environment(self) -> dict[str, str]:
        """The daemon's environment: this one, importing pyflow from the source tree."""
        return dict(os.environ, PYTHONPATH=str(ROOT))

    def start(self, timeout: float = 60.0) -> None:
        env = self.environment()
        if self.notify:
            env.update(NOTIFY_SOCKET=self.notify, WATCHDOG_USEC="1000000")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyflowd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if ctl(self.socket, "status").returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"pyflowd not ready in {timeout} s:\n{self.log.read_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        # nsenter execs the interpreter: the Popen pid is the daemon itself
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = ctl(self.socket, *args)
        if check and res.returncode != 0:
            raise AssertionError(f"pyflowctl {' '.join(args)}: exit {res.returncode}: {res.stderr}")
        return res

    def json(self, *args: str) -> dict:
        return json.loads(self.ctl("--json", *args).stdout)

    def scrape(self) -> dict[str, float]:
        """/metrics from inside r1, as {sample name with labels: value}."""
        with netns.inside(self.topo.r1):
            conn = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
        with conn:
            text = conn.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def flow_on(self, port: int) -> dict | None:
        flows = self.json("flows", "--port", str(port))["flows"]
        return flows[0] if flows else None

    def cleanup(self) -> None:
        self.kill()
        # a test that failed half way may leave hooks: remove them and the pins
        for dev in (LAN, UP, UP2):
            netns.run(self.topo.r1, f"ip link set dev {dev} xdpgeneric off", check=False)
            netns.run(self.topo.r1, f"tc qdisc del dev {dev} clsact", check=False)
        remove_pin_dir(self.bpffs)


def in_netns(ns: str) -> list[str]:
    """Run in ``ns``'s network namespace only. Not `ip netns exec`: that also gives the
    process a mount namespace with a fresh /sys, without the host's bpffs, so its pins would
    vanish with it and a restarted daemon would have nothing to adopt."""
    return ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{ns}", "--"]


def ctl(sock: str, *args: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*(user or []), sys.executable, "-m", "pyflow.cli", "--socket", sock, *args]
    return subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60)
