"""Tx-port slots: the devmap entries XDP redirects through (value = the device's ifindex).

Every attached device holds a slot, whatever its own mode: XDP on *another* device
redirects into it through that slot. Devices that are only redirect targets can hold a
slot without being attached.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyflow.datapath.abi import MAP_TX_PORTS
from pyflow.datapath.attach.state import State
from pyflow.errors import DatapathError, DeviceError


class TxPorts:
    """The tx-port devmap and the slots the state records in it."""

    def __init__(self, table: Any, max_slots: int) -> None:
        self._table = table
        self.max_slots = max_slots

    def get(self, slot: int) -> int | None:
        try:
            return int(self._table[self._table.Key(slot)].value)
        except KeyError:
            return None

    def entries(self) -> list[tuple[int, int | None]]:
        """(slot, ifindex or None) for every slot."""
        return [(slot, self.get(slot)) for slot in range(self.max_slots)]

    def set(self, slot: int, ifindex: int, ifname: str) -> None:
        try:
            self._table[self._table.Key(slot)] = self._table.Leaf(ifindex)
        except Exception as exc:  # bcc raises a bare Exception with strerror
            raise DeviceError(f"{ifname}: cannot enter tx-port slot {slot}: {exc}") from None

    def clear(self, slot: int) -> None:
        with contextlib.suppress(KeyError):
            del self._table[self._table.Key(slot)]

    def take(self, st: State, ifindex: int, ifname: str) -> tuple[int, bool]:
        """(slot, newly taken). The devmap entry is written before any hook runs, so
        no flow can ever point XDP at an empty slot of an attached device."""
        if ifindex in st.slots:
            slot = st.slots[ifindex]
            if self.get(slot) != ifindex:
                self.set(slot, ifindex, ifname)
            return slot, False
        used = set(st.slots.values())
        free = next((s for s in range(self.max_slots) if s not in used), None)
        if free is None:
            raise DatapathError(f"{ifname}: tx-port map {MAP_TX_PORTS} is full ({self.max_slots} slots)")
        self.set(free, ifindex, ifname)
        st.slots[ifindex] = free
        st.names[ifindex] = ifname
        return free, True

    def free(self, st: State, ifindex: int) -> None:
        slot = st.slots.pop(ifindex, None)
        st.names.pop(ifindex, None)
        if slot is not None:
            self.clear(slot)
