"""Conntrack tracking where pyflowd manages devices.

Since Linux 4.x conntrack hooks into a network namespace only when something there needs
it: an nftables ct expression, a NAT chain, an iptables state match, `flow add` (each takes
a reference with nf_ct_netns_get). A routed box whose ruleset has no such rule tracks
nothing; pyflow, which learns every connection from conntrack's events, would then offload
nothing, without a word. The kernel flowtable's `flow add` takes that reference itself, and
pyflowd does the same: while it manages at least one device it keeps a table of its own,

    table inet pyflow_conntrack {
        chain forward {
            type filter hook forward priority 0; policy accept;
            ct state new comment "pyflowd: ..."
        }
    }

whose one rule reads the ct state (which is what makes the kernel take the reference, for
IPv4 and IPv6: the table is of family inet) and does nothing with it: no verdict, no
statement, so no packet's fate changes; an accept policy of one base chain does not
overrule another chain's drop. The operator's tables are never read for writing nor
changed. The table is written in one transaction that first deletes a table of that name
(``table ...; delete table ...; table ... {}``), so a restart after a crash replaces its
predecessor's instead of adding a second, and is deleted when the last device goes, at a
stop that hands flows back, or when the operator opts out (``daemon.ensure_conntrack =
false``). A table of that name that pyflowd did not write (no rule with its comment) is
left alone and reported.

"Tracking is on" is told from the ruleset, not guessed from traffic: on when pyflowd holds
its own reference (its table is there, read back), or when another part of the ruleset
takes one (a ct expression, a NAT statement or chain, `flow add`, a ct helper/timeout/
expectation object, or an iptables-nft match or target that needs conntrack). An idle
router has no entries to look at, and the kernel does not expose the namespace's reference
count, so the ruleset is the one sound witness; rules of iptables-legacy are invisible to
it (they are counted as no reference, and pyflowd's own table makes that moot).

Everything goes through the ``nft`` command (nftables' own parser and netlink code); where
it is missing, or the kernel has no nf_tables, pyflowd says so in its log and status and
runs on: the operator can still load a ct rule by hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "pyflow_conntrack"
COMMENT = "pyflowd: conntrack tracks forwarded traffic for flow offload; removed when pyflowd stops"
NFT_TIMEOUT_S = 10.0

RULESET = f"""table {FAMILY} {TABLE}
delete table {FAMILY} {TABLE}
table {FAMILY} {TABLE} {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ct state new comment "{COMMENT}"
    }}
}}
"""

# Ruleset JSON keys of expressions and statements whose kernel side takes a conntrack
# reference (nft_ct, nft_nat/masq/redir, nft_flow_offload, the ct objects, synproxy)
_CT_KEYS = frozenset(("ct", "snat", "dnat", "masquerade", "redirect", "flow", "ct helper",
                      "ct timeout", "ct expectation", "ct count", "synproxy"))
# iptables-nft (xtables compat) matches and targets that need conntrack
_XT_CT = frozenset(("conntrack", "state", "connmark", "CONNMARK", "helper", "CT", "MASQUERADE",
                    "SNAT", "DNAT", "REDIRECT", "NETMAP", "connbytes", "connlimit", "connlabel"))

# what the tracking state says, in status and metrics
ENSURED = "pyflow"  # pyflowd's table holds a reference
RULESET_USES = "ruleset"  # not pyflowd's doing: another rule or chain of the ruleset holds one
NONE = "none"  # no reference in the nftables ruleset: forwarded traffic is not tracked
UNKNOWN = "unknown"  # the ruleset could not be read (no nft, no nf_tables)


@dataclass(frozen=True)
class TrackingState:
    """What ``pyflowctl status`` shows under ``tracking`` and the metrics export."""

    wanted: bool = True  # daemon.ensure_conntrack
    ensured: bool = False  # pyflowd's table is in place (pyflowd holds a reference)
    on: bool | None = None  # conntrack tracks forwarded traffic; None: cannot tell
    source: str = UNKNOWN  # ENSURED, RULESET_USES, NONE or UNKNOWN
    error: str | None = None  # why pyflowd could not ensure it, when it wanted to

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class NftError(Exception):
    """The nft command failed or is missing; the message says which and why."""


def find_nft() -> str | None:
    """The nft binary: on PATH, or in the sbin directories a service's PATH may lack."""
    found = shutil.which("nft")
    if found:
        return found
    for path in ("/usr/sbin/nft", "/sbin/nft", "/usr/local/sbin/nft"):
        if os.access(path, os.X_OK):
            return path
    return None


class Nft:
    """The nft command in this process's network namespace."""

    def __init__(self, binary: str | None = None):
        self.binary = binary if binary is not None else find_nft()

    def run(self, args: list[str], stdin: str | None = None) -> str:
        if not self.binary:
            raise NftError("the nft command is not installed (nftables)")
        try:
            res = subprocess.run([self.binary, *args], input=stdin, capture_output=True, text=True,
                                 timeout=NFT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"{self.binary}: {exc}") from None
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[0]
            raise NftError(f"nft {' '.join(args)}: {first[:300]}")
        return res.stdout

    def ruleset(self) -> list[dict[str, Any]]:
        """``nft -j list ruleset``: the list of objects (tables, chains, rules ...)."""
        out = self.run(["-j", "list", "ruleset"])
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as exc:
            raise NftError(f"nft -j list ruleset: unreadable output ({exc})") from None
        return [item for item in items if isinstance(item, dict)]


