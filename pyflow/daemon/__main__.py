"""python -m pyflow.daemon: the pyflowd daemon."""

import sys

from pyflow.daemon.main import main

sys.exit(main())
