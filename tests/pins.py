"""BPF pin directories made by tests and the demo (under /sys/fs/bpf/pft-*)."""

from __future__ import annotations

import os


def remove_pin_dir(path: str) -> bool:
    """Unpin everything in ``path`` and remove it; False if it was not there.

    A daemon that stops cleanly removes its own pins; this is for one that did not.
    """
    if not os.path.basename(path).startswith("pft-"):
        raise ValueError(f"refusing to remove a pin dir without the pft- prefix: {path}")
    if not os.path.isdir(path):
        return False
    for entry in os.listdir(path):
        os.unlink(os.path.join(path, entry))
    os.rmdir(path)
    return True


def pin_dir(tag: str) -> str:
    """A pin directory name of this process for ``tag`` (made by whoever loads there)."""
    return f"/sys/fs/bpf/pft-{tag}-{os.getpid()}"
