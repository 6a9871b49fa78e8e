"""The parts behind :class:`pyflow.datapath.loader.Datapath`, one job each.

pins.py      the pin dir on bpffs and what is pinned there
programs.py  the compiled datapath: both programs, the maps, the program pins
state.py     the state file, its lock, and the records in it
xdp.py       XDP on a device, over rtnetlink
tc.py        the cls_bpf filter on a device's clsact ingress hook
devmap.py    tx-port slots in the devmap
switch.py    choosing a mode and moving a device between modes without a gap
adopt.py     what runs on a device, and taking over a previous process's devices

Every part works on the state the facade read under its lock for the one operation in
progress; the parts pass it along and the facade writes it back.
"""
