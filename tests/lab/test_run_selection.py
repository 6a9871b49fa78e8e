"""The lab runner's default selection (`make lab`, part of `make test`) leaves out the guest
tests that only run when named, such as the nf flowtable side-by-side (`make lab-parity`)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("lab_run", Path(__file__).with_name("run.py"))
lab_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_run)
PARITY = "tests/lab/guest/test_flowtable_parity.py"
OPENWRT = "tests/lab/guest/test_openwrt.py"
IGNORED = [f"--ignore={PARITY}", f"--ignore={OPENWRT}"]


def test_default_selection_is_the_guest_tests_without_the_side_by_side():
    assert lab_run.guest_selection([]) == [lab_run.GUEST_TESTS, *IGNORED]
    assert lab_run.guest_selection(["-k", "flowtable"]) == [lab_run.GUEST_TESTS, "-k", "flowtable", *IGNORED]
    assert set(IGNORED) <= set(lab_run.guest_selection(["tests/lab/guest", "-x"]))


def test_naming_the_side_by_side_selects_it():
    assert lab_run.guest_selection([PARITY]) == [PARITY, f"--ignore={OPENWRT}"]
    assert lab_run.guest_selection([f"{PARITY}::test_every_transfer_arrives_byte_exact"]) == \
        [f"{PARITY}::test_every_transfer_arrives_byte_exact", f"--ignore={OPENWRT}"]
    assert lab_run.guest_selection([PARITY, OPENWRT]) == [PARITY, OPENWRT]


def test_every_explicit_only_file_exists():
    assert all((lab_run.REPO / p).is_file() for p in lab_run.EXPLICIT_ONLY)
