"""Netlink, coded once: message and attribute walk/encode, sockets, errno text and the
kernel's UAPI numbers (wire.py, sock.py, uapi.py), with the protocols pyflow speaks on
top (rtnetlink routes and neighbours, ctnetlink, tc, flower, ethtool)."""
