"""Helpers shared by several test directories (topology, datapath, router, capture, fakes)."""
