"""The loader's fixtures for the datapath tests (a namespace with veths, a pin directory,
Datapath instances, a routed line); the compiled datapath is tests/conftest.py's."""

from tests.support.datapath import make_dp, ns, pin_dir, routed  # noqa: F401 - offered to this directory