def _ours(item: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The body of ``item`` if it is a ``kind`` (table, chain, rule) of pyflowd's table."""
    body = item.get(kind)
    if not isinstance(body, dict) or body.get("family") != FAMILY:
        return None
    return body if body.get("name" if kind == "table" else "table") == TABLE else None


def _uses_conntrack(node: Any) -> bool:
    """Whether a ruleset object (a rule's expressions, a chain, an object) takes a
    conntrack reference in the kernel."""
    if isinstance(node, list):
        return any(_uses_conntrack(n) for n in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key in _CT_KEYS:
            return True
        if key == "xt" and isinstance(value, dict) and value.get("name") in _XT_CT:
            return True
        if _uses_conntrack(value):
            return True
    return False


def survey(items: list[dict[str, Any]]) -> tuple[bool, bool, bool]:
    """(our table exists, it holds our rule, the rest of the ruleset takes a reference)."""
    table = rule = others = False
    for item in items:
        if _ours(item, "table"):
            table = True
            continue
        own = _ours(item, "rule") or _ours(item, "chain")
        if own is not None:
            if "expr" in own and own.get("comment") == COMMENT:
                rule = True
            continue
        if isinstance(item.get("chain"), dict) and item["chain"].get("type") == "nat":
            others = True  # a NAT chain registers NAT, which needs conntrack
        elif any(key in item for key in ("ct helper", "ct timeout", "ct expectation")):
            others = True
        elif isinstance(item.get("rule"), dict) and _uses_conntrack(item["rule"].get("expr")):
            others = True
    return table, rule, others


class Tracking:
    """pyflowd's conntrack reference in its namespace (see the module's docstring).

    ``sync`` makes the table match what is wanted: present while ``wanted`` and ``active``
    (at least one device managed), absent otherwise; it re-reads the ruleset each time, so
    a table someone flushed away (``nft flush ruleset`` in a firewall reload) is put back at
    the next call. Thread-safe: the control loop (device changes) and the daemon's main
    thread (the periodic check) both call it."""

    def __init__(self, *, wanted: bool = True, nft: Nft | None = None):
        self.nft = nft if nft is not None else Nft()
        self.wanted = wanted
        self.active = False
        self._lock = threading.Lock()
        self._state = TrackingState(wanted=wanted)
        self._reported: str | None = None  # the last problem logged (each is logged once)

    @property
    def state(self) -> TrackingState:
        return self._state

    def sync(self, *, wanted: bool | None = None, active: bool | None = None) -> TrackingState:
        with self._lock:
            if wanted is not None:
                self.wanted = wanted
            if active is not None:
                self.active = active
            self._state = self._sync()
            return self._state

    def release(self) -> TrackingState:
        """Remove pyflowd's table (at a stop that hands flows back)."""
        return self.sync(active=False)

    def _sync(self) -> TrackingState:
        want = self.wanted and self.active
        try:
            table, rule, others = survey(self.nft.ruleset())
        except NftError as exc:
            return self._problem(f"cannot read the nftables ruleset: {exc}", want, on=None, source=UNKNOWN)
        error = None
        if table and not rule:
            # a table of our name that we did not write: not ours to replace or delete
            error = (f"a table {FAMILY} {TABLE} exists that pyflowd did not write; leaving it as it "
                     "is and adding nothing")
        elif want and not rule:
            try:
                self.nft.run(["-f", "-"], stdin=RULESET)
                table = rule = True
                log.info("conntrack: table %s %s added so that conntrack tracks forwarded traffic "
                         "(no other verdict changes; removed when pyflowd stops)", FAMILY, TABLE)
            except NftError as exc:
                error = f"cannot add table {FAMILY} {TABLE}: {exc}"
        elif not want and rule:
            try:
                self.nft.run(["delete", "table", FAMILY, TABLE])
                table = rule = False
                log.info("conntrack: table %s %s removed", FAMILY, TABLE)
            except NftError as exc:
                log.warning("conntrack: cannot remove table %s %s: %s", FAMILY, TABLE, exc)
        on = rule or others
        source = ENSURED if rule else RULESET_USES if others else NONE
        if error is not None:
            return self._problem(error, want, on=on, source=source)
        if want or not on:
            self._reported = None
        if not on and self.active:
            why = "daemon.ensure_conntrack = false" if not self.wanted else "not wanted"
            self._log_once(f"conntrack does not track forwarded traffic in this namespace ({why} and "
                           "no rule of the ruleset uses conntrack): nothing will be offloaded")
        return TrackingState(wanted=self.wanted, ensured=rule, on=on, source=source)

    def _problem(self, error: str, want: bool, *, on: bool | None, source: str) -> TrackingState:
        if want:
            if on:
                self._log_once(f"conntrack: {error}; the ruleset tracks connections itself")
            else:
                self._log_once(f"conntrack: {error}; unless the ruleset uses conntrack (a ct rule), "
                               "forwarded traffic is not tracked and nothing is offloaded")
        return TrackingState(wanted=self.wanted, ensured=False, on=on, source=source,
                             error=error if want else None)

    def _log_once(self, message: str) -> None:
        if message != self._reported:
            log.warning("%s", message)
            self._reported = message
