"""PPPoE sessions as the kernel lists them, and which one a ppp device runs over.

A route through a PPPoE device (``pppoe-wan``) leaves, in the end, as Ethernet frames on
the device the session runs over (``wan.7``), with a PPPoE session header after the MAC
header (and the VLAN tags of that device): the kernel flowtable learns this by asking the
ppp device's channel (ppp_fill_forward_path -> pppoe_fill_forward_path: session id,
concentrator MAC and the session's device). Userspace has no such question to ask, so
the sessions are read from ``/proc/net/pppoe`` of the network namespace, which
pppoe_seq_show writes as

    Id       Address              Device
    00000100 02:00:00:00:07:01    wan.7

one line per connected PPPoE socket: ``%08X`` of the session id *as the kernel stores
it* (a __be16 in network order, printed as a host-order integer: session 1 reads
``00000100`` on a little-endian host), ``%pM`` the concentrator's MAC and ``%8s`` the
device's name, right-aligned to eight characters.

Which ppp device a session belongs to is not in that file (nor anywhere else the kernel
shows userspace: the channel is private to pppd). :func:`session_of` decides it and
says how: a session is tied to a ppp device only when there is exactly one PPPoE
session in the namespace and exactly one ppp device (any ppp device counts, whatever
carries it: an L2TP or serial ppp next to a PPPoE one makes the pair ambiguous, and a
guess would send one link's packets into the other's session). Anything else is
refused with a fixed code: ``pppoe_no_session`` (no session: the device is not PPPoE,
or not connected yet) or ``pppoe_ambiguous`` (several sessions or several ppp
devices). The one window this rule cannot see: a PPPoE session whose ppp unit pppd has
not created yet while one non-PPPoE ppp device exists (pppd makes the unit right after
the session's connect()).

Reading: :class:`SessionTable` opens the file only when a ppp device's path is planned
(paths.py caches the answer until a link or route changes), in the network namespace
the resolver was made in.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pyflow.control.model import PPPOE_AMBIGUOUS, PPPOE_NO_SESSION, NoPath

__all__ = ["PROC_PATH", "Session", "SessionTable", "netns_id", "parse_sessions", "session_of"]

PROC_PATH = "/proc/thread-self/net/pppoe"  # the calling thread's namespace (/proc/net follows the process's)
_NETNS_PATH = "/proc/thread-self/ns/net"
_HEADER = "Id"


@dataclass(frozen=True)
class Session:
    """One connected PPPoE session."""

    sid: int  # session id, host order (1..0xFFFE on the wire)
    remote: bytes  # the concentrator's MAC (frames go there, no neighbour lookup)
    device: str  # the Ethernet (or VLAN) device the session runs over


def _sid(field: str) -> int:
    """The session id from pppoe_seq_show's ``%08X`` of a __be16: the number printed is the
    two bytes in memory read as a host integer, so ntohs gives the id on either byte order."""
    raw = int(field, 16)
    if raw > 0xFFFF:
        raise ValueError(f"session id field {field!r} is wider than 16 bits")
    return socket.ntohs(raw)


def _mac(field: str) -> bytes:
    parts = field.split(":")
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise ValueError(f"not a MAC address: {field!r}")
    return bytes(int(p, 16) for p in parts)


def parse_sessions(text: str) -> list[Session]:
    """The sessions of a ``/proc/net/pppoe`` text. A line that is not header or session
    raises ValueError naming it (a format this code does not know must not be guessed at)."""
    out = []
    for n, line in enumerate(text.splitlines()):
        fields = line.split()
        if not fields:
            continue
        if n == 0 and fields[0] == _HEADER:
            continue
        if len(fields) != 3:
            raise ValueError(f"/proc/net/pppoe line {n + 1} has {len(fields)} fields, not 3: {line!r}")
        try:
            out.append(Session(_sid(fields[0]), _mac(fields[1]), fields[2]))
        except ValueError as exc:
            raise ValueError(f"/proc/net/pppoe line {n + 1}: {exc}") from None
    return out


def session_of(ppp_ifname: str, ppp_devices: Sequence[str], sessions: Sequence[Session]) -> Session:
    """The session the ppp device ``ppp_ifname`` runs over, when the namespace says it
    exactly: one PPPoE session and one ppp device. ``ppp_devices``: the names of every ppp
    device in the namespace (``ppp_ifname`` among them). Raises NoPath otherwise (see the
    module docstring for why nothing finer can be told)."""
    usable = [s for s in sessions if 0 < s.sid < 0xFFFF]  # 0 and 0xFFFF are reserved (RFC 2516)
    if not usable:
        return _refuse(f"no PPPoE session in this namespace for ppp device {ppp_ifname} "
                       f"(not PPPoE, or not connected yet)", PPPOE_NO_SESSION)
    others = sorted(set(ppp_devices) - {ppp_ifname})
    if len(usable) > 1 or others:
        listed = ", ".join(f"{s.sid:#06x} on {s.device}" for s in usable)
        return _refuse(f"cannot tell which PPPoE session ppp device {ppp_ifname} runs over: "
                       f"{len(usable)} session(s) ({listed})"
                       f"{' and other ppp devices ' + ', '.join(others) if others else ''}",
                       PPPOE_AMBIGUOUS)
    return usable[0]


def _refuse(text: str, code: str) -> Session:
    raise NoPath(text, code)


class SessionTable:
    """``/proc/net/pppoe`` of the network namespace this object was made in. Not cached
    here (the caller caches until a link change); read only when a ppp path is planned."""

    def __init__(self, path: str = PROC_PATH) -> None:
        self.path = path
        self.netns = netns_id()  # the namespace it reads

    def read(self) -> list[Session]:
        """The sessions now. No file means no PPPoE in the kernel (the pppoe module not
        loaded): no sessions. Raises OSError when the calling thread is in another network
        namespace than the one this table was made in (the file would show that one's)."""
        if netns_id() != self.netns:
            raise OSError("the PPPoE session table is read from another network namespace than "
                          "the one the path resolver was made in")
        try:
            with open(self.path, encoding="ascii") as f:
                return parse_sessions(f.read())
        except FileNotFoundError:
            return []


def netns_id() -> tuple[int, int]:
    """The calling thread's network namespace (device and inode of its nsfs file)."""
    st = os.stat(_NETNS_PATH)
    return st.st_dev, st.st_ino
