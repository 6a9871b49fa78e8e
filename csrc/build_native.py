"""cffi builder for ``pyflow._native``: the ABI header plus the csrc/ helper.

The cdef is read from ``ebpf/include/pyflow_abi.h`` and ``csrc/pyflow_native.h``
themselves, so no layout is ever declared twice. Preprocessor lines are dropped
(cffi parses declarations, not directives); every ``#define PYFLOW_*`` becomes a
cffi constant whose value the C compiler supplies from the real header. In API
mode cffi also checks at build time that its idea of each struct matches the
compiler's, so a header cffi misreads fails the build instead of the datapath.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
ABI_HEADER = ROOT / "ebpf" / "include" / "pyflow_abi.h"
NATIVE_HEADER = ROOT / "csrc" / "pyflow_native.h"
NATIVE_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c"))

_DEFINE = re.compile(r"^#define\s+(PYFLOW_\w+)\s+(\S.*?)\s*(?:/\*.*)?$")
_KERNEL_TYPES = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef uint16_t __be16; typedef uint32_t __be32;
"""


def declarations(header: Path) -> str:
    """The header's C declarations and PYFLOW_* constants, as cffi's cdef wants them."""
    decls, consts = [], []
    for line in header.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            decls.append(line)
            continue
        m = _DEFINE.match(stripped)
        if not m or m.group(1).endswith("_H"):
            continue
        name, value = m.groups()
        if value.startswith('"'):
            consts.append(f"static const char *const {name};")
        else:
            consts.append(f"#define {name} ...")
    return "\n".join(decls + sorted(set(consts)))


def multiarch_include() -> list[str]:
    """/usr/include/<triplet> of the build host (asm/ for <linux/types.h>), when the
    compiler does not search it itself."""
    for cmd in (["gcc", "-print-multiarch"], ["dpkg-architecture", "-qDEB_HOST_MULTIARCH"]):
        try:
            triplet = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if triplet and Path(f"/usr/include/{triplet}").is_dir():
            return [f"/usr/include/{triplet}"]
    return []


def make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(_KERNEL_TYPES + declarations(ABI_HEADER) + declarations(NATIVE_HEADER))
    ffi.set_source(
        "pyflow._native",
        '#include "pyflow_abi.h"\n#include "pyflow_native.h"\n',
        sources=NATIVE_SOURCES,  # relative: setuptools refuses absolute source paths
        include_dirs=[str(ABI_HEADER.parent), str(NATIVE_HEADER.parent), *multiarch_include()],
        # libbpf: csrc/loader.c (the prebuilt datapath object); libmnl: csrc/ctfeed.c (ctnetlink)
        libraries=["bpf", "mnl"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True)
