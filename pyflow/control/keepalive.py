"""Keep-alive: conntrack holds a long timeout while the fast path carries a connection,
and a flow that closed, went idle or vanished is handed back to the kernel.

Conntrack never sees the packets the fast path forwards. As the kernel's own flowtable
does, an offloaded connection's conntrack entry is given a long timeout when it is
claimed (EngineConfig.conntrack_timeout_s, a day by default, written in the same message
as the offload mark) and extended only when less than half of it is left; idleness is
judged from the datapath's packet counts, never from conntrack. The datapath keeps no
per-flow clock (it would take a fourth cache line per flow-map element): a connection
whose count moved since the previous walk is taken as seen at this walk. (The kernel
flowtable extends its entries in its own garbage collector; that extension is broken
since Linux 6.14, and pyflow does not rely on it: it writes the extension itself.)

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

The walk (map read and C scan) costs in proportion to the table: about 0.85 us per
connection (0.55 us of it the kernel's batched read of two entries) on this project's
test machines, 85 ms at 100k connections. Below PACE_FROM connections it runs at every
tick; above, ``Pacer`` spaces walks so that on average they take at most WALK_BUDGET of
a core (a walk's measured CPU time / WALK_BUDGET apart), and never more than
MAX_WALK_INTERVAL_S apart (nor half of idle_timeout_s). FIN and RST need no walk to take
effect: the datapath sends them and every later packet of that flow to the kernel, so
conntrack follows the close itself; the walk only finds idleness and low timeouts. The
cost of pacing is delay, bounded: a connection idle for idle_timeout_s is handed back
at most two walk intervals (MAX_WALK_INTERVAL_S, 10 s, at most) plus one tick later (its
last packet may have come just after one walk, which is seen only at the next), and a
closed one's entries are removed at most one walk interval and a tick late. A walk that
left extensions for later (more than a walk writes ran low) is followed by one as soon
as what it found is written. The control loop writes the timeouts a walk found in small batches between its
turns (drain), so that no conntrack event waits for ten thousand of them.

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

import time
from collections import deque
from collections.abc import Callable
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
messages. Above 200,000 connections a tick writes a twentieth of them instead (see
extends_per_walk): every walk that finds more costs a walk of the whole table."""


