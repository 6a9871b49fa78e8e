"""Where a connection's two entries are put: the XDP flow map, or flower rules on a NIC.

MapPlacement writes entries to the flow map (pyflow.datapath.flowtable.FlowTable), both
directions of a connection or neither. Many connections go in one insert, as bytes packed
in C from per-path templates (pack_conns, csrc/entries.c), or by the Python packer straight
from their fields (pack_entries, abi.entry_bytes), the reference the C output is held to:
one bpf() call for a batch.
A batch is not atomic and stops at its first failure, so then all of its entries are
deleted again and the engine writes its connections one by one.

HwPlacement puts a connection between two hardware devices on the NIC. When the engine
has a placer (pyflow.hw.offload.FlowerOffload, made for the devices attached in hw mode),
a connection whose two ingress devices are both hardware devices is offered to it as two
flower rules, built from the same entries the XDP map would get. A refusal (a full
table, a match or action the NIC cannot do) is counted and the connection goes to the
XDP map instead: it is never lost. The rules' counters drive keep-alive as the map's
counters do (``scan``, read by keepalive.tick).
"""

from __future__ import annotations

import logging
import socket
from array import array
from collections.abc import Callable, Iterable
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING

from pyflow._native import ffi, lib
from pyflow.control.keepalive import EXTEND, IDLE, MISSING, Slots, Verdicts
from pyflow.control.model import (
    Actions,
    Conn,
    Fields,
    FlowMap,
    HwPlacer,
    HwRefused,
    Keys,
    Offloaded,
    Path,
    Tuple,
    entries_of,
    entry_fields,
    entry_objects,
)
from pyflow.datapath.abi import FLOW_SIZE, KEY_SIZE, entry_bytes, key_bytes
from pyflow.errors import MapError

if TYPE_CHECKING:
    from pyflow.control.engine import EngineStats

log = logging.getLogger(__name__)


def pack_entries(fields: Iterable[Fields]) -> tuple[list[bytes], list[bytes], list[tuple[bytes, bytes]]]:
    """The entries of connections, from their fields (model.entry_fields), as bytes for one
    insert: (keys, values, each connection's two keys)."""
    keys: list[bytes] = []
    values: list[bytes] = []
    kbs = []
    for kf_o, kf_r, af_o, af_r in fields:
        ko, vo = entry_bytes(kf_o, af_o)
        kr, vr = entry_bytes(kf_r, af_r)
        keys += (ko, kr)
        values += (vo, vr)
        kbs.append((ko, kr))
    return keys, values, kbs


_ADDR_TEXT = attrgetter("orig.src", "orig.dst", "reply.src", "reply.dst")
_PORTS = attrgetter("orig.sport", "orig.dport", "reply.sport", "reply.dport")
_PROTO = attrgetter("proto")
# A connection whose fields are all zero and without NAT: packed on a path, the entries
# hold what the path decides and nothing of a connection (csrc/entries.c fills that in).
_BLANK = Conn(socket.AF_INET, 0, Tuple("0.0.0.0", "0.0.0.0", 0, 0), Tuple("0.0.0.0", "0.0.0.0", 0, 0))
_PACK_ERRORS = (TypeError, ValueError, OverflowError)


