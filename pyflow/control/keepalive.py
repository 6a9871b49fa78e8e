"""Keep-alive: conntrack holds a long timeout while the fast path carries a connection,
and a flow that closed, went idle or vanished is handed back to the kernel.

Conntrack never sees the packets the fast path forwards. As the kernel's own flowtable
does, an offloaded connection's conntrack entry is given a long timeout when it is
claimed (EngineConfig.conntrack_timeout_s, a day by default, written in the same message
as the offload mark) and extended only when less than half of it is left; idleness is
judged from the datapath's last-seen times, never from conntrack. (The kernel flowtable
extends its entries in its own garbage collector; that extension is broken since Linux
6.14, and pyflow does not rely on it: it writes the extension itself.)

Every tick the engine reads the flow map's counters in one batched walk
(FlowTable.read_counters) and matches them against every connection on the XDP path in
C (csrc/keepalive.c, over the ``Slots`` arrays kept here); connections placed as flower
rules are matched against the rules' counters (placement.HwPlacement.scan). Moving
packets only update the slot in C. Only the connections that need something done come
back to Python, each with a verdict:

- MISSING: an entry vanished from under us (flushed by hand): the flow is removed whole;
- CLOSING: the datapath saw FIN/RST: the kernel takes the connection back;
- IDLE: nothing moved for ``idle_timeout_s``: back to the kernel path;
- EXTEND: conntrack's timeout has less than half left: written again (one netlink
  message per connection per half a timeout, at most MAX_EXTENDS_PER_TICK a tick).

A connection handed back gets its protocol's own timeout again (Engine.remove: TCP
established or UDP stream timeout of the namespace's sysctls, less the time it was
idle), so conntrack does not keep a dead connection for a day. If the daemon dies
without handing back, the entries keep the long timeout; the next start reconciles
them at its first resync (Engine.resync): what it offloads again is held again, and
what it does not is handed back with its protocol's timeout. Until then a connection
that is still alive loses nothing (its next packet on the kernel path resets conntrack's
timeout); a dead one lingers at most the long timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyflow._native import ffi, lib
from pyflow.control.model import Offloaded
from pyflow.datapath.abi import KEY_SIZE
from pyflow.datapath.flowtable import Counters

if TYPE_CHECKING:
    from pyflow.control.engine import Engine

MISSING: int = lib.PYFLOW_KA_MISSING
CLOSING: int = lib.PYFLOW_KA_CLOSING
EXTEND: int = lib.PYFLOW_KA_EXTEND
IDLE: int = lib.PYFLOW_KA_IDLE

MAX_EXTENDS_PER_TICK = 10000
"""Conntrack timeouts written again in one tick (about 15 us each). Connections offloaded
together (a start with 1M of them) run low together; the rest are found again at the
next ticks, with half a timeout of margin, instead of one tick sending a million
messages."""

SETTLE_NS = 1_000_000_000
"""The long timeout is written once more this long after a connection's entries went in.
It was written with the offload mark, before the entries existed; packets still on their
way through the kernel path then (the other direction, a burst queued behind the claim)
make conntrack set their state's own timeout again (120 s for UDP), which a day-long
hold computed from the claim would not notice."""

Verdicts = list[tuple[tuple, Offloaded, int]]  # (ident, record, verdict) per connection to act on


def extend_ns(timeout_s: int) -> int:
    """A conntrack timeout of timeout_s is written again when less than this is left: half
    of it, as the kernel flowtable does."""
    return timeout_s * 500_000_000


def first_deadline(now: int, timeout_s: int) -> int:
    """The deadline a newly offloaded connection's slot starts with: as if its timeout ran
    out so that the scan asks for it to be written again SETTLE_NS from now (or earlier if
    the timeout is so short that half of it is gone sooner)."""
    return now + min(timeout_s * 1_000_000_000, extend_ns(timeout_s) + SETTLE_NS)


class Slots:
    """Keep-alive state of every connection on the XDP path in C arrays, for
    csrc/keepalive.c: its two keys, its packet count and last-seen time at the last tick
    and when conntrack's timeout runs out. For these connections the slot is the truth
    (the scan updates it in C); ``activity`` reads it."""

    def __init__(self, cap: int = 256):
        self.cap = 0
        self.top = 0  # slots [0, top) have been handed out at least once
        self.free: list[int] = []
        self.owner: list[Offloaded | None] = []
        self.keys: Any = None  # uint8_t[2 * KEY_SIZE * cap]: each slot's two keys
        self.conns: Any = None  # struct pyflow_ka_conn[cap]
        self._nout = ffi.new("uint32_t *")
        self._grow(cap)

    def _grow(self, cap: int) -> None:
        keys = ffi.new("uint8_t[]", cap * 2 * KEY_SIZE)
        conns = ffi.new("struct pyflow_ka_conn[]", cap)
        if self.cap:
            ffi.memmove(keys, self.keys, self.cap * 2 * KEY_SIZE)
            ffi.memmove(conns, self.conns, ffi.sizeof(self.conns))
        self.keys, self.conns, self.cap = keys, conns, cap
        self.out_index = ffi.new("uint32_t[]", cap)
        self.out_what = ffi.new("uint8_t[]", cap)
        self.owner.extend([None] * (cap - len(self.owner)))

    def take(self, off: Offloaded, *, last_seen_ns: int, deadline_ns: int) -> None:
        """A slot for off (its keys from off.key_bytes, no packets yet)."""
        if self.free:
            slot = self.free.pop()
        else:
            if self.top == self.cap:
                self._grow(self.cap * 2)
            slot = self.top
            self.top += 1
        self.owner[slot] = off
        off.slot = slot
        c = self.conns[slot]
        c.used, c.packets, c.last_seen_ns, c.ct_deadline_ns = 1, 0, last_seen_ns, deadline_ns
        self.rewritten(off)

    def rewritten(self, off: Offloaded) -> None:
        """off's entries were written anew (keys in off.key_bytes): their counters restart at
        zero, so does the slot's count."""
        slot = off.slot
        ffi.memmove(self.keys + slot * 2 * KEY_SIZE, off.keys_raw, 2 * KEY_SIZE)
        self.conns[slot].packets = 0

    def held(self, off: Offloaded, deadline_ns: int) -> None:
        """Conntrack's timeout for off was written: it runs out at deadline_ns."""
        self.conns[off.slot].ct_deadline_ns = deadline_ns

    def activity(self, off: Offloaded) -> tuple[int, int, int]:
        """(packets of both directions, last-seen time, conntrack deadline) at the last tick."""
        c = self.conns[off.slot]
        return c.packets, c.last_seen_ns, c.ct_deadline_ns

    def drop(self, off: Offloaded) -> None:
        slot = off.slot
        self.conns[slot].used = 0
        self.owner[slot] = None
        self.free.append(slot)
        off.slot = -1

    def scan(self, counters: Counters, now: int, idle_ns: int, extend_ns: int) -> Verdicts:
        """The verdicts of every connection in the slots against one counter read, in C
        (packet counts and last-seen times are updated there)."""
        nout = self._nout
        if lib.pyflow_ka_scan(self.keys, self.conns, self.top, KEY_SIZE, counters.keys, counters.counters,
                              counters.n, now, idle_ns, extend_ns, self.out_index, self.out_what, nout) < 0:
            raise MemoryError(f"keep-alive scan of {counters.n} entries: no memory for the index")
        out: Verdicts = []
        owner, index, what = self.owner, self.out_index, self.out_what
        for k in range(nout[0]):
            off = owner[index[k]]
            assert off is not None  # the C side skips unused slots
            out.append((off.conn.ident, off, what[k]))
        return out


