"""Fixtures for the fuzz test: the compiled datapath of tests/datapath, reused as it is.

tests/datapath/conftest.py is loaded under its own module name (two files called
conftest cannot share one) and its session fixture re-exported here, so both
test directories load the datapath the same way; tests/datapath also goes on
sys.path for its packet-building helpers (packets.py) and verdict codes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DATAPATH_TESTS = Path(__file__).resolve().parent.parent / "datapath"
if str(DATAPATH_TESTS) not in sys.path:
    sys.path.insert(0, str(DATAPATH_TESTS))

_NAME = "pyflow_tests_datapath_conftest"
_spec = importlib.util.spec_from_file_location(_NAME, DATAPATH_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None, f"cannot load {DATAPATH_TESTS / 'conftest.py'}"
_datapath_conftest = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = _datapath_conftest  # dataclasses look their module up while the file runs
_spec.loader.exec_module(_datapath_conftest)

datapath = _datapath_conftest.datapath
