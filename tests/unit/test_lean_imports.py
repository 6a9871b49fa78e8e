"""The daemon's modules import only the parts of pyroute2 they use (pyflow.daemon.footprint,
run by the daemon package), and code that wants the whole package still gets it. Each case runs in a
fresh interpreter: what is imported is a property of the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_daemon_modules_leave_pyroute2s_other_apis_unimported():
    out = _run("import sys\n"
               "import pyflow.daemon.main, pyflow.daemon.api\n"
               "import pyflow.daemon.metrics, pyflow.daemon.operations\n"
               "from pyroute2.iproute import IPRoute\n"
               "print(sorted(m for m in ('pyroute2.ndb', 'pyroute2.ipdb', 'pyroute2.plan9', 'sqlite3')"
               " if m in sys.modules))")
    assert out == "[]"


def test_the_whole_package_is_there_for_who_asks():
    out = _run("import pyflow.daemon\n"
               "from pyroute2 import IPRoute, NDB\n"
               "import pyroute2, pyroute2.iproute\n"
               "from pyroute2 import protocols\n"
               "print(pyroute2.IPRoute is IPRoute is pyroute2.iproute.IPRoute, pyroute2.__version__ != '',"
               " protocols.__name__)")
    assert out == "True True pyroute2.protocols"
