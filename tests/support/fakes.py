"""Fakes of the engine's adapters, for tests without root.

Each implements the interface pyflow.control.model names for the real adapter
(Conntrack, PathResolver, FlowMap, Devices, HwPlacer): the engine cannot tell them
from ctnetlink, rtnetlink, the BPF flow table or flower. The flow map keeps its
entries as the kernel map would, key bytes -> ``struct pyflow_flow`` bytes, and
gives its counters as a real ``flowtable.Counters``, so the engine's keep-alive scan
in C runs on fake data.

The topology the fakes describe: a client LAN on ifindex 2 (198.18.0.0/24), an uplink
on ifindex 3 (198.19.0.0/24, router address 198.19.0.1) and an unmanaged device 9.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pyflow._native import ffi
from pyflow.control.engine import Engine, ManagedDevice
from pyflow.control.model import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    TCP_CONNTRACK_ESTABLISHED,
    Conn,
    CtEvent,
    Egress,
    EventType,
    HwRefused,
    NoPath,
    NotYet,
    Tuple,
)
from pyflow.datapath.abi import FLOW_SIZE, FLOW_TYPE, KEY_SIZE, KEY_TYPE, FlowKey, key_bytes, mac_bytes
from pyflow.datapath.flowtable import (
    COUNTERS_TYPE,
    MODES,
    BatchError,
    Counters,
    pack,
    pack_keys,
)

LAN, WAN, OTHER = 2, 3, 9
MAC = {LAN: mac_bytes("02:00:00:00:02:00"), WAN: mac_bytes("02:00:00:00:03:00")}
CLIENT_MAC, GW_MAC, GW2_MAC = (mac_bytes(m) for m in ("02:00:00:00:00:0c", "02:00:00:00:00:99",
                                                      "02:00:00:00:00:98"))
SEC = 1_000_000_000
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
LIVE = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED  # a replied, assured, confirmed entry

_PACKETS_AT = ffi.offsetof(FLOW_TYPE, "counters")  # in struct pyflow_flow: packets, bytes (u64)
_CLOSING_AT = ffi.offsetof(FLOW_TYPE, "action") + ffi.offsetof("struct pyflow_flow_action", "closing")
_U64X2, _U16 = struct.Struct("=QQ"), struct.Struct("=H")


def masq_conn(proto=TCP, sport=40000, *, state=TCP_CONNTRACK_ESTABLISHED, status=LIVE,
              mark=0, helper=None) -> Conn:
    """Client 198.18.0.10:sport -> 198.19.0.50:443, masqueraded to 198.19.0.1:61000."""
    return Conn(socket.AF_INET, proto, Tuple("198.18.0.10", "198.19.0.50", sport, 443),
                Tuple("198.19.0.50", "198.19.0.1", 443, 61000 + sport % 1000), status=status,
                tcp_state=state if proto == TCP else None, mark=mark, helper=helper)


def offer(eng: Engine, ct: FakeConntrack, conn: Conn, kind: EventType = EventType.UPDATE) -> None:
    """conn appears in conntrack and the engine hears of it."""
    ct.table[conn.ident] = conn
    eng.handle([CtEvent(kind, conn)])


class FakeConntrack:
    """model.Conntrack over a table of connections; records marks, refreshes and the
    timeouts written (``timeout``: the last one per connection; ``released``: (ident,
    timeout) of every unmark, None where the timeout was left alone)."""

    def __init__(self):
        self.lost_events = 0
        self.offload_mark = 0
        self.table: dict[tuple, Conn] = {}
        self.marked: set[tuple] = set()
        self.refreshed: list[tuple[tuple, int]] = []
        self.timeout: dict[tuple, int] = {}
        self.released: list[tuple[tuple, int | None]] = []
        self.kernel_timeouts = {TCP: 432000, UDP: 120}

    def timeouts(self):
        return self.kernel_timeouts

    def dump(self):
        return list(self.table.values())

    def poll(self, timeout):
        return []

    def refresh(self, conn, timeout_s):
        if conn.ident not in self.table:
            return False
        self.refreshed.append((conn.ident, timeout_s))
        self.timeout[conn.ident] = timeout_s
        return True

    def mark_offloaded(self, conn, offloaded, *, timeout_s=None):
        if conn.ident not in self.table:
            return False
        (self.marked.add if offloaded else self.marked.discard)(conn.ident)
        if timeout_s is not None:
            self.timeout[conn.ident] = timeout_s
        if not offloaded:
            self.released.append((conn.ident, timeout_s))
        return True


class FakePaths:
    """model.PathResolver: 198.18.0.0/24 on LAN (on-link), everything else via the gateway on WAN."""

    def __init__(self):
        self.gw_mac: bytes | None = GW_MAC
        self.client_mac: bytes | None = CLIENT_MAC
        self.wan_dev = WAN
        self.calls = 0

    def device_of(self, family, addr, *, mark):
        return LAN if ipaddress.ip_address(addr) in ipaddress.ip_network("198.18.0.0/24") else self.wan_dev

    def egress(self, family, src, dst, *, iif, mark):
        self.calls += 1
        dev = self.device_of(family, dst, mark=mark)
        if dev == OTHER:
            raise NoPath("no_route")
        mac = self.client_mac if dev == LAN else self.gw_mac
        if mac is None:
            raise NotYet()
        return Egress(ifindex=dev, ifname=f"if{dev}", smac=MAC[dev], dmac=mac, mtu=1500)

    def mac_of(self, ifindex):
        return MAC[ifindex]


class FakeDevices:
    """model.Devices: the managed ones, with devmap slot ifindex * 10."""

    def __init__(self, managed=(LAN, WAN), macs=MAC):
        self.managed = {i: ManagedDevice(i, tx_port=i * 10, mac=macs[i]) for i in managed}

    def get(self, ifindex):
        return self.managed.get(ifindex)


class Clock:
    """The engine's clock, moved by hand."""

    def __init__(self):
        self.now = 1000 * SEC

    def __call__(self):
        return self.now


