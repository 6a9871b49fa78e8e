"""Fixtures used by more than one test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def datapath() -> Iterator:
    """The datapath compiled once per session (bcc takes seconds) and loaded for both hooks,
    for the packet table (tests/datapath) and the fuzz test (tests/fuzz)."""
    from tests.support import testrun  # compiles nothing until asked; keeps collection light

    yield from testrun.load()
