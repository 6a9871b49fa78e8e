"""Network namespaces and veth pairs for tests.

Every object this module creates carries the ``pft-`` prefix so that a crashed
run can be cleaned up by name (``cleanup_stale``) without touching anything
else on the host. Namespaces are made with ``ip netns add`` (a bind mount under
/run/netns), so ``ip netns exec``, pyroute2's ``IPRoute(netns=...)`` and
:func:`inside` all see the same namespace.

:func:`inside` moves only the *calling thread* into a namespace (setns(2) is
per thread) and moves it back afterwards; sockets created meanwhile stay in the
namespace they were made in, which is how a test drives pyflow.datapath.loader against
devices in a namespace. A command run with :func:`run` starts in the
namespace through ``ip netns exec``, which also remounts /sys so that
/sys/class/net shows the namespace's devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

PREFIX = "pft-"
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
T = TypeVar("T")


def unique(tag: str) -> str:
    """A namespace name unique to this process: pft-<tag>-<pid>-<n>."""
    return f"{PREFIX}{tag}-{os.getpid()}-{next(_counter)}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def create(name: str) -> str:
    """Create namespace ``name`` (must start with pft-) with its loopback up."""
    if not name.startswith(PREFIX):
        raise ValueError(f"test namespaces must start with {PREFIX!r}: {name}")
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    run(name, "ip link set lo up")
    return name


def remove(name: str) -> None:
    """Delete a namespace; its veth ends go with it (and take their peers along)."""
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to remove a namespace without the {PREFIX!r} prefix: {name}")
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def cleanup_stale() -> None:
    """Remove pft- namespaces left by earlier runs of this process id (never others')."""
    mine = f"-{os.getpid()}-"
    for name in os.listdir(NETNS_RUN_DIR) if os.path.isdir(NETNS_RUN_DIR) else []:
        if name.startswith(PREFIX) and mine in name:
            remove(name)


def run(ns: str | None, cmd: str | Sequence[str], *, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command in namespace ``ns`` (None: here) and return its result.

    A failing command raises with its stderr, so a test's setup step that
    breaks says which command and why.
    """
    argv = cmd.split() if isinstance(cmd, str) else list(cmd)
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the body with the calling thread in namespace ``ns``; always comes back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def call(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with the calling thread inside ``ns``."""
    with inside(ns):
        return fn(*args, **kwargs)


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair: ``name_a`` in ``ns_a``, ``name_b`` in ``ns_b``, both up.

    Names are at most 15 characters (IFNAMSIZ) and must start with pft-. The
    pair is created in ``ns_a`` and one end moved, so nothing appears in the
    test's own namespace even briefly.
    """
    for n in (name_a, name_b):
        if not n.startswith(PREFIX) or len(n) > 15:
            raise ValueError(f"veth name must start with {PREFIX!r} and fit 15 characters: {n}")
    run(ns_a, ["ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b])
    if ns_b != ns_a:
        run(ns_a, ["ip", "link", "set", name_b, "netns", ns_b])
    run(ns_a, ["ip", "link", "set", name_a, "up"])
    run(ns_b, ["ip", "link", "set", name_b, "up"])


def addr(ns: str, ifname: str, cidr: str) -> None:
    run(ns, ["ip", "addr", "add", cidr, "dev", ifname])


def ifindex(ns: str, ifname: str) -> int:
    out = run(ns, ["cat", f"/sys/class/net/{ifname}/ifindex"]).stdout
    return int(out.strip())


def mac(ns: str, ifname: str) -> str:
    return run(ns, ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()


def mib(ns: str) -> dict[str, dict[str, int]]:
    """The namespace's SNMP counters by group ("Tcp", "TcpExt", "Icmp", "Udp" ...), from
    /proc/net/snmp and /proc/net/netstat (a line of names, then a line of values)."""
    out: dict[str, dict[str, int]] = {}
    for f in ("snmp", "netstat"):
        lines = run(ns, ["cat", f"/proc/net/{f}"]).stdout.splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=True):
            names, nums = head.split(), values.split()
            out[names[0].rstrip(":")] = {n: int(v) for n, v in zip(names[1:], nums[1:], strict=True)}
    return out


@contextlib.contextmanager
def namespaces(*tags: str) -> Iterator[list[str]]:
    """Create one fresh namespace per tag and remove them all afterwards."""
    made: list[str] = []
    try:
        for tag in tags:
            made.append(create(unique(tag)))
        yield made
    finally:
        for name in made:
            remove(name)
