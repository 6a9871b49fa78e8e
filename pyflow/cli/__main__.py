"""python -m pyflow.cli: pyflowctl."""

import sys

from pyflow.cli.main import main

sys.exit(main())