def pack_conns(conns: list[Conn], paths: list[Path]) -> tuple[list[bytes], list[bytes],
                                                             list[tuple[bytes, bytes]]] | None:
    """pack_entries(entry_fields(c, p) for c, p in zip(conns, paths)), the same bytes, in
    one call to C (csrc/entries.c: pyflow_pack_entries): each path's entries are packed once
    by the Python packer as templates, and C writes each connection's addresses, ports,
    protocol and NAT into copies. None when anything is out of the ordinary (text that is
    not an address, a port out of range, a path the packer refuses): the caller packs with
    pack_entries then, which gives the error it always gave."""
    n = len(conns)
    if n != len(paths):
        raise ValueError(f"{n} connections, {len(paths)} paths")
    if not n:
        return [b""], [b""], []
    ids = list(map(id, paths))
    by_id = dict(zip(ids, paths, strict=True))
    slot = {pid: i for i, pid in enumerate(by_id)}
    try:
        tkeys: list[bytes] = []
        tvalues: list[bytes] = []
        for path in by_id.values():
            kf_o, kf_r, af_o, af_r = entry_fields(_BLANK, path)
            ko, vo = entry_bytes(kf_o, af_o)
            kr, vr = entry_bytes(kf_r, af_r)
            tkeys += (ko, kr)
            tvalues += (vo, vr)
        text = ("\0".join(chain.from_iterable(map(_ADDR_TEXT, conns))) + "\0").encode()
        ports = array("H", chain.from_iterable(map(_PORTS, conns)))
        protos = array("B", map(_PROTO, conns))
    except _PACK_ERRORS:
        return None
    index = array("I", map(slot.__getitem__, ids))
    keys = bytearray(2 * n * KEY_SIZE)
    values = bytearray(2 * n * FLOW_SIZE)
    rc = lib.pyflow_pack_entries(b"".join(tkeys), b"".join(tvalues), len(by_id),
                                 ffi.from_buffer("uint32_t[]", index), ffi.from_buffer("uint8_t[]", protos),
                                 ffi.from_buffer("uint16_t[]", ports), text, len(text), n,
                                 ffi.from_buffer(keys), ffi.from_buffer(values))
    if rc < 0:
        return None
    kb = bytes(keys)
    step = 2 * KEY_SIZE
    kbs = [(kb[i:i + KEY_SIZE], kb[i + KEY_SIZE:i + step]) for i in range(0, len(kb), step)]
    return [kb], [bytes(values)], kbs


class MapPlacement:
    """The engine's writes to the XDP flow map."""

    def __init__(self, flows: FlowMap, stats: EngineStats):
        self.flows = flows
        self.stats = stats

    def install(self, keys: Keys, actions: Actions, mode: str = "any") -> bool:
        """One connection: both directions in one insert, or neither (counted, logged)."""
        try:
            self.flows.insert(list(zip(keys, actions, strict=True)), mode=mode)
            return True
        except MapError as exc:
            self.stats.install_errors += 1
            log.warning("flow install failed: %s", exc)
            self.flows.delete(list(keys), missing_ok=True)
            return False

    def insert_many(self, keys: list[bytes], values: list[bytes], kbs: list[tuple[bytes, bytes]],
                    what: str) -> bool:
        """Many connections (pack_entries) in one insert; False, with none of them left in the
        map, if the batch failed."""
        try:
            self.flows.insert((b"".join(keys), b"".join(values)))
            return True
        except MapError as exc:
            log.debug("batched %s of %d connections failed, one by one now: %s", what, len(kbs), exc)
            self.flows.delete([kb for pair in kbs for kb in pair], missing_ok=True)
            return False

    def rewrite(self, changed: list[tuple[tuple, Offloaded, Fields, Path]], slots: Slots,
                lost: Callable[[tuple], None]) -> None:
        """New entries for connections whose path changed ((ident, record, new fields, new
        path) each): stale keys out, the new entries in one insert (one by one, both or
        neither each, if the batch fails). A connection whose entries cannot be written is
        handed to lost. The counters restart at zero, so keep-alive treats them as new."""
        if not changed:
            return
        keys, values, kbs = pack_entries(f for _i, _o, f, _p in changed)
        stale = [kb for (_i, off, _f, _p), new in zip(changed, kbs, strict=True) if new != off.key_bytes
                 for kb in off.key_bytes]
        if stale:
            self.delete(stale)
        written = len(changed) > 1 and self.insert_many(keys, values, kbs, "rewrite")
        for n, (ident, off, f, path) in enumerate(changed):
            entries = None
            if not written:
                entries = entry_objects(f)
                if not self.install(*entries):
                    lost(ident)
                    continue
            off.written(off.conn, path, kbs[n], entries)
            slots.rewritten(off)
            self.stats.rewritten += 1

    def delete(self, keys: Iterable[bytes]) -> None:
        self.flows.delete(list(keys), missing_ok=True)

    def delete_stray(self, keys: list[bytes]) -> int:
        """Delete entries no connection owns (left by a crashed or older process, or written
        by hand: Engine.prune found them), counted; returns how many."""
        stray = list(dict.fromkeys(keys))  # a walk may repeat a key
        if stray:
            self.flows.delete(stray, missing_ok=True)
            self.stats.removed["stray_entry"] = self.stats.removed.get("stray_entry", 0) + len(stray)
        return len(stray)


