"""Fixtures used by more than one test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", params=["prebuilt", "bcc"])
def datapath(request) -> Iterator:
    """The datapath loaded once per session and build for both hooks, for the packet table
    (tests/datapath) and the fuzz test (tests/fuzz): the prebuilt object (libbpf, the
    default) and bcc's compile of the same source (bcc takes seconds), so every packet
    test holds for both."""
    from tests.support import testrun  # compiles nothing until asked; keeps collection light

    yield from testrun.load(request.param)
