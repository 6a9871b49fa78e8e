"""pyflow: flow offload for Linux routers, an XDP/TC fast path fed by conntrack."""

__version__ = "0.1.0"