def tick(eng: Engine) -> None:
    """One keep-alive round of eng (Engine.tick): one batched counter read for the whole
    table, one read of the rules' counters when there are hardware flows, then the
    verdicts acted on: Python work and netlink messages only for what changed."""
    now = eng.clock()
    hold = eng.config.conntrack_timeout_s
    idle_ns, ext_ns = int(eng.config.idle_timeout_s * 1e9), extend_ns(hold)
    verdicts = eng.slots.scan(eng.flows.read_counters(), now, idle_ns, ext_ns)
    if eng.rules.flows:
        verdicts += eng.rules.scan(now, idle_ns, ext_ns)
    extend: list[tuple[tuple, Offloaded]] = []
    for ident, off, what in verdicts:
        if what == MISSING:
            # do not leave half a flow behind
            eng.remove(ident, "entry_missing", tell_conntrack=True)
        elif what == CLOSING:
            eng.remove(ident, "fin_rst", tell_conntrack=True)
        elif what == IDLE:
            eng.remove(ident, "idle", tell_conntrack=True)
        elif len(extend) < MAX_EXTENDS_PER_TICK:
            extend.append((ident, off))
    if extend:
        eng.stats.refreshes += len(extend)
        many = getattr(eng.ct, "refresh_many", None)  # CtNetlink: the changes in one sendmsg()
        if many is not None and len(extend) > 1:
            written = many([off.conn for _i, off in extend], hold)
        else:
            written = [eng.ct.refresh(off.conn, hold) for _i, off in extend]
        for (ident, off), ok in zip(extend, written, strict=True):
            if ok:
                eng.held(off, now + hold * 1_000_000_000)
            else:
                eng.remove(ident, "destroyed", tell_conntrack=False)
    if eng.pending:
        eng.retry_pending()
