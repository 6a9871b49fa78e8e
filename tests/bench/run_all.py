"""`make bench`: run every benchmark script in this folder, in one go, and keep their output.

Each bench_*.py prints its own table and writes JSON under bench-results/; this
runner only sequences them, saves what they print to bench-results/<name>.txt and
fails if any of them fails. Extra arguments (e.g. --quick) are passed to each.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent.parent / "bench-results"


def main(argv: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
        (OUT / f"{script.stem}.txt").write_text(proc.stdout + proc.stderr)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stdout.write(proc.stderr)
            failed.append(script.name)
        print(f"== {script.name}: exit {proc.returncode}, {time.monotonic() - t0:.0f} s\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
