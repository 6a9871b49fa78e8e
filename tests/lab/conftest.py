"""The host's test run must not collect the guest tests: they run inside the kernel lab,
which the lab runner (tests/lab/run.py, ``make lab``) boots. Inside it the runner sets
PYFLOW_LAB=1."""

import os

collect_ignore = [] if os.environ.get("PYFLOW_LAB") == "1" else ["guest", "run.py"]
