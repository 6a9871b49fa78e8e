"""Compiling the datapath (ebpf/pyflow_xdp.c) with bcc.

One bcc module holds both entry points (``pyflow_xdp`` for the XDP hook and
``pyflow_tc`` for TC ingress) so that they share one set of maps. With a pin
directory the maps are created pinned there, or adopted when pins already
exist (bcc's BPF_TABLE_PINNED), which is how a restarted process takes over
the running state.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyflow.errors import DatapathError


def _ebpf_dir() -> Path:
    """Where the datapath's C source is: $PYFLOW_EBPF_DIR, else the copy an installed
    wheel carries inside the package (setup.py puts it there), else the source tree's
    top-level ebpf/ (an editable install or a checkout)."""
    if "PYFLOW_EBPF_DIR" in os.environ:
        return Path(os.environ["PYFLOW_EBPF_DIR"])
    package = Path(__file__).resolve().parent.parent  # pyflow/
    packaged = package / "ebpf"
    return packaged if (packaged / "pyflow_xdp.c").is_file() else package.parent / "ebpf"


EBPF_DIR = _ebpf_dir()
ENTRY_FILE = EBPF_DIR / "pyflow_xdp.c"
XDP_FUNC = "pyflow_xdp"
TC_FUNC = "pyflow_tc"


def cflags(pin_dir: str | None = None, defines: Mapping[str, int] | None = None) -> list[str]:
    flags = [f"-I{EBPF_DIR / 'include'}", f"-I{EBPF_DIR}", "-Wno-unused-function"]
    if pin_dir is not None:
        flags.append(f'-DPYFLOW_PIN_DIR="{pin_dir.rstrip("/")}"')
    for name, value in (defines or {}).items():
        flags.append(f"-D{name}={int(value)}")
    return flags


def compile_datapath(pin_dir: str | None = None, defines: Mapping[str, int] | None = None) -> Any:
    """Compile the datapath; returns the bcc ``BPF`` object (maps created or adopted).

    Raises DatapathError with the compiler's first error line on failure.
    """
    try:
        from bcc import BPF  # imported late: bcc is heavy and only root paths need it
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise DatapathError(f"bcc is not importable ({exc}); install python3-bpfcc") from exc
    if not ENTRY_FILE.is_file():
        raise DatapathError(f"datapath source missing: {ENTRY_FILE}")
    captured = io.StringIO()
    try:
        with _capture_stderr(captured):
            return BPF(src_file=str(ENTRY_FILE).encode(), cflags=cflags(pin_dir, defines))
    except Exception as exc:
        detail = _first_error(captured.getvalue()) or str(exc)
        raise DatapathError(f"datapath compile failed: {detail}") from exc


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    return ""


@contextlib.contextmanager
def _capture_stderr(sink: io.StringIO):
    """bcc's compiler writes to fd 2 directly; capture it so the error can be summarised."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sink.write(text)
            if text.strip() and os.environ.get("PYFLOW_SHOW_COMPILER_OUTPUT"):
                sys.stderr.write(text)
