"""The offload engine: what the fast path carries, decided from conntrack.

Kernel conntrack is the single source of truth. The engine

- offloads a connection when it qualifies (see ``refusal``), installing both
  directions together or neither, with NAT copied from the conntrack tuple pair;
- keeps conntrack alive while the fast path carries the connection (conntrack
  never sees those packets) and marks it offloaded there;
- takes a connection off the fast path when conntrack destroys it, when the
  datapath saw FIN/RST, when it has been idle for ``idle_timeout_s``, or when its
  path can no longer be resolved; a changed path is written in place.

Adapters come in as parameters (model.Conntrack, model.PathResolver, a flow map
with FlowTable's insert/delete/read_counters, and a device registry), so every
decision here is testable with fakes and without root. The engine is not
thread-safe: one loop drives it (events, path changes, ticks).

Where the time goes (tests/bench/bench_control.py measures it): work comes in
passes (a poll's events, a resync, a path change) that share path lookups and write
their installs with one map call per BATCH connections; against the real flow
table those entries are packed straight to bytes; the keep-alive tick matches the
counter dump against every connection in C (csrc/keepalive.c). Each of these has a
plain-Python twin used with fake maps, and unit tests hold the two to the same
result.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyflow._native import ffi, lib
from pyflow.control.model import (
    IPS_DYING,
    IPS_SEEN_REPLY,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    Conntrack,
    CtEvent,
    Egress,
    EventType,
    HwRefused,
    NoPath,
    NotYet,
    PathResolver,
)
from pyflow.datapath.abi import KEY_SIZE, FlowAction, FlowKey, datapath_clock_ns, entry_bytes, key_bytes
from pyflow.datapath.flowtable import Counters
from pyflow.errors import MapError

log = logging.getLogger(__name__)

BATCH = 256
"""Connections per map write in a pass (resync, a poll's events, retries, path changes): one
bpf() call for many instead of one per connection, while the first of a burst waits for at
most this many others to be planned (about a millisecond)."""

_Path = tuple[Any, ...]  # (ingress orig, ingress reply, Egress orig, Egress reply, egress orig, egress reply)
_Keys = tuple[FlowKey, FlowKey]
_Actions = tuple[FlowAction, FlowAction]
_Fields = tuple[tuple, tuple, tuple, tuple]  # FlowKey, FlowKey, FlowAction, FlowAction arguments


@dataclass(frozen=True)
class EngineConfig:
    idle_timeout_s: float = 30.0  # as the kernel flowtable: idle flows go back to the slow path
    conntrack_timeout_s: int = 120  # timeout written to conntrack while the fast path carries a flow
    exclude_mark_mask: int = 0  # conntrack mark bits that opt a connection out (SQM, shaping, DSCP)


@dataclass(frozen=True)
class ManagedDevice:
    ifindex: int
    tx_port: int  # slot in the XDP devmap
    mac: bytes


class Devices(Protocol):
    def get(self, ifindex: int) -> ManagedDevice | None: ...


class FlowMap(Protocol):
    def insert(self, items: Any, *, mode: str = "any") -> int: ...

    def delete(self, keys: Any, *, missing_ok: bool = True) -> list[int]: ...

    def read_counters(self) -> Any: ...


class HwStats(Protocol):
    @property
    def packets(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def idle_ns(self) -> int:
        """Since the rule last matched."""
        ...


class HwPlacer(Protocol):
    """Flower rules on NICs that run them (pyflow.hw.offload.FlowerOffload)."""

    def capable(self, ifindex: int) -> bool:
        """The device is a hardware device: flows arriving there are offered to place()."""
        ...

    def place(self, keys: tuple[FlowKey, FlowKey], actions: tuple[FlowAction, FlowAction]) -> tuple:
        """Both directions as rules, or neither: the rules' ids, or HwRefused."""
        ...

    def remove(self, ids: tuple) -> None: ...

    def stats(self) -> Mapping[Any, HwStats]:
        """Counters of the placed rules by id (one dump); a rule that is gone is absent."""
        ...


@dataclass(eq=False)
class Offloaded:
    """A connection on the fast path. Its two entries (original direction, reply direction)
    are a function of the connection and its path (_fields). Bulk installs write them
    as bytes without building FlowKey/FlowAction objects; ``keys`` and ``actions`` are then
    built from the connection and path they were written from whenever asked for."""

    conn: Conn
    path: _Path  # what the entries were built from: a path change that leaves it equal changes nothing
    since_ns: int
    packets: int = 0  # both directions, at the last tick
    last_seen_ns: int = 0
    key_bytes: tuple[bytes, bytes] = field(default=(b"", b""), repr=False)  # as in the map
    slot: int = field(default=-1, repr=False)  # in the engine's keep-alive slots
    _source: Conn | None = field(default=None, repr=False)  # the conn the entries were built from
    _entries: tuple[_Keys, _Actions] | None = field(default=None, repr=False)  # when built already
    hw: bool = False  # both directions are flower rules (hardware, or software flower in a lab)
    hw_rules: tuple = field(default=(), repr=False)  # the adapter's ids of those rules
    hw_counters: tuple = field(default=(), repr=False)  # ((packets, bytes) orig, reply) at the last tick

    @property
    def keys(self) -> _Keys:
        return self.entries()[0]

    @property
    def actions(self) -> _Actions:
        return self.entries()[1]

    def entries(self) -> tuple[_Keys, _Actions]:
        """(keys, actions): the FlowKey/FlowAction objects of both entries."""
        if self._entries is not None:
            return self._entries
        return _build(self._source if self._source is not None else self.conn, self.path)

    def _written(self, source: Conn, path: _Path, kb: tuple[bytes, bytes],
                 entries: tuple[_Keys, _Actions] | None) -> None:
        self._source, self.path, self.key_bytes, self._entries = source, path, kb, entries


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

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


_Verdicts = list[tuple[tuple, Offloaded, int]]  # (ident, record, PYFLOW_KA_*) from a keep-alive scan


class _Slots:
    """Keep-alive state of every offloaded connection in C arrays, for csrc/keepalive.c:
    its two keys, and the packet count and last-seen time of its Offloaded record (which
    stays the engine's truth: every change to those is written here too)."""

    def __init__(self, cap: int = 256):
        self.cap = 0
        self.top = 0  # slots [0, top) have been handed out at least once
        self.free: list[int] = []
        self.owner: list[tuple | None] = []
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

    def take(self, ident: tuple, off: Offloaded) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.top == self.cap:
                self._grow(self.cap * 2)
            slot = self.top
            self.top += 1
        self.owner[slot] = ident
        self.conns[slot].used = 1
        self.write(slot, off)
        return slot

    def write(self, slot: int, off: Offloaded) -> None:
        ko, kr = off.key_bytes
        ffi.memmove(self.keys + slot * 2 * KEY_SIZE, ko + kr, 2 * KEY_SIZE)
        c = self.conns[slot]
        c.packets, c.last_seen_ns = off.packets, off.last_seen_ns

    def drop(self, slot: int) -> None:
        self.conns[slot].used = 0
        self.owner[slot] = None
        self.free.append(slot)


class Engine:
    def __init__(self, conntrack: Conntrack, paths: PathResolver, flows: FlowMap, devices: Devices,
                 config: EngineConfig | None = None, *, clock: Callable[[], int] = datapath_clock_ns,
                 hw: HwPlacer | None = None):
        self.ct = conntrack
        self.hw = hw  # None: every flow goes to the XDP map
        self.hw_flows: dict[tuple, Offloaded] = {}  # the offloaded connections that are flower rules
        self.paths = paths
        self.flows = flows
        self.devices = devices
        self.config = config or EngineConfig()
        self.clock = clock  # must be the datapath's clock: last_seen_ns is compared with it
        self.offloaded: dict[tuple, Offloaded] = {}
        self.pending: dict[tuple, Conn] = {}
        self.stats = EngineStats()
        # Within one pass: connections planned but not yet written (written together by
        # _flush), and path results by (family, orig src, reply src, mark).
        self._queue: list[tuple[tuple, Conn, _Path]] = []
        self._queued: set[tuple] = set()
        self._memo: dict[tuple, _Path | Exception] | None = None
        # one object per distinct path, across passes, so that "same path as before" is
        # mostly an identity check (Egress and ManagedDevice compare field by field in Python)
        self._paths: dict[_Path, _Path] = {}
        self._slots = _Slots()
        # The real flow table takes whole structs as bytes: bulk installs pack straight from the
        # connection and path (abi.entry_bytes), without FlowKey/FlowAction objects. A map that
        # does not (the unit tests' fakes) gets the objects.
        self._raw = getattr(flows, "RAW_INSERT", False) is True

    # ---- policy -----------------------------------------------------------------------

    def refusal(self, conn: Conn) -> str | None:
        """Why conn may not be offloaded, or None. Device checks happen at resolution."""
        if conn.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            return "protocol"
        if conn.status & IPS_DYING:
            return "dying"
        if not conn.status & IPS_SEEN_REPLY:
            return "no_reply_yet"
        if conn.proto == socket.IPPROTO_TCP and conn.tcp_state != TCP_CONNTRACK_ESTABLISHED:
            return "tcp_not_established"
        if conn.helper:
            return "helper"  # ftp, sip ...: the helper must see every packet
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
                    self._remove(ident, "destroyed", tell_conntrack=False)
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
        if ident in self.offloaded:
            if why is not None:
                self._remove(ident, why, tell_conntrack=True)
                return False
            self.offloaded[ident].conn = conn
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
        with self._pass():
            self._flush()  # what the events before a resync marker planned goes in first
            self.stats.resyncs += 1
            live = {}
            for conn in self.ct.dump():
                live[conn.ident] = conn
            for ident in list(self.offloaded):
                if ident not in live:
                    self._remove(ident, "gone_at_resync", tell_conntrack=False)
            for ident in list(self.pending):
                if ident not in live:
                    del self.pending[ident]
            for ident, conn in live.items():
                self._consider(conn, ident, queue=True)
            self._flush()
            self.prune()

    def prune(self) -> int:
        """Delete map entries no offloaded connection owns (left by a crashed or older
        process, or written by hand); returns how many."""
        owned = {kb for off in self.offloaded.values() for kb in off.key_bytes}
        counters = self.flows.read_counters()
        # the keys alone when the table gives arrays: no counters decoded, no dict built
        present = counters.key_bytes() if isinstance(counters, Counters) else counters.as_dict()
        stray = list(dict.fromkeys(kb for kb in present if kb not in owned))  # a walk may repeat a key
        if stray:
            self.flows.delete(stray, missing_ok=True)
            self.stats.removed["stray_entry"] = self.stats.removed.get("stray_entry", 0) + len(stray)
        return len(stray)

    # ---- install ----------------------------------------------------------------------

    def _offload(self, conn: Conn, ident: tuple) -> bool:
        path = self._planned(conn, ident)
        if path is None or not self._claim(conn):
            return False
        if self.hw is not None and self._place_hw(ident, conn, path):
            return True
        keys, actions = _build(conn, path)
        if not self._install(keys, actions):
            self.ct.mark_offloaded(conn, False)
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
        if self.ct.mark_offloaded(conn, True):
            return True
        self.stats.count(self.stats.refused, "gone")
        return False

    def _planned(self, conn: Conn, ident: tuple) -> _Path | None:
        """conn's path; None (and the reason kept) if it has none."""
        try:
            path = self._resolve(conn)
        except NotYet:
            self.pending[ident] = conn
            self.stats.pending = len(self.pending)
            return None
        except NoPath as exc:
            self.pending.pop(ident, None)
            self.stats.count(self.stats.refused, str(exc) or "no_path")
            return None
        if self.pending:
            self.pending.pop(ident, None)
        return path

    def _adopt(self, ident: tuple, conn: Conn, path: _Path, kb: tuple[bytes, bytes],
               entries: tuple[_Keys, _Actions] | None) -> None:
        """Entries are in the map (and conntrack was told before, see _claim): record it."""
        now = self.clock()
        off = Offloaded(conn, path, now, last_seen_ns=now, key_bytes=kb, _source=conn, _entries=entries)
        self.offloaded[ident] = off
        off.slot = self._slots.take(ident, off)
        self.stats.offloaded += 1

    # ---- hardware placement -----------------------------------------------------------

    def _place_hw(self, ident: tuple, conn: Conn, path: _Path) -> bool:
        """Place conn as flower rules when both ingress devices are hardware devices. A
        refusal is counted and returns False: the caller puts the flow on the XDP path."""
        hw = self.hw
        assert hw is not None
        if not (hw.capable(path[0].ifindex) and hw.capable(path[1].ifindex)):
            return False
        keys, actions = _build(conn, path)
        try:
            ids = hw.place(keys, actions)
        except HwRefused as exc:
            self.stats.hw_failures += 1
            self.stats.count(self.stats.hw_refused, exc.reason)
            log.debug("hardware refused %s, XDP path instead: %s", conn.orig, exc)
            return False
        now = self.clock()
        off = Offloaded(conn, path, now, last_seen_ns=now, key_bytes=(key_bytes(keys[0]), key_bytes(keys[1])),
                        _source=conn, _entries=(keys, actions), hw=True, hw_rules=ids)
        self.offloaded[ident] = off
        self.hw_flows[ident] = off
        self.stats.offloaded += 1
        self.stats.hw_offloaded += 1
        return True

    def _replace_hw(self, ident: tuple, off: Offloaded, path: _Path) -> None:
        """A hardware flow's path changed: new rules, or the XDP path if they are refused."""
        assert self.hw is not None
        self.hw.remove(off.hw_rules)
        off.hw_rules = ()
        keys, actions = _build(off.conn, path)
        kb = (key_bytes(keys[0]), key_bytes(keys[1]))
        ids = None
        if self.hw.capable(path[0].ifindex) and self.hw.capable(path[1].ifindex):
            try:
                ids = self.hw.place(keys, actions)
            except HwRefused as exc:
                self.stats.hw_failures += 1
                self.stats.count(self.stats.hw_refused, exc.reason)
        if ids is not None:
            off.hw_rules = ids
        elif self._install(keys, actions):
            off.hw = False
            del self.hw_flows[ident]
            off._written(off.conn, path, kb, (keys, actions))
            off.packets = 0
            off.slot = self._slots.take(ident, off)
            self.stats.rewritten += 1
            return
        else:
            self._remove(ident, "path_lost", tell_conntrack=True)
            return
        off._written(off.conn, path, kb, (keys, actions))
        off.packets = 0
        self.stats.rewritten += 1

    def _scan_hw(self, now: int, idle_ns: int) -> _Verdicts:
        """Keep-alive verdicts of the hardware flows, from one read of the rules' counters."""
        assert self.hw is not None
        stats = self.hw.stats()
        out: _Verdicts = []
        for ident, off in self.hw_flows.items():
            so, sr = stats.get(off.hw_rules[0]), stats.get(off.hw_rules[1])
            if so is None or sr is None:
                out.append((ident, off, lib.PYFLOW_KA_MISSING))
                continue
            off.hw_counters = ((so.packets, so.bytes), (sr.packets, sr.bytes))
            if (packets := so.packets + sr.packets) != off.packets:
                off.packets = packets
                off.last_seen_ns = max(off.last_seen_ns, now - min(so.idle_ns, sr.idle_ns))
                out.append((ident, off, lib.PYFLOW_KA_MOVED))
            elif now - off.last_seen_ns > idle_ns:
                out.append((ident, off, lib.PYFLOW_KA_IDLE))
        return out

    def _install(self, keys: tuple[FlowKey, FlowKey], actions: tuple[FlowAction, FlowAction],
                 mode: str = "any") -> bool:
        """Both directions in one batch, or neither."""
        try:
            self.flows.insert(list(zip(keys, actions, strict=True)), mode=mode)
            return True
        except MapError as exc:
            self.stats.install_errors += 1
            log.warning("flow install failed: %s", exc)
            self.flows.delete(list(keys), missing_ok=True)
            return False

    # ---- passes: one map write for many connections -----------------------------------

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """One round of work (a poll's events, a resync, a retry, a path change). Path results
        are shared within it (nothing the kernel says changes between two connections of the
        same round: a change is another round) and queued installs are written at its end."""
        if self._memo is not None:
            yield  # nested (a resync marker among events): the outer pass owns both
            return
        self._memo = {}
        try:
            yield
            self._flush()
        except BaseException:
            # what was planned before the failure goes in, as it did one by one
            with contextlib.suppress(Exception):
                self._flush()
            raise
        finally:
            self._memo = None
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
        batch = [item for item in batch if self._claim(item[1])]
        if self.hw is not None:
            batch = [item for item in batch if not self._place_hw(*item)]
        if len(batch) > 1:
            built: list[tuple[_Keys, _Actions]] | None = None
            if self._raw:
                keys, values, kbs = self._entry_bytes(batch)
                items: Any = (b"".join(keys), b"".join(values))
            else:
                built = [_build(conn, path) for _i, conn, path in batch]
                kbs = [(key_bytes(k[0]), key_bytes(k[1])) for k, _a in built]
                items = [pair for k, a in built for pair in zip(k, a, strict=True)]
            try:
                self.flows.insert(items)
            except MapError as exc:
                log.debug("batched install of %d connections failed, one by one now: %s", len(batch), exc)
                self.flows.delete([kb for pair in kbs for kb in pair], missing_ok=True)
            else:
                for n, (ident, conn, path) in enumerate(batch):
                    self._adopt(ident, conn, path, kbs[n], built[n] if built is not None else None)
                return
        for ident, conn, path in batch:
            flow_keys, actions = _build(conn, path)
            if self._install(flow_keys, actions):
                kb = (key_bytes(flow_keys[0]), key_bytes(flow_keys[1]))
                self._adopt(ident, conn, path, kb, (flow_keys, actions))
            else:
                self.ct.mark_offloaded(conn, False)

    @staticmethod
    def _entry_bytes(batch: list[tuple[tuple, Conn, _Path]]) -> tuple[list[bytes], list[bytes],
                                                                      list[tuple[bytes, bytes]]]:
        """Keys and values of the queued connections, packed from their fields: (keys, values,
        each connection's two keys)."""
        keys: list[bytes] = []
        values: list[bytes] = []
        kbs = []
        for _i, conn, path in batch:
            kf_o, kf_r, af_o, af_r = _fields(conn, path)
            ko, vo = entry_bytes(kf_o, af_o)
            kr, vr = entry_bytes(kf_r, af_r)
            keys += (ko, kr)
            values += (vo, vr)
            kbs.append((ko, kr))
        return keys, values, kbs

    # ---- planning ---------------------------------------------------------------------

    def plan(self, conn: Conn) -> tuple[tuple[FlowKey, FlowKey], tuple[FlowAction, FlowAction]]:
        """The two flow entries for conn. Raises NotYet (neighbour unresolved) or NoPath.

        Original direction: arrives A:a -> B:b, leaves A':a' -> B':b' (reply tuple reversed).
        Reply direction: arrives B':b' -> A':a', leaves B:b -> A:a.
        The kernel routes a forwarded packet after DNAT and before SNAT, so the original
        direction is routed to B' from A, the reply to A from B'.
        """
        return _build(conn, self._resolve(conn))

    def _resolve(self, conn: Conn) -> _Path:
        """Devices and egress of both directions: a function of (family, A, B', mark) only,
        so within a pass every connection between the same two hosts shares one answer."""
        memo = self._memo
        if memo is None:
            return self._ask_paths(conn.family, conn.orig.src, conn.reply.src, conn.mark)
        mkey = (conn.family, conn.orig.src, conn.reply.src, conn.mark)
        hit = memo.get(mkey)
        if hit is None:
            try:
                hit = self._intern(self._ask_paths(*mkey))
            except (NotYet, NoPath) as exc:
                hit = exc.with_traceback(None)  # kept: no frame (which holds it) in a cycle with it
            memo[mkey] = hit
        if isinstance(hit, Exception):
            raise type(hit)(*hit.args)
        return hit

    def _intern(self, path: _Path) -> _Path:
        paths = self._paths
        if len(paths) > 4096:
            paths.clear()  # forgetting only costs a field-by-field compare later
        return paths.setdefault(path, path)

    def _ask_paths(self, family: int, a: str, b: str, mark: int) -> _Path:
        in_o = self._managed(self.paths.device_of(family, a, mark=mark), "ingress")
        in_r = self._managed(self.paths.device_of(family, b, mark=mark), "ingress")
        eg_o = self.paths.egress(family, a, b, iif=in_o.ifindex, mark=mark)
        eg_r = self.paths.egress(family, b, a, iif=in_r.ifindex, mark=mark)
        out_o = self._managed(eg_o.ifindex, "egress")
        out_r = self._managed(eg_r.ifindex, "egress")
        return in_o, in_r, eg_o, eg_r, out_o, out_r

    def _managed(self, ifindex: int, role: str) -> ManagedDevice:
        dev = self.devices.get(ifindex)
        if dev is None:
            raise NoPath(f"{role}_not_managed")
        return dev

    # ---- removal ----------------------------------------------------------------------

    def _remove(self, ident: tuple, cause: str, *, tell_conntrack: bool) -> None:
        off = self.offloaded.pop(ident, None)
        if off is None:
            return
        if off.hw:
            del self.hw_flows[ident]
            if off.hw_rules and self.hw is not None:
                self.hw.remove(off.hw_rules)
        else:
            self._slots.drop(off.slot)
            self.flows.delete(list(off.key_bytes), missing_ok=True)
        if tell_conntrack:
            self.ct.mark_offloaded(off.conn, False)
        self.stats.count(self.stats.removed, cause)

    def flush(self) -> None:
        """Hand every connection back to the kernel path."""
        for ident in list(self.offloaded):
            self._remove(ident, "flushed", tell_conntrack=True)
        self.pending.clear()

    # ---- keep-alive, expiry, FIN/RST --------------------------------------------------

    def tick(self) -> None:
        """One keep-alive round: one batched counter read for the whole table.

        The flow table's counters come as arrays and are matched against every
        connection in C (csrc/keepalive.c); anything else (a fake map) goes through the
        same decisions in Python. Either way only the connections that need something
        done come back: entry missing, FIN/RST, packets moved (refresh), idle."""
        now = self.clock()
        counters = self.flows.read_counters()
        idle_ns = int(self.config.idle_timeout_s * 1e9)
        verdicts = self._scan_native(counters, now, idle_ns) if isinstance(counters, Counters) else None
        if verdicts is None:
            verdicts = self._scan(counters.as_dict(), now, idle_ns)
        if self.hw_flows:
            verdicts += self._scan_hw(now, idle_ns)
        for ident, off, what in verdicts:
            if what == lib.PYFLOW_KA_MISSING:
                # an entry vanished from under us (flushed by hand): do not leave half a flow
                self._remove(ident, "entry_missing", tell_conntrack=True)
            elif what == lib.PYFLOW_KA_CLOSING:
                self._remove(ident, "fin_rst", tell_conntrack=True)
            elif what == lib.PYFLOW_KA_MOVED:
                self.stats.refreshes += 1
                if not self.ct.refresh(off.conn, self.config.conntrack_timeout_s):
                    self._remove(ident, "destroyed", tell_conntrack=False)
            else:
                self._remove(ident, "idle", tell_conntrack=True)
        if self.pending:
            self.retry_pending()

    def _scan(self, counters: dict[bytes, tuple[int, ...]], now: int, idle_ns: int) -> _Verdicts:
        """The keep-alive verdicts from a {key bytes: (packets, bytes, last_seen, closing)} dict."""
        out: _Verdicts = []
        for ident, off in self.offloaded.items():
            if off.hw:
                continue  # their counters are the rules' (_scan_hw)
            ko, kr = off.key_bytes
            co, cr = counters.get(ko), counters.get(kr)
            if co is None or cr is None:
                out.append((ident, off, lib.PYFLOW_KA_MISSING))
            elif co[3] or cr[3]:
                out.append((ident, off, lib.PYFLOW_KA_CLOSING))
            elif (packets := co[0] + cr[0]) != off.packets:
                off.packets = packets
                off.last_seen_ns = max(off.last_seen_ns, co[2], cr[2])
                self._slots.write(off.slot, off)
                out.append((ident, off, lib.PYFLOW_KA_MOVED))
            elif now - off.last_seen_ns > idle_ns:
                out.append((ident, off, lib.PYFLOW_KA_IDLE))
        return out

    def _scan_native(self, counters: Counters, now: int, idle_ns: int) -> _Verdicts | None:
        """_scan over the counter arrays in C; None if the C side could not (no memory)."""
        s = self._slots
        nout = ffi.new("uint32_t *")
        if lib.pyflow_ka_scan(s.keys, s.conns, s.top, KEY_SIZE, counters.keys, counters.counters, counters.n,
                              now, idle_ns, s.out_index, s.out_what, nout) < 0:
            return None
        out: _Verdicts = []
        for k in range(nout[0]):
            slot, what = s.out_index[k], s.out_what[k]
            ident = s.owner[slot]
            off = self.offloaded[ident]
            if what == lib.PYFLOW_KA_MOVED:
                c = s.conns[slot]
                off.packets, off.last_seen_ns = c.packets, c.last_seen_ns
            out.append((ident, off, what))
        return out

    # ---- path changes -----------------------------------------------------------------

    def retry_pending(self) -> None:
        with self._pass():
            for ident, conn in list(self.pending.items()):
                self._enqueue(conn, ident)
        self.stats.pending = len(self.pending)

    def paths_changed(self) -> None:
        """Re-resolve every offloaded connection: rewrite changed paths, remove dead ones.

        Called on any route, neighbour or link change; the counters restart at zero
        for a rewritten entry, so keep-alive treats it as new. A connection whose path
        resolves to what its entries were built from is left alone without rebuilding
        them; the rewrites of one pass go to the map together.
        """
        with self._pass():
            changed: list[tuple[tuple, Offloaded, _Fields, _Path]] = []
            memo = self._memo
            assert memo is not None
            for ident, off in list(self.offloaded.items()):
                conn = off.conn
                # the memo lookup inline: this loop runs over every offloaded connection
                # on every neighbour change, and almost all of them end at `continue`
                path = memo.get((conn.family, conn.orig.src, conn.reply.src, conn.mark))
                if type(path) is not tuple:
                    try:
                        path = self._resolve(conn)
                    except (NotYet, NoPath) as exc:
                        self._remove(ident, "path_lost", tell_conntrack=True)
                        if isinstance(exc, NotYet):
                            self.pending[ident] = conn
                        continue
                if path == off.path:
                    continue
                fields = _fields(conn, path)
                # the entries' constructor arguments, old and new: equal arguments, equal entries
                if fields == _fields(off._source or conn, off.path):
                    off.path = path
                    continue
                if off.hw:
                    self._replace_hw(ident, off, path)
                    continue
                changed.append((ident, off, fields, path))
                if len(changed) >= BATCH:
                    self._rewrite(changed)
                    changed = []
            self._rewrite(changed)
            self.retry_pending()

    def _rewrite(self, changed: list[tuple[tuple, Offloaded, _Fields, _Path]]) -> None:
        """New entries for connections whose path changed: stale keys out, new entries in
        one insert (one by one, both or neither each, if the batch fails). Against the real
        flow table the entries go as bytes, as bulk installs do."""
        if not changed:
            return
        entries: list[tuple[_Keys, _Actions] | None]
        if self._raw:
            packed = [(entry_bytes(f[0], f[2]), entry_bytes(f[1], f[3])) for _i, _o, f, _p in changed]
            kbs = [(ko, kr) for (ko, _vo), (kr, _vr) in packed]
            entries = [None] * len(changed)
            items: Any = (b"".join(kb for (ko, _vo), (kr, _vr) in packed for kb in (ko, kr)),
                          b"".join(vb for (_ko, vo), (_kr, vr) in packed for vb in (vo, vr)))
        else:
            built = [_objects(f) for _i, _o, f, _p in changed]
            kbs = [(key_bytes(k[0]), key_bytes(k[1])) for k, _a in built]
            entries = list(built)
            items = [pair for k, a in built for pair in zip(k, a, strict=True)]
        stale = [kb for (_i, off, _f, _p), new in zip(changed, kbs, strict=True) if new != off.key_bytes
                 for kb in off.key_bytes]
        if stale:
            self.flows.delete(stale, missing_ok=True)
        written = False
        if len(changed) > 1:
            try:
                self.flows.insert(items)
                written = True
            except MapError as exc:
                log.debug("batched rewrite of %d connections failed, one by one now: %s", len(changed), exc)
                self.flows.delete([kb for pair in kbs for kb in pair], missing_ok=True)
        for n, (ident, off, f, path) in enumerate(changed):
            if not written:
                keys, actions = entries[n] or _objects(f)
                if not self._install(keys, actions):
                    self._remove(ident, "path_lost", tell_conntrack=True)
                    continue
                entries[n] = (keys, actions)
            off._written(off.conn, path, kbs[n], entries[n])
            off.packets = 0
            self._slots.write(off.slot, off)
            self.stats.rewritten += 1


def _rewrite(seen: tuple[str, int], wanted: tuple[str, int]) -> tuple[str, int] | None:
    """The NAT target when the packet must leave with other address/port than it came."""
    return wanted if wanted != seen else None


def _fields(conn: Conn, path: _Path) -> _Fields:
    """The FlowKey and FlowAction constructor arguments of conn's two entries: (key orig,
    key reply, action orig, action reply). The one place the entries are decided; _build
    makes objects of them, Engine._entry_bytes bytes.

    Original direction: arrives A:a -> B:b, leaves A':a' -> B':b' (reply tuple reversed).
    Reply direction: arrives B':b' -> A':a', leaves B:b -> A:a.
    """
    in_o, in_r, eg_o, eg_r, out_o, out_r = path
    o, r = conn.orig, conn.reply
    return ((in_o.ifindex, conn.proto, o.src, o.dst, o.sport, o.dport),
            (in_r.ifindex, conn.proto, r.src, r.dst, r.sport, r.dport),
            _action(in_o, out_o, eg_o, snat=_rewrite((o.src, o.sport), (r.dst, r.dport)),
                    dnat=_rewrite((o.dst, o.dport), (r.src, r.sport))),
            _action(in_r, out_r, eg_r, snat=_rewrite((r.src, r.sport), (o.dst, o.dport)),
                    dnat=_rewrite((r.dst, r.dport), (o.src, o.sport))))


def _build(conn: Conn, path: _Path) -> tuple[_Keys, _Actions]:
    """conn's two entries as FlowKey/FlowAction objects."""
    return _objects(_fields(conn, path))


def _objects(fields: _Fields) -> tuple[_Keys, _Actions]:
    kf_o, kf_r, af_o, af_r = fields
    return (FlowKey(*kf_o), FlowKey(*kf_r)), (FlowAction(*af_o), FlowAction(*af_r))


def _action(ingress: ManagedDevice, egress_dev: ManagedDevice, eg: Egress, *,
            snat: tuple[str, int] | None, dnat: tuple[str, int] | None) -> tuple:
    """FlowAction's constructor arguments, in its field order."""
    return (eg.ifindex, egress_dev.tx_port, eg.mtu, ingress.mac, eg.dmac, eg.smac,
            snat[0] if snat else None, snat[1] if snat else None,
            dnat[0] if dnat else None, dnat[1] if dnat else None,
            eg.vlan_outer_tci, eg.vlan_outer_tpid, eg.vlan_inner_tci, eg.pppoe_sid)