class HwPlacement:
    """The connections carried as flower rules, and the placer that put them there."""

    def __init__(self, stats: EngineStats, clock: Callable[[], int]):
        self.hw: HwPlacer | None = None  # None: every flow goes to the XDP map
        self.flows: dict[tuple, Offloaded] = {}  # the offloaded connections that are flower rules
        self.stats = stats
        self.clock = clock

    def capable(self, path: Path) -> bool:
        """Both ingress devices of path are hardware devices."""
        hw = self.hw
        return hw is not None and hw.capable(path[0].ifindex) and hw.capable(path[1].ifindex)

    def place(self, ident: tuple, conn: Conn, path: Path) -> Offloaded | None:
        """conn as two rules when its path allows: its new record; None (a refusal counted)
        when the caller must put it on the XDP path."""
        if not self.capable(path):
            return None
        keys, actions = entries_of(conn, path)
        ids = self._rules(conn, keys, actions)
        if ids is None:
            return None
        now = self.clock()
        off = Offloaded(conn, path, now, last_seen_ns=now, keys_raw=key_bytes(keys[0]) + key_bytes(keys[1]),
                        _source=conn, _entries=(keys, actions), hw=True, hw_rules=ids)
        self.flows[ident] = off
        self.stats.hw_offloaded += 1
        return off

    def replace(self, ident: tuple, off: Offloaded, path: Path, fallback: MapPlacement, slots: Slots) -> bool:
        """A hardware flow's path changed: the old rules out, new ones in, or its entries in the
        XDP map (and its keep-alive slot taken) if they are refused. False if neither took it:
        the caller removes it."""
        assert self.hw is not None
        self.hw.remove(off.hw_rules)
        off.hw_rules = ()
        keys, actions = entries_of(off.conn, path)
        ids = self._rules(off.conn, keys, actions) if self.capable(path) else None
        if ids is not None:
            off.hw_rules = ids
        elif fallback.install(keys, actions):
            self.forget(ident, off)
            off.hw = False
        else:
            return False
        off.written(off.conn, path, (key_bytes(keys[0]), key_bytes(keys[1])), (keys, actions))
        off.packets = 0
        if not off.hw:
            slots.take(off, last_seen_ns=off.last_seen_ns, deadline_ns=off.ct_deadline_ns)
        self.stats.rewritten += 1
        return True

    def _rules(self, conn: Conn, keys: Keys, actions: Actions) -> tuple | None:
        assert self.hw is not None
        try:
            return self.hw.place(keys, actions)
        except HwRefused as exc:
            self.stats.hw_failures += 1
            self.stats.count(self.stats.hw_refused, exc.reason)
            log.debug("hardware refused %s, XDP path instead: %s", conn.orig, exc)
            return None

    def forget(self, ident: tuple, off: Offloaded) -> None:
        """The flow is no longer rules: removed, or moved to the XDP map (rules already gone)."""
        del self.flows[ident]
        if off.hw_rules and self.hw is not None:
            self.hw.remove(off.hw_rules)

    def scan(self, now: int, idle_ns: int, extend_ns: int) -> Verdicts:
        """Keep-alive verdicts of the hardware flows, from one read of the rules' counters:
        the decisions csrc/keepalive.c makes for map entries (rules have no FIN/RST flag)."""
        assert self.hw is not None
        stats = self.hw.stats()
        out: Verdicts = []
        for ident, off in self.flows.items():
            so, sr = stats.get(off.hw_rules[0]), stats.get(off.hw_rules[1])
            if so is None or sr is None:
                out.append((ident, off, MISSING))
                continue
            off.hw_counters = ((so.packets, so.bytes), (sr.packets, sr.bytes))
            if (packets := so.packets + sr.packets) != off.packets:
                off.packets = packets
                off.last_seen_ns = max(off.last_seen_ns, now - min(so.idle_ns, sr.idle_ns))
            if now - off.last_seen_ns > idle_ns:
                out.append((ident, off, IDLE))
            elif off.ct_deadline_ns - now < extend_ns:
                out.append((ident, off, EXTEND))
        return out
