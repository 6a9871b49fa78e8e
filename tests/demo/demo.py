"""make demo: pyflow's first run, end to end, in network namespaces it creates and removes.

    client ---------------- router (pyflowd) ---------------- server
    pft-cl0 198.18.10.2     pft-lan | pft-wan (masquerade)     pft-sv0 198.18.11.2
            2001:2:10::2                                               2001:2:11::2

The router runs the real pyflowd (as the systemd unit runs it: uid 0 with only the unit's
capabilities, no new privileges, no writable+executable memory, readiness and watchdog
over $NOTIFY_SOCKET), `pyflowctl add-device` puts the fast path on both router links,
iperf3 pushes TCP over IPv4 and IPv6 through it for a few seconds, and the demo prints
`pyflowctl flows`, `pyflowctl stats` and a metrics excerpt while the traffic runs.
Everything it made (namespaces, pins, temporary files, processes) is removed at the end,
also when it is interrupted (Ctrl-C, SIGTERM). Needs root.

    python -m tests.demo.demo [--seconds N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests import netns
from tests.packaging.unitfile import REPO, capabilities, setpriv_argv
from tests.pins import remove_pin_dir
from tests.support import topology

BIN = Path(sys.executable).parent
ADDR = {"cl": ("198.18.10.2", "2001:2:10::2"), "lan": ("198.18.10.1", "2001:2:10::1"),
        "wan": ("198.18.11.1", "2001:2:11::1"), "sv": ("198.18.11.2", "2001:2:11::2")}
METRICS = "127.0.0.1:9469"  # inside the router's namespace: no clash with the host's
# (family flag, server address, parallel streams, port, label)
IPERF_RUNS = (("-4", ADDR["sv"][0], 2, 5201, "IPv4, 2 streams"),
              ("-6", ADDR["sv"][1], 1, 5202, "IPv6, 1 stream"))
NAT_RULES = """table inet pft_demo {
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "pft-wan" masquerade
    }
}
"""
_PORTS = (("client", "pft-cl0", "cl"), ("router", "pft-lan", "lan"), ("router", "pft-wan", "wan"),
          ("server", "pft-sv0", "sv"))
SPEC = topology.Spec(
    namespaces={"client": "client", "router": "router", "server": "server"},  # named by Demo
    veths=(topology.Veth("client", "pft-cl0", "router", "pft-lan"),
           topology.Veth("router", "pft-wan", "server", "pft-sv0")),
    addrs=[(role, dev, f"{ADDR[key][0]}/24") for role, dev, key in _PORTS]
    + [(role, dev, f"{ADDR[key][1]}/64") for role, dev, key in _PORTS],
    routes=(("client", "default", ADDR["lan"][0]), ("client", "default", ADDR["lan"][1])),
    forwarding=("router",),
    nft={"router": NAT_RULES},
)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls it
# the metrics excerpt: these series, those that are zero left out
METRIC_PREFIXES = ("pyflow_up", "pyflow_managed_devices", "pyflow_offloaded_flows", "pyflow_offloads_total",
                   "pyflow_fastpath_", "pyflow_slowpath_", "pyflow_flow_map_entries",
                   "pyflow_conntrack_events")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop and clean up."""


def say(text: str = "") -> None:
    print(text, flush=True)


def shown(argv: list[str]) -> str:
    """A command as the reader would type it (our paths shortened)."""
    return " ".join(Path(a).name if a.startswith(str(BIN)) else a for a in argv)


