"""Hardware flow offload: TC flower rules on NICs that can run them (hw-tc-offload).

flower.py is the netlink codec (a pyroute2 tcmsg plugin), rules.py turns the engine's
flow entries into flower filters, offload.py installs, reads and removes them.
"""
