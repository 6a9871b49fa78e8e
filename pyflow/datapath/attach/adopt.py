"""What runs on a device, and taking over the devices a previous process attached.

The programs stay attached while no process runs; a restarted process reads the state
file, checks it against the devices and the devmap, and so adopts the running datapath
without touching traffic.
"""

from __future__ import annotations

import logging
from typing import Any

from pyflow.datapath import netdev
from pyflow.datapath.attach.devmap import TxPorts
from pyflow.datapath.attach.state import Attachment, State
from pyflow.datapath.attach.tc import TC_NAME, TcHook
from pyflow.datapath.attach.xdp import attached_mode
from pyflow.errors import DeviceError

log = logging.getLogger(__name__)


class Adoption:
    """Reads the pyflow hook a device runs and reconciles the state with the devices."""

    def __init__(self, ipr: Any, tc: TcHook, slots: TxPorts) -> None:
        self._ipr = ipr
        self._tc = tc
        self._slots = slots

    def live(self, ifindex: int, facts: netdev.DeviceFacts | None = None) -> tuple[str, int, str] | None:
        """(mode, prog id, ifname) of the pyflow hook the device runs, or None.

        XDP wins over TC when both are present (a crash between the two halves
        of a mode switch): XDP sees the packets first.
        """
        if facts is None:
            try:
                facts = netdev.read_facts(self._ipr, ifindex=ifindex)
            except DeviceError:
                return None
        mode = attached_mode(facts)
        if mode is not None and facts.xdp_prog_id:
            return mode, facts.xdp_prog_id, facts.ifname
        tc = self._tc.current(ifindex)
        if tc is not None and tc[0] == TC_NAME:
            return "tc", tc[1], facts.ifname
        return None

    def adopt(self, st: State, known: set[int]) -> None:
        """Reconcile ``st`` with the devices and the devmap (at start-up).

        Kept: devices that still exist under the recorded ifindex and still run
        one of our programs (``known``) in the recorded mode (their prog id is
        refreshed). Dropped: the rest, with their slots. Found: devices running
        one of our programs that the state does not list (a lost state file).
        Then the devmap is made to hold exactly the recorded slots.
        """
        self._keep_live(st, known)
        self._find_running(st, known)
        self._reconcile_slots(st)

    def _keep_live(self, st: State, known: set[int]) -> None:
        for ifindex, att in list(st.devices.items()):
            live = self.live(ifindex)
            if live is None or live[1] not in known:
                log.warning("%s (ifindex %d): %s attachment gone, forgetting it",
                            att.ifname, ifindex, att.mode)
                del st.devices[ifindex]
                continue
            att.mode, att.prog_id = live[0], live[1]
            att.ifname = live[2]
            st.names[ifindex] = live[2]
        for ifindex in list(st.slots):
            if ifindex not in st.devices:
                try:
                    facts = netdev.read_facts(self._ipr, ifindex=ifindex)
                except DeviceError:
                    self._slots.free(st, ifindex)
                    continue
                st.names[ifindex] = facts.ifname

    def _find_running(self, st: State, known: set[int]) -> None:
        for msg in self._ipr.link("dump"):
            facts = netdev.facts_from_msg(msg)
            if facts.ifindex in st.devices:
                continue
            live = self.live(facts.ifindex, facts)
            if live is not None and live[1] in known:
                st.devices[facts.ifindex] = Attachment(facts.ifname, facts.ifindex, live[0], live[1],
                                                       "adopted: found running on the device")
                log.info("%s: adopted a running %s attachment", facts.ifname, live[0])

    def _reconcile_slots(self, st: State) -> None:
        entries = self._slots.entries()
        on_map: dict[int, int] = {}  # ifindex -> slot, as the pinned devmap holds them
        for slot, have in entries:
            if have is not None:
                on_map.setdefault(have, slot)
        for ifindex, att in st.devices.items():
            # without a state entry (lost file) keep the slot the devmap still has:
            # flows installed before the restart point at it
            kept = on_map.get(ifindex)
            if ifindex not in st.slots and kept is not None and kept not in st.slots.values():
                st.slots[ifindex] = kept
                st.names[ifindex] = att.ifname
            self._slots.take(st, ifindex, att.ifname)
        wanted = {s: i for i, s in st.slots.items()}
        for slot, have in entries:
            if have is not None and wanted.get(slot) != have:
                self._slots.clear(slot)