def extends_per_walk(connections: int) -> int:
    """Timeouts one walk writes at most: MAX_EXTENDS_PER_TICK, or a twentieth of the table
    when that is more, so that writing every connection's timeout (the start of 1M) takes
    at most about 20 walks instead of 100, each a walk of the whole table."""
    return max(MAX_EXTENDS_PER_TICK, connections // 20)

SETTLE_NS = 1_000_000_000
"""The long timeout is written once more this long after a connection's entries went in.
It was written with the offload mark, before the entries existed; packets still on their
way through the kernel path then (the other direction, a burst queued behind the claim)
make conntrack set their state's own timeout again (120 s for UDP), which a day-long
hold computed from the claim would not notice."""

PACE_FROM = 20_000
"""Connections from which walks are paced; below, every tick walks (a few ms)."""

WALK_BUDGET = 0.01
"""Share of a core the walks may take on average once paced: a walk of c CPU seconds is
followed by the next one c / WALK_BUDGET later (85 ms at 100k connections: 8.5 s)."""

SCAN_SLICE = 1024
"""Connections the control loop scans per turn when the map was read in another thread
(Walk, scan_some): under a millisecond (2048 took 1-2.5 ms on a loaded test machine). One
scan of the whole table in one turn took 50-100 ms at 100,000 connections, and every
conntrack event that came meanwhile waited."""

MAX_WALK_INTERVAL_S = 10.0
"""Walks are never further apart than this (nor than half of idle_timeout_s): it bounds
how late an idle connection is handed back, and stays well inside the 30 s conntrack
gives a new UDP entry, so the second write of the long timeout (SETTLE_NS) still comes
in time."""


class Pacer:
    """When the next walk is due. ``cpu`` is the clock of the walk's cost (this thread's
    CPU time: what the walk takes from the core, not what a loaded machine adds to its
    wall time)."""

    def __init__(self, cpu: Callable[[], float] = time.thread_time):
        self.cpu = cpu
        self.next_ns = 0  # engine clock; 0: the next tick walks
        self.interval_s = 0.0  # between the last walk and the next
        self.last_cost_s = 0.0  # CPU seconds of the last walk
        self.walks = 0
        self.skipped = 0  # ticks that did not walk
        # conntrack timeouts found running low, to write (drain); the scan held more back
        # when walk_when_drained: the next walk comes as soon as these are written
        self.queue: deque[tuple[tuple, Offloaded]] = deque()
        self.walk_when_drained = False
        self.defer_writes = False  # True: ticks only queue them, the control loop drains
        self.walk: Walk | None = None  # a scan under way in parts (scan_some)

    def due(self, now: int) -> bool:
        if now >= self.next_ns or (self.walk_when_drained and not self.queue):
            return True
        self.skipped += 1
        return False

    def walked(self, now: int, cost_s: float, connections: int, idle_timeout_s: float,
               backlog: bool) -> None:
        """A walk of cost_s CPU seconds over `connections` ended at now: set the next one."""
        self.walks += 1
        self.last_cost_s = cost_s
        self.walk_when_drained = backlog
        if connections < PACE_FROM:
            self.interval_s = 0.0
        else:
            self.interval_s = min(cost_s / WALK_BUDGET, max_walk_interval_s(idle_timeout_s))
        self.next_ns = now + int(self.interval_s * 1e9)


class Walk:
    """A walk whose map read (and its index, index_of) was made in another thread
    (runner.BackgroundRead), scanned by the control loop SCAN_SLICE connections per turn
    (scan_some). The verdicts are those one scan of the whole table would give: every
    slot is judged against the same read at the same time ``now``, and the slots taken or
    rewritten since the read began are not called missing (Slots.touched), whether that
    happened during the read or between two parts of the scan."""

    def __init__(self, counters: Counters, index: Any, top: int, now: int, cost_s: float, limit: int):
        self.counters = counters  # the index points into its keys: kept as long as the index
        self.index = index
        self.next = 0  # the next slot to scan
        self.top = top  # slots from here on were taken after the read began
        self.now = now
        self.cost_s = cost_s  # CPU seconds: the read's and the index's, then each part's
        self.limit = limit  # EXTEND verdicts this walk hands out at most (extends_per_walk)
        self.extends: list[tuple[tuple, Offloaded]] = []
        self.over = 0  # EXTEND verdicts held back beyond limit


def index_of(counters: Counters) -> Any:
    """counters' keys indexed for scans in parts (csrc/keepalive.c), freed with the returned
    object; one C call, made without the GIL, so the reading thread builds it."""
    index = lib.pyflow_ka_index_new(counters.keys, counters.n, KEY_SIZE)
    if index == ffi.NULL:
        raise MemoryError(f"keep-alive index of {counters.n} entries: no memory")
    return ffi.gc(index, lib.pyflow_ka_index_free)


def max_walk_interval_s(idle_timeout_s: float) -> float:
    return min(MAX_WALK_INTERVAL_S, idle_timeout_s / 2)


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
        self._one = ffi.new("struct pyflow_ka_conn *")  # take_many's state of each slot
        self._over = ffi.new("uint32_t *")
        self.extend_over = 0  # EXTEND verdicts the last scan held back (max_extend)
        # slots taken or rewritten since the current map read began: a read made in another
        # thread may have missed their entries, so a scan against it must not call them missing
        self.touched: set[int] = set()
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
        self.touched.add(slot)
        c = self.conns[slot]
        c.used, c.packets, c.last_seen_ns, c.ct_deadline_ns = 1, 0, last_seen_ns, deadline_ns
        ffi.memmove(self.keys + slot * 2 * KEY_SIZE, off.keys_raw, 2 * KEY_SIZE)  # as rewritten()

    def take_many(self, offs: list[Offloaded], *, last_seen_ns: int, deadline_ns: int) -> None:
        """take() for each of offs in turn, all with the same times: the same slots and state.
        Past the free slots they are consecutive, so their keys and state are written with
        one copy each."""
        n = 0
        while self.free and n < len(offs):
            self.take(offs[n], last_seen_ns=last_seen_ns, deadline_ns=deadline_ns)
            n += 1
        rest = len(offs) - n
        if not rest:
            return
        size = 2 * KEY_SIZE
        keys = b"".join([off.keys_raw for off in offs[n:]])
        if len(keys) != rest * size:
            raise ValueError(f"{rest} connections with {len(keys)} bytes of keys")
        top = self.top
        while self.cap < top + rest:
            self._grow(self.cap * 2)
        self.top = top + rest
        owner = self.owner
        for slot, off in enumerate(offs[n:], top):
            owner[slot] = off
            off.slot = slot
        self.touched.update(range(top, top + rest))
        one = self._one
        one.used, one.packets, one.last_seen_ns, one.ct_deadline_ns = 1, 0, last_seen_ns, deadline_ns
        ffi.memmove(self.conns + top, ffi.buffer(one)[:] * rest, rest * ffi.sizeof(one[0]))
        ffi.memmove(self.keys + top * size, keys, len(keys))

    def rewritten(self, off: Offloaded) -> None:
        """off's entries were written anew (keys in off.key_bytes): their counters restart at
        zero, so does the slot's count."""
        slot = off.slot
        self.touched.add(slot)
        ffi.memmove(self.keys + slot * 2 * KEY_SIZE, off.keys_raw, 2 * KEY_SIZE)
        self.conns[slot].packets = 0

    def held(self, off: Offloaded, deadline_ns: int) -> None:
        """Conntrack's timeout for off was written: it runs out at deadline_ns."""
        self.conns[off.slot].ct_deadline_ns = deadline_ns

    def activity(self, off: Offloaded) -> tuple[int, int, int]:
        """(packets of both directions, last-seen time, conntrack deadline) at the last tick."""
        c = self.conns[off.slot]
        return c.packets, c.last_seen_ns, c.ct_deadline_ns

    def in_use(self) -> int:
        return self.top - len(self.free)

    def unowned(self, counters: Counters) -> list[bytes]:
        """The keys of a counter read that no connection in the slots holds, in C (one index
        of the read, two lookups per connection); a key read twice comes back twice."""
        n = counters.n
        index = index_of(counters)
        out = ffi.new("uint32_t[]", max(n, 1))
        if lib.pyflow_ka_unowned(index, n, self.keys, self.conns, self.top, out, self._nout) < 0:
            raise MemoryError(f"stray-entry check of {n} entries: no memory")
        raw = ffi.buffer(counters.keys, n * KEY_SIZE)
        return [raw[i * KEY_SIZE:(i + 1) * KEY_SIZE] for i in out[0:self._nout[0]]]

    def drop(self, off: Offloaded) -> None:
        slot = off.slot
        self.conns[slot].used = 0
        self.owner[slot] = None
        self.free.append(slot)
        off.slot = -1

    def scan_range(self, walk: Walk, lo: int, hi: int, idle_ns: int, extend_ns: int,
                   max_extend: int) -> tuple[Verdicts, int]:
        """Slots [lo, hi) against walk's read (Slots.scan for part of the table): their
        verdicts, and how many EXTEND verdicts were held back beyond max_extend."""
        nout, over = self._nout, self._over
        lib.pyflow_ka_scan_range(walk.index, self.keys, self.conns, lo, hi, walk.counters.counters, walk.now,
                                 idle_ns, extend_ns, self.out_index, self.out_what, nout, max_extend, over)
        owner, index, what = self.owner, self.out_index, self.out_what
        out: Verdicts = []
        for k in range(nout[0]):
            off = owner[index[k]]
            assert off is not None  # the C side skips unused slots
            out.append((off.conn.ident, off, what[k]))
        return out, over[0]

    def scan(self, counters: Counters, now: int, idle_ns: int, extend_ns: int,
             max_extend: int = 0xFFFFFFFF) -> Verdicts:
        """The verdicts of every connection in the slots against one counter read, in C
        (packet counts and last-seen times are updated there); at most max_extend EXTEND
        verdicts, the number held back in ``extend_over``."""
        nout = self._nout
        if lib.pyflow_ka_scan(self.keys, self.conns, self.top, KEY_SIZE, counters.keys, counters.counters,
                              counters.n, now, idle_ns, extend_ns, self.out_index, self.out_what, nout,
                              max_extend, self._over) < 0:
            raise MemoryError(f"keep-alive scan of {counters.n} entries: no memory for the index")
        self.extend_over = self._over[0]
        out: Verdicts = []
        owner, index, what = self.owner, self.out_index, self.out_what
        for k in range(nout[0]):
            off = owner[index[k]]
            assert off is not None  # the C side skips unused slots
            out.append((off.conn.ident, off, what[k]))
        return out


def begin_read(eng: Engine) -> None:
    """A read of the map for the next scan begins now: from here on the slots taken or
    rewritten are remembered (Slots.touched), their entries may be missing from it."""
    eng.slots.touched = set()


def wants_background_read(eng: Engine) -> bool:
    """A walk is due and the table is large enough that reading the map in another thread
    (the loop handling events meanwhile) is worth it."""
    return eng.slots.in_use() >= PACE_FROM and eng.pacer.due(eng.clock())


def drain(eng: Engine, n: int) -> int:
    """Write up to n of the queued conntrack timeouts (those still offloaded), in one
    sendmsg() where the adapter can; an entry found gone is removed as destroyed. The
    loop calls it between its turns in batches small enough that no event waits long
    (runner: DRAIN_BATCH); Engine.tick writes a walk's worth at once."""
    q = eng.pacer.queue
    batch: list[tuple[tuple, Offloaded]] = []
    while q and len(batch) < n:
        ident, off = q.popleft()
        if eng.offloaded.get(ident) is off:
            batch.append((ident, off))
    if not batch:
        return 0
    hold = eng.config.conntrack_timeout_s
    now = eng.clock()
    eng.stats.refreshes += len(batch)
    many = getattr(eng.ct, "refresh_many", None)  # CtNetlink: the changes in one sendmsg()
    if many is not None and len(batch) > 1:
        written = many([off.conn for _i, off in batch], hold)
    else:
        written = [eng.ct.refresh(off.conn, hold) for _i, off in batch]
    for (ident, off), ok in zip(batch, written, strict=True):
        if ok:
            eng.held(off, now + hold * 1_000_000_000)
        else:
            eng.remove(ident, "destroyed", tell_conntrack=False)
    return len(batch)


def act(eng: Engine, verdicts: Verdicts, touched: set[int]) -> list[tuple[tuple, Offloaded]]:
    """Removals for the verdicts that call for one; returns the connections whose conntrack
    timeout runs low (to write). ``touched``: slots written since the read began."""
    extend: list[tuple[tuple, Offloaded]] = []
    for ident, off, what in verdicts:
        if what == MISSING and off.slot in touched:
            continue  # written after the read began: judged at the next walk
        if what == MISSING:
            # do not leave half a flow behind
            eng.remove(ident, "entry_missing", tell_conntrack=True)
        elif what == CLOSING:
            eng.remove(ident, "fin_rst", tell_conntrack=True)
        elif what == IDLE:
            eng.remove(ident, "idle", tell_conntrack=True)
        else:
            extend.append((ident, off))
    return extend


def begin_walk(eng: Engine, counters: Counters, index: Any, read_cpu_s: float) -> None:
    """A read made in another thread (begun with begin_read; index: index_of) is done: its
    scan starts, in parts (scan_some). Ticks meanwhile start no other walk."""
    eng.pacer.walk = Walk(counters, index, eng.slots.top, eng.clock(), read_cpu_s,
                          extends_per_walk(eng.slots.in_use()))


def scan_some(eng: Engine, n: int = SCAN_SLICE) -> bool:
    """The next n slots of the walk under way scanned and acted on; after the last part,
    the rest of what a walk's tick does (the timeouts found running low queued, the next
    walk set). True when the walk is done."""
    pacer, walk = eng.pacer, eng.pacer.walk
    assert walk is not None
    cpu0 = pacer.cpu()
    hold = eng.config.conntrack_timeout_s
    lo, hi = walk.next, min(walk.top, walk.next + n)
    verdicts, over = eng.slots.scan_range(walk, lo, hi, int(eng.config.idle_timeout_s * 1e9), extend_ns(hold),
                                          max(0, walk.limit - len(walk.extends)))
    walk.over += over
    walk.next = hi
    walk.extends += act(eng, verdicts, eng.slots.touched)
    walk.cost_s += pacer.cpu() - cpu0
    if hi < walk.top:
        return False
    pacer.walk = None
    eng.slots.extend_over = walk.over
    pacer.queue = deque(walk.extends)  # as tick: what this walk found replaces what was queued
    if not pacer.defer_writes:
        drain(eng, walk.limit)
    pacer.walked(eng.clock(), walk.cost_s, eng.slots.in_use(), eng.config.idle_timeout_s, walk.over > 0)
    if eng.pending:
        eng.retry_pending()
    return True


def tick(eng: Engine, counters: Counters | None = None, *, walk: bool = True,
         read_cpu_s: float = 0.0, write_extends: bool | None = None) -> None:
    """One keep-alive round of eng (Engine.tick): when the pacer says a walk is due, one
    batched counter read for the whole table scanned in C; one read of the rules' counters
    when there are hardware flows (few: every tick); then the verdicts acted on: Python
    work and netlink messages only for what changed.

    ``counters``: a read made elsewhere (another thread: runner.BackgroundRead, begun
    with begin_read) to scan now; ``walk`` False: no walk this time (a read is under way);
    ``read_cpu_s``: what that read cost, for the pacer; ``write_extends`` False (by
    default: not pacer.defer_writes): the timeouts running low are only queued
    (pacer.queue), the caller writes them (drain)."""
    now = eng.clock()
    hold = eng.config.conntrack_timeout_s
    idle_ns, ext_ns = int(eng.config.idle_timeout_s * 1e9), extend_ns(hold)
    pacer = eng.pacer
    walked, cost = counters is not None or (walk and pacer.due(now)), read_cpu_s
    limit = MAX_EXTENDS_PER_TICK
    verdicts: Verdicts = []
    touched: set[int] = set()
    if walked:
        cpu0 = pacer.cpu()
        if counters is None:
            begin_read(eng)
            counters = eng.flows.read_counters()
        touched = eng.slots.touched
        limit = extends_per_walk(eng.slots.in_use())
        verdicts = eng.slots.scan(counters, now, idle_ns, ext_ns, limit)
        cost += pacer.cpu() - cpu0
    rule_verdicts = eng.rules.scan(now, idle_ns, ext_ns) if eng.rules.flows else []
    extend = act(eng, verdicts + rule_verdicts, touched)
    if walked:
        # what this walk found running low replaces what was queued: a walk finds all of it
        # (up to `limit`), and what was written since no longer runs low
        pacer.queue = deque(extend)
    else:
        pacer.queue.extend(extend)  # the rules' (scanned at every tick)
    if write_extends if write_extends is not None else not pacer.defer_writes:
        drain(eng, limit)
    if walked:
        pacer.walked(eng.clock(), cost, eng.slots.in_use(), eng.config.idle_timeout_s,
                     eng.slots.extend_over > 0)
    if eng.pending:
        eng.retry_pending()