class Demo:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        tag = f"pft-demo-{os.getpid()}"
        self.ns = {role: f"{tag}-{role}" for role in ("client", "router", "server")}
        self.pin_dir = f"/sys/fs/bpf/{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.sock_path = str(self.tmp / "pyflowd.sock")
        self.procs: list[subprocess.Popen] = []
        self.daemon: subprocess.Popen | None = None
        self.notes: list[str] = []
        self.notify_sock: socket.socket | None = None
        self.ready = threading.Event()

    # ---- the topology --------------------------------------------------------------------

    def build(self) -> None:
        cl, rt, sv = self.ns["client"], self.ns["router"], self.ns["server"]
        for name in (cl, rt, sv):
            netns.create(name)
        # every veth with the test networks' offload settings (tests/support/topology.py)
        topology.build(SPEC, {"client": cl, "router": rt, "server": sv})
        say(f"namespaces {cl}, {rt}, {sv}; the router masquerades what leaves on pft-wan")

    # ---- pyflowd -----------------------------------------------------------------------------

    def _listen_notify(self) -> dict[str, str]:
        """A $NOTIFY_SOCKET of our own, read by a thread: what systemd would hear."""
        path = str(self.tmp / "notify")
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(path)
        self.notify_sock.settimeout(0.5)

        def reader(sock: socket.socket) -> None:
            while True:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed at cleanup
                for line in data.decode(errors="replace").splitlines():
                    self.notes.append(line)
                    if line == "READY=1":
                        self.ready.set()

        threading.Thread(target=reader, args=(self.notify_sock,), daemon=True).start()
        return {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}

    def start_daemon(self) -> None:
        config = self.tmp / "pyflowd.toml"
        config.write_text('[daemon]\nlog_level = "info"\n[offload]\nidle_timeout = 30.0\n')
        caps = capabilities()
        argv = [str(BIN / "pyflowd"), "--config", str(config), "--socket", self.sock_path,
                "--state-dir", str(self.tmp / "state"), "--bpffs-dir", self.pin_dir,
                "--metrics-address", METRICS]
        env = {**os.environ, **self._listen_notify()}
        log = open(self.tmp / "pyflowd.log", "w")  # noqa: SIM115 - closed with the process
        say(f"$ {shown(argv)}")
        say(f"  (in {self.ns['router']}, with the unit's capabilities only: {' '.join(caps)})")
        t0 = time.monotonic()
        # nsenter, not "ip netns exec": that one remounts /sys and so hides /sys/fs/bpf
        self.daemon = self._spawn(["nsenter", f"--net=/run/netns/{self.ns['router']}", *setpriv_argv(caps),
                                   *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=_deny_write_execute)
        log.close()
        while not self.ready.wait(0.2):
            if self.daemon.poll() is not None:
                raise RuntimeError(f"pyflowd exited with status {self.daemon.returncode}:\n{self.log_tail()}")
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"pyflowd not ready after 180 s:\n{self.log_tail()}")
        say(f"  ready after {time.monotonic() - t0:.1f} s (READY=1 on $NOTIFY_SOCKET), pid {self.daemon.pid}")

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.tmp / "pyflowd.log").read_text().splitlines()[-lines:])
        return "(no log)"

    def ctl(self, *args: str, show: bool = True) -> str:
        argv = [str(BIN / "pyflowctl"), "--socket", self.sock_path, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if show:
            say(f"$ {shown([argv[0], *args])}")
            say(res.stdout.rstrip())
        if res.returncode != 0:
            raise RuntimeError(f"{shown(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    # ---- traffic ----------------------------------------------------------------------------

    def start_traffic(self) -> list[subprocess.Popen]:
        sv, cl = self.ns["server"], self.ns["client"]
        clients = []
        for family, _dst, _streams, port, _label in IPERF_RUNS:
            self._spawn(["ip", "netns", "exec", sv, "iperf3", "-s", "-1", family, "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # the servers bind
        for family, dst, streams, port, _label in IPERF_RUNS:
            argv = ["iperf3", "-c", dst, family, "-p", str(port), "-t", f"{self.seconds:g}",
                    "-P", str(streams), "--json"]
            say(f"$ {' '.join(argv)}   (client namespace, {self.seconds:g} s)")
            clients.append(self._spawn(["ip", "netns", "exec", cl, *argv], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
        return clients

    def wait_offloaded(self, want: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            count = len(json.loads(self.ctl("--json", "flows", show=False)).get("flows", []))
            if count >= want:
                break
            time.sleep(0.2)
        return count

    def metrics_excerpt(self) -> None:
        argv = ["curl", "-s", "--max-time", "5", f"http://{METRICS}/metrics"]
        say(f"$ {' '.join(argv)} | grep ...   (router namespace)")
        res = netns.run(self.ns["router"], argv, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"curl failed ({res.returncode}): {res.stderr.strip()}")
        picked = [ln for ln in res.stdout.splitlines()
                  if ln.startswith(METRIC_PREFIXES) and float(ln.rsplit(" ", 1)[-1]) != 0]
        say("\n".join(picked) if picked else res.stdout[:1500])

    @staticmethod
    def iperf_summary(proc: subprocess.Popen, label: str, timeout: float) -> None:
        out, _ = proc.communicate(timeout=timeout)
        try:
            end = json.loads(out)["end"]
            rx = end["sum_received"]
        except (ValueError, KeyError):
            raise RuntimeError(f"iperf3 ({label}) failed: {out.strip()[-400:]}") from None
        say(f"iperf3 {label}: {rx['bytes'] / 2**20:.0f} MiB in {rx['seconds']:.1f} s, "
            f"{rx['bits_per_second'] / 1e9:.2f} Gbit/s received")

    # ---- processes and cleanup ---------------------------------------------------------------

    def _spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        # a session of its own: a Ctrl-C at the terminal reaches the demo only, which then
        # stops its children in order (pyflowd first, so it hands its flows back)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop_daemon(self) -> None:
        d = self.daemon
        if d is None or d.poll() is not None:
            return
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()

    def cleanup(self) -> list[str]:
        """Remove everything this run made; returns what it removed."""
        removed = []
        self.stop_daemon()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self.notify_sock is not None:
            self.notify_sock.close()
        for name in self.ns.values():
            if netns.exists(name):
                netns.remove(name)
                removed.append(name)
        if remove_pin_dir(self.pin_dir):  # pyflowd removes its pins on SIGTERM; not if it died
            removed.append(self.pin_dir)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
            removed.append(str(self.tmp))
        return removed

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> None:
        say("== topology")
        self.build()
        say("\n== pyflowd")
        self.start_daemon()
        say("\n== devices")
        for dev in ("pft-lan", "pft-wan"):
            self.ctl("add-device", dev)
        say("\n== traffic")
        clients = self.start_traffic()
        # two IPv4 data streams + one IPv6, and each test's control connection
        n = self.wait_offloaded(5, timeout=min(self.seconds, 10))
        time.sleep(1.0)  # let the counters grow
        say(f"\n== offloaded connections while the traffic runs ({n})")
        self.ctl("flows")
        say("\n== counters")
        self.ctl("stats")
        say("\n== metrics (excerpt)")
        self.metrics_excerpt()
        say("\n== results")
        for proc, run in zip(clients, IPERF_RUNS, strict=True):
            self.iperf_summary(proc, run[4], timeout=self.seconds + 30)
        self.ctl("stats", show=False)
        say("\n== stop (SIGTERM: flows back to the kernel path, devices detached)")
        self.stop_daemon()
        assert self.daemon is not None
        say(f"pyflowd exited with status {self.daemon.returncode}; its last words:")
        say("\n".join("  " + ln for ln in self.log_tail(3).splitlines()))
        pings = sum(1 for n in self.notes if n == "WATCHDOG=1")
        say(f"systemd would have heard: READY=1, {pings} x WATCHDOG=1, "
            f"{'STOPPING=1' if 'STOPPING=1' in self.notes else 'no STOPPING=1'}")
        if self.daemon.returncode != 0:
            raise RuntimeError(f"pyflowd exited with status {self.daemon.returncode}")


def _deny_write_execute() -> None:
    """In the child before exec: the kernel's form of MemoryDenyWriteExecute=."""
    if _LIBC.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _on_signal(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyflow's first run, in namespaces it creates and removes")
    p.add_argument("--seconds", type=float, default=6.0, help="how long iperf3 sends (1..60, default 6)")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be within 1..60")
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    for tool in ("iperf3", "curl", "nft", "nsenter", "setpriv", str(BIN / "pyflowd"), str(BIN / "pyflowctl")):
        if shutil.which(tool) is None:
            print(f"demo: {tool} missing (make setup installs it)", file=sys.stderr)
            return 1
    os.chdir(REPO)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    demo = Demo(args.seconds)
    status = 0
    try:
        demo.run()
    except Interrupted as exc:
        print(f"\ndemo: interrupted ({exc}), cleaning up", file=sys.stderr)
        status = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        status = 1
    finally:
        # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        removed = demo.cleanup()
        say("\n== cleanup")
        say("removed " + (", ".join(removed) if removed else "nothing (already gone)"))
    return status


if __name__ == "__main__":
    sys.exit(main())
