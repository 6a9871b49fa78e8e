"""The offload engine: what the fast path carries, decided from conntrack.

Kernel conntrack is the single source of truth. The engine

- offloads a connection when it qualifies (see ``refusal``), installing both
  directions together or neither, with NAT copied from the conntrack tuple pair;
- keeps conntrack alive while the fast path carries the connection (conntrack
  never sees those packets) and marks it offloaded there (keepalive.py);
- takes a connection off the fast path when conntrack destroys it, when the
  datapath saw FIN/RST, when it has been idle for ``idle_timeout_s``, or when its
  path can no longer be resolved; a changed path is written in place, and one
  taken off for its path is offloaded again when a later path change resolves it
  (returning.py: no conntrack event needed, bounded in time and number);
- puts a connection between two hardware devices on the NIC as flower rules when
  it has a placer for them (placement.py), and on the XDP map otherwise.

Adapters come in as parameters (model.Conntrack, model.PathResolver, model.FlowMap,
model.Devices, model.HwPlacer), so every decision here is testable with fakes that
implement those interfaces, without root. The engine is not thread-safe: one loop
drives it (events, path changes, ticks).

Where the time goes (tests/bench/bench_control.py measures it): work comes in
passes (a poll's events, a resync, a path change) that share path lookups and write
their installs with one map call per BATCH connections, packed straight to bytes
from each connection's fields (abi.entry_bytes); the keep-alive tick matches the
counter dump against every connection in C (csrc/keepalive.c).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pyflow.control import keepalive
from pyflow.control.fdbkeep import FdbKeeper
from pyflow.control.keepalive import Slots
from pyflow.control.model import (
    EGRESS_NOT_MANAGED,
    INGRESS_NOT_MANAGED,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DYING,
    IPS_NAT_CLASH,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    IPS_SEQ_ADJUST,
    SHAPED_UPPER,
    TCP_CONNTRACK_ESTABLISHED,
    Actions,
    Conn,
    Conntrack,
    CtEvent,
    Devices,
    Egress,
    EventType,
    Fields,
    FlowMap,
    HwPlacer,
    Keys,
    Layer,
    ManagedDevice,
    NoPath,
    NotYet,
    Offloaded,
    Path,
    PathResolver,
    egress_at,
    entries_of,
    entry_fields,
)
from pyflow.control.pathgroups import Group, PathGroups
from pyflow.control.placement import HwPlacement, MapPlacement, pack_conns, pack_entries
from pyflow.control.returning import Returning, path_key
from pyflow.datapath.abi import FlowAction, FlowKey, coarse_clock_ns, key_bytes
from pyflow.datapath.flowtable import Counters

__all__ = ["BATCH", "Engine", "EngineConfig", "EngineStats", "ManagedDevice", "Offloaded"]

log = logging.getLogger(__name__)

BATCH = 256
"""Connections per map write in a pass (resync, a poll's events, retries, path changes): one
bpf() call for many instead of one per connection, while the first of a burst waits for at
most this many others to be planned (about a millisecond)."""


@dataclass(frozen=True)
class EngineConfig:
    idle_timeout_s: float = 30.0  # as the kernel flowtable: idle flows go back to the slow path
    # conntrack's timeout while the fast path carries a connection (written with the offload
    # mark, again when less than half is left: keepalive.py); a day, as the kernel flowtable
    conntrack_timeout_s: int = 86400
    exclude_mark_mask: int = 0  # conntrack mark bits that opt a connection out (SQM, shaping, DSCP)
    # a connection a path change took off the fast path is offloaded again at the first later
    # path change that resolves its path, if that comes within this window (returning.py); at
    # most this many wait at once
    return_window_s: float = 300.0
    return_max: int = 65536


@dataclass
class EngineStats:
    offloaded: int = 0  # connections put on the fast path
    removed: dict[str, int] = field(default_factory=dict)  # by cause
    refused: dict[str, int] = field(default_factory=dict)  # by refusal reason
    pending: int = 0  # waiting for a neighbour
    resyncs: int = 0
    refreshes: int = 0
    install_errors: int = 0
    rewritten: int = 0  # offloaded connections whose path changed and was written in place
    hw_offloaded: int = 0  # connections placed as flower rules (also counted in offloaded)
    hw_failures: int = 0  # placements the hardware refused: those flows went to the XDP path
    hw_refused: dict[str, int] = field(default_factory=dict)  # hw_failures by reason
    reoffloaded: int = 0  # connections a path change took off, offloaded again when it came back

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Engine:
    def __init__(self, conntrack: Conntrack, paths: PathResolver, flows: FlowMap, devices: Devices,
                 config: EngineConfig | None = None, *, clock: Callable[[], int] = coarse_clock_ns,
                 hw: HwPlacer | None = None):
        self.ct = conntrack
        self.config = config or EngineConfig()
        self.clock = clock  # keep-alive slots, deadlines and ages are all on this clock
        self.offloaded: dict[tuple, Offloaded] = {}
        # the same records by path key, so that a path change resolves each group once
        self.groups = PathGroups()
        self.pending: dict[tuple, Conn] = {}
        # taken off by a path change, offered again at each later one (returning.py)
        self.returning = Returning(int(self.config.return_window_s * 1e9), self.config.return_max)
        self.stats = EngineStats()
        self.planner = Planner(paths, devices)
        # Within one pass: connections planned but not yet written (written together by _flush)
        self._queue: list[tuple[tuple, Conn, Path]] = []
        self._queued: set[tuple] = set()
        self.map = MapPlacement(flows, self.stats)  # entries in the XDP flow map
        self.slots = Slots()  # keep-alive state of the connections on the XDP map
        self.pacer = keepalive.Pacer()  # when the keep-alive's next walk of the map is due
        self.rules = HwPlacement(self.stats, clock)  # the connections carried as flower rules
        self.rules.hw = hw
        self.fdb = FdbKeeper()  # bridge FDB entries offloaded flows use, kept from ageing out

    @property
    def flows(self) -> FlowMap:
        """The XDP flow map (pyflow.datapath.flowtable.FlowTable)."""
        return self.map.flows

    @flows.setter
    def flows(self, flows: FlowMap) -> None:
        self.map.flows = flows

    @property
    def hw(self) -> HwPlacer | None:
        """The flower placer (None: every flow goes to the XDP map); may be set later."""
        return self.rules.hw

    @hw.setter
    def hw(self, placer: HwPlacer | None) -> None:
        self.rules.hw = placer

    # ---- policy -----------------------------------------------------------------------

    def refusal(self, conn: Conn) -> str | None:
        """Why conn may not be offloaded, or None. Device checks happen at resolution.

        What the kernel's own flowtable admits (nft_flow_offload.c) is admitted here and no
        more: TCP established *and* assured, no helper, no sequence adjustment, no NAT clash,
        confirmed, and not already carried by the kernel flowtable (IPS_OFFLOAD, which
        pyflow itself never sets: it marks its connections with the conntrack mark)."""
        status = conn.status
        if conn.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            return "protocol"
        if status & IPS_DYING:
            return "dying"
        if status & IPS_OFFLOAD:
            # the kernel flowtable (fw4's flow offloading) has it: carrying it too would
            # forward one connection two ways, with two sets of counters and timeouts
            return "kernel_offloaded"
        if not status & IPS_SEEN_REPLY:
            return "no_reply_yet"
        if not status & IPS_CONFIRMED:
            return "unconfirmed"  # not in the conntrack table yet (it may still be dropped)
        if conn.proto == socket.IPPROTO_TCP:
            if conn.tcp_state != TCP_CONNTRACK_ESTABLISHED:
                return "tcp_not_established"
            if not status & IPS_ASSURED:
                # established by a picked-up mid-stream segment, not yet confirmed by the
                # other side: the kernel waits for that too (nf_conntrack_tcp_established)
                return "tcp_not_assured"
        if conn.helper:
            return "helper"  # ftp, sip ...: the helper must see every packet
        if status & IPS_SEQ_ADJUST:
            return "seq_adjust"  # every segment's sequence numbers need conntrack's rewrite
        if status & IPS_NAT_CLASH:
            # merged into another entry on a NAT race: its reply tuple belongs to that one
            return "nat_clash"
        if conn.mark & self.config.exclude_mark_mask:
            return "excluded_by_mark"
        return None

    # ---- events -----------------------------------------------------------------------

    def handle(self, events: Iterable[CtEvent | None]) -> None:
        """Apply conntrack events; a None marker (lost events) triggers a full resync."""
        resync = False
        with self._pass():
            for ev in events:
                if ev is None:
                    resync = True
                    continue
                ident = ev.conn.ident
                if ident in self._queued:
                    self._flush()  # a later event about a queued connection sees it installed
                if ev.type is EventType.DESTROY:
                    self.pending.pop(ident, None)
                    self.returning.discard(ident)
                    self.remove(ident, "destroyed", tell_conntrack=False)
                else:
                    self._consider(ev.conn, ident, queue=True)
            self._flush()
            if resync:
                self.resync()

    def consider(self, conn: Conn) -> bool:
        """Offload conn if it qualifies; take it off if it stopped qualifying. True if offloaded now."""
        return self._consider(conn, conn.ident, queue=False)

    def _consider(self, conn: Conn, ident: tuple, *, queue: bool) -> bool:
        why = self.refusal(conn)
        if ident in self.returning:  # waiting for its path: keep its latest state, or let it go
            if why is None:
                self.returning.update(ident, conn)
            else:
                self.returning.discard(ident)
        off = self.offloaded.get(ident)
        if off is not None:
            regroup = path_key(conn) != path_key(off.conn)  # a new mark: another group
            if regroup:
                self.groups.discard(ident, off)
            off.conn = conn  # the latest state: a hand-back reads it (Engine.handback_timeout)
            if regroup:
                self.groups.add(ident, off)
            if why is not None:
                self.remove(ident, why, tell_conntrack=True)
                return False
            return True
        if why is not None:
            self.pending.pop(ident, None)
            self.stats.count(self.stats.refused, why)
            return False
        if not queue:
            return self._offload(conn, ident)
        self._enqueue(conn, ident)
        return False

    def resync(self) -> None:
        """Reconcile with a full dump: offload what qualifies, drop what conntrack no longer has."""
        with _collector_paused(), self._pass():
            self._flush()  # what the events before a resync marker planned goes in first
            self.stats.resyncs += 1
            live = {}
            for conn in self.ct.dump():
                live[conn.ident] = conn
            for ident in list(self.offloaded):
                if ident not in live:
                    self.remove(ident, "gone_at_resync", tell_conntrack=False)
            for ident in list(self.pending):
                if ident not in live:
                    del self.pending[ident]
            self.returning.retain(live)
            self._consider_all(live)
            self._flush()
            self._release_leftovers(live)
            self.prune()

    def _consider_all(self, live: dict[tuple, Conn]) -> None:
        """_consider(conn, ident, queue=True) for each of a dump's connections, inside a pass:
        the same decisions and counts, with the common case (not offloaded, not waiting for
        its path, qualifying, its path already planned in this pass) queued here without the
        calls between."""
        offloaded, returning, pending = self.offloaded, self.returning, self.pending
        refusal, count, refused = self.refusal, self.stats.count, self.stats.refused
        memo = self.planner.memo
        waiting = bool(returning)  # nothing here adds to it: empty now, empty throughout
        for ident, conn in live.items():
            if ident in offloaded or (waiting and ident in returning) or memo is None:
                self._consider(conn, ident, queue=True)
                continue
            why = refusal(conn)
            if why is not None:
                pending.pop(ident, None)
                count(refused, why)
                continue
            path = memo.get((conn.family, conn.orig.src, conn.reply.src, conn.mark))  # resolve_key's
            if path is None or isinstance(path, Exception):
                self._enqueue(conn, ident)  # planned now, or refused (counted) for its path
                continue
            if pending:
                pending.pop(ident, None)
            queue = self._queue
            queue.append((ident, conn, path))
            self._queued.add(ident)
            if len(queue) >= BATCH:
                self._flush()

    def _release_leftovers(self, live: dict[tuple, Conn]) -> None:
        """Connections conntrack holds with the long offload timeout though nothing carries
        them now (left by a process that died without handing back, or after a hand-back
        that failed): back with their protocol's timeout, counted. Recognised by the offload
        mark, or without one by a timeout longer than conntrack would give them itself
        (for TCP without a mark that cannot be told: the kernel's own established timeout,
        five days, is longer than the offload's day)."""
        mark = self.ct.offload_mark
        timeouts = self.ct.timeouts()
        for ident, conn in live.items():
            full = timeouts.get(conn.proto)
            if not (mark and conn.mark & mark) and not (
                    full is not None and conn.timeout is not None and conn.timeout > full):
                continue
            if ident in self.offloaded or conn.status & IPS_DYING or (
                    conn.proto == socket.IPPROTO_TCP and conn.tcp_state != TCP_CONNTRACK_ESTABLISHED):
                continue  # ours, or conntrack set its timeout itself when its state moved on
            if self.ct.mark_offloaded(conn, False, timeout_s=full):
                self.stats.count(self.stats.removed, "released_at_resync")

    def prune(self) -> int:
        """Delete map entries no offloaded connection owns (left by a crashed or older
        process, or written by hand); returns how many. The map's keys are matched against
        the keep-alive slots (every connection on the XDP map) in C; the keys of the few
        flower flows are owned too."""
        stray = self.slots.unowned(self.flows.read_counters())
        if stray and self.rules.flows:
            hw = {kb for off in self.rules.flows.values() for kb in off.key_bytes}
            stray = [kb for kb in stray if kb not in hw]
        return self.map.delete_stray(stray)

    # ---- install ----------------------------------------------------------------------

    def _offload(self, conn: Conn, ident: tuple) -> bool:
        path = self._planned(conn, ident)
        if path is None or not self._claim(conn):
            return False
        return self._place_hw(ident, conn, path) or self._install(ident, conn, path)

    def _install(self, ident: tuple, conn: Conn, path: Path) -> bool:
        """conn's entries in the map (both or neither) and recorded; unmarked in conntrack if
        that failed."""
        keys, actions = entries_of(conn, path)
        if not self.map.install(keys, actions):
            self.ct.mark_offloaded(conn, False, timeout_s=self.handback_timeout(conn, "install_error", 0))
            return False
        self._adopt(ident, conn, path, (key_bytes(keys[0]), key_bytes(keys[1])), (keys, actions))
        return True

    def _claim(self, conn: Conn) -> bool:
        """Tell conntrack before the first entry or rule exists: the offload mark and, for
        TCP, be-liberal window tracking. From the first entry on conntrack stops seeing what
        the fast path carries, and a packet that still takes the kernel path meanwhile (the
        other direction while only one of two flower rules is in, a FIN, an over-MTU
        segment) would meet stale windows, be called INVALID and miss its NAT: a DNAT'd
        segment then reaches the router's own stack, which answers with a reset. The kernel
        flowtable sets be-liberal before adding a flow for the same reason. False (and
        counted) when the entry is already gone; a connection whose install then fails is
        unmarked again, and liberal stays, as after any offload."""
        if self.ct.mark_offloaded(conn, True, timeout_s=self.config.conntrack_timeout_s):
            return True
        self.stats.count(self.stats.refused, "gone")
        return False

    def _claim_all(self, conns: list[Conn]) -> list[bool]:
        """_claim for each of conns, in one sendmsg() when the adapter can batch
        (CtNetlink.mark_offloaded_many); the same answers and counts as one by one."""
        many = getattr(self.ct, "mark_offloaded_many", None)
        if many is None or len(conns) < 2:
            return [self._claim(conn) for conn in conns]
        claimed = many(conns, True, timeout_s=self.config.conntrack_timeout_s)
        for ok in claimed:
            if not ok:
                self.stats.count(self.stats.refused, "gone")
        return claimed

    def _planned(self, conn: Conn, ident: tuple) -> Path | None:
        """conn's path; None (and the reason kept) if it has none."""
        try:
            path = self.planner.resolve(conn)
        except NotYet:
            if ident not in self.pending:
                # counted once per wait: a connection that qualifies but waits for its next
                # hop (or for a lookup that failed, under load) is not offloaded yet, and the
                # count says why; it is retried at every tick and when the neighbour resolves
                self.stats.count(self.stats.refused, "neighbour_pending")
            self.pending[ident] = conn
            self.stats.pending = len(self.pending)
            return None
        except NoPath as exc:
            self.pending.pop(ident, None)
            # counted under its fixed code (a metric label); the text names addresses and
            # devices, so it goes to the debug log only
            self.stats.count(self.stats.refused, exc.code)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("not offloaded (%s): %s", exc.code, exc)
            return None
        if self.pending:
            self.pending.pop(ident, None)
        return path

    def _adopt(self, ident: tuple, conn: Conn, path: Path, kb: tuple[bytes, bytes],
               entries: tuple[Keys, Actions] | None, now: int | None = None) -> None:
        """Entries are in the map (and conntrack was told before, see _claim): record it."""
        if now is None:
            now = self.clock()
        off = Offloaded(conn, path, now, keys_raw=kb[0] + kb[1], _source=conn, _entries=entries)
        self.offloaded[ident] = off
        self.groups.add(ident, off)
        self.slots.take(off, last_seen_ns=now,
                        deadline_ns=keepalive.first_deadline(now, self.config.conntrack_timeout_s))
        self.stats.offloaded += 1

    def _adopt_many(self, batch: list[tuple[tuple, Conn, Path]], kbs: list[tuple[bytes, bytes]]) -> None:
        """_adopt for each of a batch written together (kbs: each one's two keys), at one
        time: the same records, groups and slots."""
        now = self.clock()  # one time (one int object) for the whole batch
        offloaded = self.offloaded
        members = []
        for (ident, conn, path), kb in zip(batch, kbs, strict=True):
            off = Offloaded(conn, path, now, keys_raw=kb[0] + kb[1], _source=conn)
            offloaded[ident] = off
            members.append((ident, off))
        self.groups.add_many(members)
        self.slots.take_many([off for _ident, off in members], last_seen_ns=now,
                             deadline_ns=keepalive.first_deadline(now, self.config.conntrack_timeout_s))
        self.stats.offloaded += len(members)

    def _place_hw(self, ident: tuple, conn: Conn, path: Path) -> bool:
        """conn as flower rules if both its ingress devices are hardware devices and the
        hardware takes them; False: the caller puts it on the XDP path."""
        off = self.rules.place(ident, conn, path)
        if off is None:
            return False
        off.ct_deadline_ns = keepalive.first_deadline(off.since_ns, self.config.conntrack_timeout_s)
        self.offloaded[ident] = off
        self.groups.add(ident, off)
        self.stats.offloaded += 1
        return True

    # ---- passes: one map write for many connections -----------------------------------

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """One round of work (a poll's events, a resync, a retry, a path change). Path results
        are shared within it (nothing the kernel says changes between two connections of the
        same round: a change is another round) and queued installs are written at its end."""
        planner = self.planner
        if planner.memo is not None:
            yield  # nested (a resync marker among events): the outer pass owns both
            return
        planner.memo = {}
        try:
            yield
            self._flush()
        except BaseException:
            # what was planned before the failure goes in, as it did one by one
            with contextlib.suppress(Exception):
                self._flush()
            raise
        finally:
            planner.memo = None
            self._queue, self._queued = [], set()

    def _enqueue(self, conn: Conn, ident: tuple) -> None:
        path = self._planned(conn, ident)
        if path is None:
            return
        self._queue.append((ident, conn, path))
        self._queued.add(ident)
        if len(self._queue) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        """Mark the queued connections in conntrack (_claim), then write their entries in one
        insert and record each.
        A batch is not atomic and stops at its first failure: then every entry of the batch
        is deleted and the connections go in one by one, each both directions or neither."""
        batch = self._queue
        if not batch:
            return
        self._queue, self._queued = [], set()
        claimed = self._claim_all([item[1] for item in batch])
        batch = [item for item, ok in zip(batch, claimed, strict=True) if ok]
        if self.rules.hw is not None:
            batch = [item for item in batch if not self._place_hw(*item)]
        if len(batch) > 1:
            keys, values, kbs = self._entry_bytes(batch)
            if self.map.insert_many(keys, values, kbs, "install"):
                self._adopt_many(batch, kbs)
                return
        for ident, conn, path in batch:
            self._install(ident, conn, path)

    @staticmethod
    def _entry_bytes(batch: list[tuple[tuple, Conn, Path]]) -> tuple[list[bytes], list[bytes],
                                                                     list[tuple[bytes, bytes]]]:
        """Keys and values of the queued connections: (keys, values, each connection's two
        keys). Packed in C from per-path templates (pack_conns); by the Python packer, from
        the connections' fields, when C refuses the batch (it then raises what it always did)."""
        packed = pack_conns([item[1] for item in batch], [item[2] for item in batch])
        if packed is not None:
            return packed
        return pack_entries(entry_fields(conn, path) for _i, conn, path in batch)

    # ---- planning ---------------------------------------------------------------------

    def plan(self, conn: Conn) -> tuple[tuple[FlowKey, FlowKey], tuple[FlowAction, FlowAction]]:
        """The two flow entries for conn. Raises NotYet (neighbour unresolved) or NoPath.

        Original direction: arrives A:a -> B:b, leaves A':a' -> B':b' (reply tuple reversed).
        Reply direction: arrives B':b' -> A':a', leaves B:b -> A:a.
        The kernel routes a forwarded packet after DNAT and before SNAT, so the original
        direction is routed to B' from A, the reply to A from B'.
        """
        return entries_of(conn, self.planner.resolve(conn))

    # ---- removal ----------------------------------------------------------------------

    def remove(self, ident: tuple, cause: str, *, tell_conntrack: bool) -> None:
        """Take ident off the fast path (its entries or rules), counted under cause."""
        off = self.offloaded.pop(ident, None)
        if off is None:
            return
        self.groups.discard(ident, off)
        timeout = self.handback_timeout(off.conn, cause, self.idle_ns(off)) if tell_conntrack else None
        if off.hw:
            self.rules.forget(ident, off)
        else:
            self.slots.drop(off)
            self.map.delete(off.key_bytes)
        if tell_conntrack:
            self.ct.mark_offloaded(off.conn, False, timeout_s=timeout)
        self.stats.count(self.stats.removed, cause)

    def handback_timeout(self, conn: Conn, cause: str, idle_ns: int) -> int | None:
        """The conntrack timeout a connection goes back to the kernel path with: its protocol's
        own (TCP established, UDP stream: the namespace's sysctls) instead of the long one it
        held while offloaded, less the time it was already idle (as the kernel flowtable's
        teardown does). None (leave it) when conntrack set it itself: a FIN/RST went through
        the kernel, or an event showed the state move on."""
        if cause == "fin_rst" or conn.status & IPS_DYING or (
                conn.proto == socket.IPPROTO_TCP and conn.tcp_state != TCP_CONNTRACK_ESTABLISHED):
            return None
        full = self.ct.timeouts().get(conn.proto)
        if full is None:
            return None
        return max(1, full - idle_ns // 1_000_000_000)

    def last_seen_ns(self, off: Offloaded) -> int:
        """When off last moved packets, as the last keep-alive walk found (a flow on the
        map: the first walk that saw its count move; flower rules: their own last use)."""
        return off.last_seen_ns if off.hw or off.slot < 0 else self.slots.activity(off)[1]

    def idle_ns(self, off: Offloaded) -> int:
        """How long off has seen no packet, as of the last tick."""
        return max(0, self.clock() - self.last_seen_ns(off))

    def held(self, off: Offloaded, deadline_ns: int) -> None:
        """Conntrack's timeout for off was written again: it runs out at deadline_ns."""
        if off.hw:
            off.ct_deadline_ns = deadline_ns
        else:
            self.slots.held(off, deadline_ns)

    def flush(self) -> None:
        """Hand every connection back to the kernel path."""
        for ident in list(self.offloaded):
            self.remove(ident, "flushed", tell_conntrack=True)
        self.pending.clear()
        self.returning.clear()

    # ---- keep-alive, expiry, FIN/RST --------------------------------------------------

    def tick(self, counters: Counters | None = None, *, walk: bool = True,
             read_cpu_s: float = 0.0) -> None:
        """One keep-alive round (keepalive.tick): one batched counter read for the whole
        table, matched against every connection in C; only the connections that need
        something done come back: entry missing, FIN/RST, packets moved (refresh), idle.
        ``counters``, ``walk``, ``read_cpu_s``: a map read made in another thread
        (keepalive.tick)."""
        keepalive.tick(self, counters, walk=walk, read_cpu_s=read_cpu_s)
        self.returning.expire(self.clock())
        self.fdb.tick(self)

    def scan(self, n: int) -> bool:
        """The next n connections of a walk under way scanned (keepalive.scan_some: a walk
        whose map read was made in another thread, scanned in parts between loop turns);
        True when it is done."""
        return keepalive.scan_some(self, n)

    # ---- path changes -----------------------------------------------------------------

    def retry_pending(self) -> None:
        with self._pass():
            for ident, conn in list(self.pending.items()):
                self._enqueue(conn, ident)
        self.stats.pending = len(self.pending)

    def paths_changed(self) -> None:
        """Re-resolve the offloaded connections: rewrite changed paths, remove dead ones.

        Called on any route, neighbour or link change; the counters restart at zero
        for a rewritten entry, so keep-alive treats it as new. One resolution per group of
        connections with the same path key (pathgroups.py): a group whose answer is the path
        object all its members were written from is left alone whole, without looking at
        its members (most groups, most changes). Otherwise each member is compared: one
        whose entries come out the same is left alone without rebuilding them, the others
        are rewritten, and the rewrites of one pass go to the map together.
        """
        with self._pass():
            changed: list[tuple[tuple, Offloaded, Fields, Path]] = []
            looked_at: list[tuple[Group, Path]] = []
            for key, group in list(self.groups.groups.items()):
                members = group.members
                if not members:
                    continue
                try:
                    path = self.planner.resolve_key(key)
                except (NotYet, NoPath):
                    for ident in list(members):
                        self._path_lost(ident)  # waits in self.returning for its path
                    continue
                if path is group.path:
                    continue
                looked_at.append((group, path))
                for ident, off in list(members.items()):
                    if path == off.path:
                        off.path = path  # the same path: the interned object from now on
                        continue
                    conn = off.conn
                    fields = entry_fields(conn, path)
                    # the entries' constructor arguments, old and new: equal arguments, equal entries
                    if fields == off.source_fields():
                        off.path = path
                        continue
                    if off.hw:
                        if not self.rules.replace(ident, off, path, self.map, self.slots):
                            self._path_lost(ident)
                        continue
                    changed.append((ident, off, fields, path))
                    if len(changed) >= BATCH:
                        self.map.rewrite(changed, self.slots, self._path_lost)
                        changed = []
            self.map.rewrite(changed, self.slots, self._path_lost)
            for group, path in looked_at:  # each member now written from path, or gone
                group.path = path if all(off.path is path for off in group.members.values()) else None
            self._retry_returning()
            self.retry_pending()

    def shaping_changed(self, ifindexes: Iterable[int]) -> None:
        """The devices that shape (pyflow.daemon.shaping: a rate-limiting egress qdisc or an
        ingress redirected to an IFB), any device of the namespace. A connection whose path
        goes through one of them above the device the datapath redirects to is refused
        (shaped_upper); offloaded ones are re-planned so that those leave the fast path when
        a shaper appears, and a full dump brings back the refused ones when one goes."""
        shaped = frozenset(ifindexes)
        planner = self.planner
        old = planner.shaped
        if shaped == old:
            return
        planner.shaped = shaped
        if planner.memo is not None:
            planner.memo.clear()  # answers of this pass were planned with the old set
        self.paths_changed()
        if old - shaped:
            self.resync()

    def _path_lost(self, ident: tuple) -> None:
        """Take ident off for a path change; it waits in self.returning for its path."""
        off = self.offloaded.get(ident)
        self.remove(ident, "path_lost", tell_conntrack=True)
        if off is not None:
            self.returning.add(ident, off.conn, self.clock())

    def _retry_returning(self) -> None:
        """Offload again the waiting connections whose path resolves now: one resolution per
        group of connections with the same path key, so a change costs O(groups), never a
        conntrack dump. Inside a pass (paths_changed)."""
        ret = self.returning
        ret.expire(self.clock())
        if not ret:
            return
        back: list[tuple] = []
        for key, group in list(ret.groups.items()):
            try:
                self.planner.resolve(next(iter(group.values())))
            except (NotYet, NoPath):
                continue  # still no path: the group waits for the next change
            for ident, conn in ret.take(key):
                if ident in self.offloaded or ident in self._queued:
                    continue  # a conntrack event brought it back already
                back.append(ident)
                self._enqueue(conn, ident)
        self._flush()
        self.stats.reoffloaded += sum(1 for ident in back if ident in self.offloaded)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's garbage collector off for a resync. A resync makes several objects per
    connection (its Conn and tuples from the dump, its record, its keys), all of which it
    keeps; on the way the collector would run its full collection several times, each
    walking every object the process holds (at 100,000 connections most of a second in
    all) to free nothing. The control loop freezes what survives at its next tick
    (runner._GcPacer)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Planner:
    """A connection's path: devices and egress of both directions, from the path resolver
    and the device registry. The path is a function of (family, A, B', mark) only, so within
    a pass (``memo`` set, by the engine) every connection between the same two hosts shares
    one answer (nothing the kernel says changes between two connections of the same pass: a
    change is another pass).

    Each direction's route is looked up with the device its source lives behind as iif (the
    device conntrack and routing see: eth0.7, pppoe-wan, br-lan). The resolver's answer
    lists the layers from the route's device down to the real port; the planner takes,
    going down, the first one whose device is managed (where the datapath runs) and the
    encapsulation below it: the egress redirects there with those headers written, and the
    other direction's key holds that device, those VLAN ids and that PPPoE session (traffic
    from a host arrives where traffic to it leaves). An unmanaged bridge on the way goes on
    to the port its FDB names (PathResolver.below_bridge); a managed bridge is the egress
    itself."""

    def __init__(self, paths: PathResolver, devices: Devices):
        self.paths = paths
        self.devices = devices
        self.memo: dict[tuple, Path | Exception] | None = None  # by (family, orig src, reply src, mark)
        # ifindexes of the devices that shape (Engine.shaping_changed): a path with one of them
        # above its managed layer is refused, since the redirect below would skip its qdisc
        self.shaped: frozenset[int] = frozenset()
        # one object per distinct path, across passes, so that "same path as before" is
        # mostly an identity check (Egress and ManagedDevice compare field by field in Python)
        self._interned: dict[Path, Path] = {}

    def resolve(self, conn: Conn) -> Path:
        """Raises NotYet (neighbour unresolved) or NoPath."""
        return self.resolve_key((conn.family, conn.orig.src, conn.reply.src, conn.mark))

    def resolve_key(self, mkey: tuple) -> Path:
        """The path of the connections with this key (returning.path_key); raises as resolve."""
        memo = self.memo
        if memo is None:
            return self._ask(*mkey)
        hit = memo.get(mkey)
        if hit is None:
            try:
                hit = self._intern(self._ask(*mkey))
            except (NotYet, NoPath) as exc:
                hit = exc.with_traceback(None)  # kept: no frame (which holds it) in a cycle with it
            memo[mkey] = hit
        if isinstance(hit, Exception):
            raise type(hit)(*hit.args)
        return hit

    def _intern(self, path: Path) -> Path:
        paths = self._interned
        if len(paths) > 4096:
            paths.clear()  # forgetting only costs a field-by-field compare later
        return paths.setdefault(path, path)

    def _ask(self, family: int, a: str, b: str, mark: int) -> Path:
        at_a = self.paths.device_of(family, a, mark=mark)  # the L3 device A lives behind
        at_b = self.paths.device_of(family, b, mark=mark)
        eg_o, out_o = self._down(self.paths.egress(family, a, b, iif=at_a, mark=mark), at_b)
        eg_r, out_r = self._down(self.paths.egress(family, b, a, iif=at_b, mark=mark), at_a)
        # the original direction arrives where the reply leaves, and the other way round
        return out_r, out_o, eg_o, eg_r, out_o, out_r

    def _down(self, eg: Egress, lives_at: int) -> tuple[Egress, ManagedDevice]:
        """The Egress at the first managed layer of eg, going down, and that device.

        ``lives_at``: the device a route to eg's destination leaves through (device_of). When
        it is eg's route device, no managed layer means that the destination's own traffic
        arrives where pyflow does not run (ingress_not_managed); when policy routing sends
        this direction elsewhere, egress_not_managed."""
        layers = eg.layers
        if not layers:  # a path of one device
            dev = self.devices.get(eg.ifindex)
            if dev is None:
                raise self._not_managed(eg, eg.ifindex == lives_at)
            return eg, dev
        i = 0
        while i < len(layers):
            layer = layers[i]
            dev = self.devices.get(layer.ifindex)
            if dev is not None:
                if self.shaped and i:
                    self._check_unshaped(layers, i)
                return egress_at(eg, layer), dev
            if layer.bridge and i == len(layers) - 1:
                # an unmanaged bridge: on to the port where the next hop's MAC is learned
                layers = layers + self.paths.below_bridge(layer, eg.dmac)
            i += 1
        raise self._not_managed(eg, layers[0].ifindex == lives_at)

    def _check_unshaped(self, layers: tuple[Layer, ...], below: int) -> None:
        """NoPath (shaped_upper) when a layer above layers[below] (the managed one) shapes."""
        shaped = self.shaped
        for layer in layers[:below]:
            if layer.ifindex in shaped:
                raise NoPath(f"{layer.ifname} shapes its traffic, above the managed "
                             f"{layers[below].ifname}: a redirect there would skip it", SHAPED_UPPER)

    @staticmethod
    def _not_managed(eg: Egress, symmetric: bool) -> NoPath:
        names = ", ".join(layer.ifname for layer in eg.layers) or eg.ifname
        if symmetric:
            return NoPath(f"no device of the path {names} is managed", INGRESS_NOT_MANAGED)
        return NoPath(f"no device of the egress path {names} is managed", EGRESS_NOT_MANAGED)
