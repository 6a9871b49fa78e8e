"""Keep-alive: conntrack is kept alive while the fast path carries a connection, and a
flow that closed, went idle or vanished is handed back to the kernel.

Conntrack never sees the packets the fast path forwards. Every tick the engine reads
the flow map's counters in one batched walk (FlowTable.read_counters) and matches
them against every connection on the XDP path in C (csrc/keepalive.c, over the
``Slots`` arrays kept here); connections placed as flower rules are matched against
the rules' counters (placement.HwPlacement.scan). Only the connections that need
something done come back to Python, each with a verdict:

- MISSING: an entry vanished from under us (flushed by hand): the flow is removed whole;
- CLOSING: the datapath saw FIN/RST: the kernel takes the connection back;
- MOVED: packets moved since the last tick: conntrack's timeout is refreshed;
- IDLE: nothing moved for ``idle_timeout_s``: back to the kernel path.
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
MOVED: int = lib.PYFLOW_KA_MOVED
IDLE: int = lib.PYFLOW_KA_IDLE

Verdicts = list[tuple[tuple, Offloaded, int]]  # (ident, record, verdict) per connection to act on


class Slots:
    """Keep-alive state of every connection on the XDP path in C arrays, for
    csrc/keepalive.c: its two keys, and the packet count and last-seen time of its
    Offloaded record (which stays the truth: every change to those is written here too)."""

    def __init__(self, cap: int = 256):
        self.cap = 0
        self.top = 0  # slots [0, top) have been handed out at least once
        self.free: list[int] = []
        self.owner: list[tuple[tuple, Offloaded] | None] = []
        self.keys: Any = None  # uint8_t[2 * KEY_SIZE * cap]: each slot's two keys
        self.conns: Any = None  # struct pyflow_ka_conn[cap]
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

    def take(self, ident: tuple, off: Offloaded) -> None:
        if self.free:
            slot = self.free.pop()
        else:
            if self.top == self.cap:
                self._grow(self.cap * 2)
            slot = self.top
            self.top += 1
        self.owner[slot] = (ident, off)
        self.conns[slot].used = 1
        off.slot = slot
        self.write(off)

    def write(self, off: Offloaded) -> None:
        """off's keys, packet count or last-seen time changed."""
        slot = off.slot
        ko, kr = off.key_bytes
        ffi.memmove(self.keys + slot * 2 * KEY_SIZE, ko + kr, 2 * KEY_SIZE)
        c = self.conns[slot]
        c.packets, c.last_seen_ns = off.packets, off.last_seen_ns

    def drop(self, off: Offloaded) -> None:
        slot = off.slot
        self.conns[slot].used = 0
        self.owner[slot] = None
        self.free.append(slot)

    def scan(self, counters: Counters, now: int, idle_ns: int) -> Verdicts:
        """The verdicts of every connection in the slots against one counter read, in C;
        a MOVED connection's record gets its new packet count and last-seen time."""
        nout = ffi.new("uint32_t *")
        if lib.pyflow_ka_scan(self.keys, self.conns, self.top, KEY_SIZE, counters.keys, counters.counters,
                              counters.n, now, idle_ns, self.out_index, self.out_what, nout) < 0:
            raise MemoryError(f"keep-alive scan of {counters.n} entries: no memory for the index")
        out: Verdicts = []
        for k in range(nout[0]):
            slot, what = self.out_index[k], self.out_what[k]
            owner = self.owner[slot]
            assert owner is not None  # the C side skips unused slots
            ident, off = owner
            if what == MOVED:
                c = self.conns[slot]
                off.packets, off.last_seen_ns = c.packets, c.last_seen_ns
            out.append((ident, off, what))
        return out


def tick(eng: Engine) -> None:
    """One keep-alive round of eng (Engine.tick): one batched counter read for the whole
    table, one read of the rules' counters when there are hardware flows, then the
    verdicts acted on."""
    now = eng.clock()
    idle_ns = int(eng.config.idle_timeout_s * 1e9)
    verdicts = eng.slots.scan(eng.flows.read_counters(), now, idle_ns)
    if eng.rules.flows:
        verdicts += eng.rules.scan(now, idle_ns)
    for ident, off, what in verdicts:
        if what == MISSING:
            # do not leave half a flow behind
            eng.remove(ident, "entry_missing", tell_conntrack=True)
        elif what == CLOSING:
            eng.remove(ident, "fin_rst", tell_conntrack=True)
        elif what == MOVED:
            eng.stats.refreshes += 1
            if not eng.ct.refresh(off.conn, eng.config.conntrack_timeout_s):
                eng.remove(ident, "destroyed", tell_conntrack=False)
        else:
            eng.remove(ident, "idle", tell_conntrack=True)
    if eng.pending:
        eng.retry_pending()
