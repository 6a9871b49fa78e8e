"""Compile the datapath (ebpf/pyflow_xdp.c) into the BPF object pyflow ships.

``clang -target bpf -g -O2 -DPYFLOW_LIBBPF``: one object with both entry points
(SEC("xdp"), SEC("tc")), BTF-defined maps and the BTF that libbpf and the ABI
layout check read. DWARF is stripped afterwards (libbpf reads only .BTF and
.BTF.ext), which keeps the object at about half the size.

Used by setup.py (wheel and editable builds) and by ``make datapath``; run as a
script: ``python csrc/build_bpf.py [OUTPUT]``. Environment: ``BPF_CLANG`` (default
clang), ``BPF_STRIP`` (default llvm-strip; empty: keep DWARF), ``BPF_CFLAGS`` (more
flags, e.g. a cross build's include dirs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EBPF = ROOT / "ebpf"
SOURCE = EBPF / "pyflow_xdp.c"
OUTPUT = ROOT / "pyflow" / "datapath" / "pyflow_xdp.bpf.o"


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def multiarch(clang: str) -> str:
    """The host's multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu, ...): the
    directory of /usr/include that holds asm/ for <linux/types.h>. The BPF target
    has none of its own, so the build borrows the build host's."""
    for cmd in ([clang, "-print-multiarch"], ["dpkg-architecture", "-qDEB_HOST_MULTIARCH"],
                ["gcc", "-print-multiarch"]):
        triplet = _first_line(cmd)
        if triplet:
            return triplet
    return ""


def sources() -> list[Path]:
    return [SOURCE, *sorted(EBPF.glob("lib/*.h")), *sorted(EBPF.glob("include/*.h"))]


def up_to_date(out: Path) -> bool:
    if not out.is_file():
        return False
    built = out.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in sources())


def build(out: Path = OUTPUT, source: Path = SOURCE) -> Path:
    clang = os.environ.get("BPF_CLANG", "clang")
    if shutil.which(clang) is None:
        raise SystemExit(f"build_bpf: {clang} not found (install clang, or set BPF_CLANG)")
    flags = ["-target", "bpf", "-g", "-O2", "-Wall", "-Werror", "-Wno-unused-function",
             "-DPYFLOW_LIBBPF", f"-I{EBPF / 'include'}", f"-I{EBPF}"]
    flags += os.environ.get("BPF_CFLAGS", "").split()
    triplet = multiarch(clang)
    if triplet and Path(f"/usr/include/{triplet}").is_dir():
        flags.append(f"-I/usr/include/{triplet}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [clang, *flags, "-c", str(source), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"build_bpf: {' '.join(cmd)}\n{res.stderr}")
    strip = os.environ.get("BPF_STRIP", "llvm-strip")
    if strip and shutil.which(strip):
        subprocess.run([strip, "-g", str(tmp)], check=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    print(build(target))