def counters_of(rows: Iterable[tuple[bytes, tuple[int, int, int]]]) -> Counters:
    """What FlowTable.read_counters returns, holding ``rows`` (key bytes, (packets, bytes,
    closing)) in their order, repeats included."""
    rows = list(rows)
    n = len(rows)
    keys = ffi.new(f"{KEY_TYPE}[]", max(n, 1))
    counters = ffi.new(f"{COUNTERS_TYPE}[]", max(n, 1))
    for i, (kb, (packets, nbytes, closing)) in enumerate(rows):
        ffi.memmove(keys + i, kb, KEY_SIZE)
        c = counters[i]
        c.packets, c.bytes, c.closing = packets, nbytes, closing
    return Counters(keys, counters, n)


def _split(buf, n: int, size: int) -> list[bytes]:
    raw = ffi.buffer(buf, n * size)[:]
    return [raw[i:i + size] for i in range(0, n * size, size)]


class FakeFlows:
    """model.FlowMap as FlowTable has it, over a dict of key bytes -> ``struct pyflow_flow``
    bytes. insert and delete take what the real ones take (flowtable.pack / pack_keys) and
    fail as they do (BatchError after the elements before the failing one were applied);
    read_counters gives a real Counters.

    ``fail_inserts``: that many inserts stop after their first element ("map full")."""

    def __init__(self):
        self.entries: dict[bytes, bytes] = {}
        self.fail_inserts = 0
        self.inserts = 0  # insert calls

    def insert(self, items, *, mode="any"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        b = pack(items)
        self.inserts += 1
        keys, values = _split(b.keys, b.n, KEY_SIZE), _split(b.values, b.n, FLOW_SIZE)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if i == 1 and self.fail_inserts:
                self.fail_inserts -= 1
                raise BatchError(f"fake flows: insert stopped at element {i} of {b.n}, {i} applied: E2BIG",
                                 op="insert", errno=errno.E2BIG, applied=i, index=i, total=b.n)
            exists = k in self.entries
            if (mode == "new" and exists) or (mode == "existing" and not exists):
                err = errno.EEXIST if exists else errno.ENOENT
                raise BatchError(f"fake flows: insert stopped at element {i} of {b.n}",
                                 op="insert", errno=err, applied=i, index=i, total=b.n)
            self.entries[k] = v
        return b.n

    def delete(self, keys, *, missing_ok=True):
        b = pack_keys(keys)
        missing = []
        for i, k in enumerate(_split(b.keys, b.n, KEY_SIZE)):
            if self.entries.pop(k, None) is None:
                if not missing_ok:
                    raise BatchError(f"fake flows: delete stopped at element {i} of {b.n}", op="delete",
                                     errno=errno.ENOENT, applied=i, index=i, total=b.n)
                missing.append(i)
        return missing

    def read_counters(self):
        return counters_of((k, self.counters(k)) for k in self.entries)

    # ---- for tests: what the datapath would do to the counters ----------------------

    def counters(self, key: FlowKey | bytes) -> tuple[int, int, int]:
        """(packets, bytes, closing) of an entry, as read_counters gives them."""
        v = self.entries[_kb(key)]
        packets, nbytes = _U64X2.unpack_from(v, _PACKETS_AT)
        return packets, nbytes, _U16.unpack_from(v, _CLOSING_AT)[0]

    def set_counters(self, key: FlowKey | bytes, packets: int, nbytes: int, closing: int) -> None:
        """What the datapath writes: the entry's counters and its closing flag."""
        kb = _kb(key)
        v = bytearray(self.entries[kb])
        _U64X2.pack_into(v, _PACKETS_AT, packets, nbytes)
        _U16.pack_into(v, _CLOSING_AT, closing)
        self.entries[kb] = bytes(v)

    def hit(self, key: FlowKey | bytes, packets: int, closing: int = 0) -> None:
        """packets forwarded through the entry (and FIN/RST seen if closing)."""
        p, b, c = self.counters(key)
        self.set_counters(key, p + packets, b + 100 * packets, c | closing)

    def action(self, key: FlowKey | bytes):
        """The entry's ``struct pyflow_flow_action`` (a copy)."""
        return ffi.from_buffer(f"{FLOW_TYPE} *", bytearray(self.entries[_kb(key)])).action


def _kb(key: FlowKey | bytes) -> bytes:
    return key if isinstance(key, bytes) else key_bytes(key)


@dataclass
class RuleStats:
    """model.HwStats of one rule."""

    packets: int
    idle_ns: int
    bytes: int = 0


class FakeHw:
    """model.HwPlacer: rules by id; refuses while ``refuse`` is set, and the second rule of
    a pair when ``refuse_second`` is (to check that the first one is taken back)."""

    def __init__(self, devices=(LAN, WAN)):
        self.devices = set(devices)
        self.rules: dict[int, tuple] = {}
        self.counters: dict[int, RuleStats] = {}
        self.next_id = 1
        self.refuse: str | None = None
        self.refuse_second = False
        self.stats_calls = 0

    def capable(self, ifindex):
        return ifindex in self.devices

    def place(self, keys, actions):
        if self.refuse:
            raise HwRefused(self.refuse, "fake")
        ids = []
        for n, (k, a) in enumerate(zip(keys, actions, strict=True)):
            if n == 1 and self.refuse_second:
                self.remove(tuple(ids))
                raise HwRefused("enospc", "table full")
            ids.append(self.next_id)
            self.rules[self.next_id] = (k, a)
            self.counters[self.next_id] = RuleStats(0, 0)
            self.next_id += 1
        return tuple(ids)

    def remove(self, ids):
        for i in ids:
            self.rules.pop(i, None)
            self.counters.pop(i, None)

    def stats(self):
        self.stats_calls += 1
        return dict(self.counters)
