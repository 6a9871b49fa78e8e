"""pyflowd's files against a hostile local user and against corruption (root: files are
chowned and a child runs as uid 65534; no datapath is loaded).

- the state dir is root's alone (0700, files 0600, whatever the umask), so no other user
  can even open the lock files; a lock held by another process makes an operation fail
  after a bounded wait instead of stalling the control loop;
- a state dir, socket dir, pin dir or config file that another user owns or can write,
  or that is a symbolic link, is refused;
- a corrupt state or device file is moved aside (``*.corrupt``), never read as empty and
  overwritten; a file that cannot be read is not overwritten; writes are fsynced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyflow.daemon import main as pyflowd
from pyflow.daemon.config import ConfigError, load
from pyflow.daemon.devices import DEVICES_FILE, DeviceList
from pyflow.datapath.attach.pins import PinDir
from pyflow.datapath.attach.state import Attachment, State, StateFile
from pyflow.errors import PyflowError
from tests.pins import pin_dir

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, a uid 65534 child)")


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _state(tmp_path: Path) -> StateFile:
    return StateFile(tmp_path / "state" / "datapath.json")


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


# ---- item: the state dir is root's alone; the lock never stalls the loop ----------------

def test_state_dir_and_files_are_private_whatever_the_umask(tmp_path):
    store = _state(tmp_path)
    with umask(0):
        with store.locked() as st:
            st.devices[3] = Attachment("lan0", 3, "tc", 7, "asked for tc")
            store.write(st)
        devices = DeviceList([], store.path.parent)
        devices.runtime["wan0"] = "native"
        devices.save()
        daemon = pyflowd.Daemon(pyflowd.Config(), None, {}, pyflowd.Notifier({}))
        daemon._lock_state_dir(str(store.path.parent))
    try:
        assert _mode(store.path.parent) == 0o700
        for name in ("datapath.json", "datapath.json.lock", DEVICES_FILE, "pyflowd.pid"):
            assert _mode(store.path.parent / name) == 0o600, name
    finally:
        os.close(daemon._pid_fd)


def test_an_open_state_dir_is_closed_and_nobody_can_open_the_lock(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    os.chmod(tmp_path, 0o755)  # so that only the state dir's own mode stands in the way
    (state_dir / "datapath.json.lock").write_text("")
    os.chmod(state_dir / "datapath.json.lock", 0o644)
    code = (f"import fcntl\nf = open({str(state_dir / 'datapath.json.lock')!r})\n"
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('locked')")
    with _state(tmp_path).locked():
        pass
    # a caller's state file dir is left as it is (it may be /run), but the file is 0600
    assert _mode(state_dir) == 0o755 and _mode(state_dir / "datapath.json.lock") == 0o600
    res = as_nobody(code)
    assert res.returncode != 0 and "PermissionError" in res.stderr, res.stdout + res.stderr
    DeviceList([], state_dir).save()  # the daemon's own state dir: closed
    assert _mode(state_dir) == 0o700
    res = as_nobody(code)
    assert res.returncode != 0 and "PermissionError" in res.stderr, res.stdout + res.stderr


def test_a_held_lock_fails_the_operation_instead_of_blocking(tmp_path):
    store = _state(tmp_path)
    with store.locked():
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(store.lock_path)!r}, 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        outcome: list = []

        def operate() -> None:
            try:
                with store.locked():
                    outcome.append("ran")
            except PyflowError as exc:
                outcome.append(exc)

        t = threading.Thread(target=operate, daemon=True)
        t.start()
        t.join(20)  # the wait is bounded (about a second); 20 s leaves room on a busy machine
        assert not t.is_alive(), "the operation blocked on the lock"
        assert len(outcome) == 1 and "is locked by another process" in str(outcome[0])
    finally:
        holder.kill()
        holder.wait()
    with store.locked():  # released: works again
        pass


def test_a_second_daemon_or_a_held_pid_lock_fails_at_once(tmp_path):
    state_dir = tmp_path / "state"
    daemon = pyflowd.Daemon(pyflowd.Config(), None, {}, pyflowd.Notifier({}))
    with _state(tmp_path).locked():
        pass
    daemon._lock_state_dir(str(state_dir))
    try:
        started = time.monotonic()
        with pytest.raises(PyflowError, match=f"another pyflowd \\(pid {os.getpid()}\\)"):
            pyflowd.Daemon(pyflowd.Config(), None, {}, pyflowd.Notifier({}))._lock_state_dir(str(state_dir))
        assert time.monotonic() - started < 5
    finally:
        os.close(daemon._pid_fd)


# ---- item: ownership, modes and links of config, state, socket and pin dirs ------------

def test_a_config_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "pyflowd.toml"
    path.write_text('[[device]]\nname = "eth1"\n')
    os.chmod(path, 0o644)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load(str(path))
    os.chmod(path, 0o666)
    os.chown(path, 0, 0)
    with pytest.raises(ConfigError, match="writable by group or others"):
        load(str(path))


def test_a_foreign_or_linked_state_dir_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(PyflowError, match="owned by uid 65534"):
        with StateFile(foreign / "datapath.json").locked():
            pass
    with pytest.raises(OSError, match="owned by uid 65534"):
        DeviceList([], foreign).save()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    with pytest.raises(PyflowError, match="writable by group or others"):
        with StateFile(shared / "datapath.json").locked():
            pass
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PyflowError, match="symbolic link is not followed"):
        with StateFile(tmp_path / "link" / "datapath.json").locked():
            pass
    assert not list(real.iterdir()) and not list(foreign.iterdir())


def test_state_files_planted_as_links_are_not_followed(tmp_path):
    store = _state(tmp_path)
    with store.locked():
        pass
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    store.lock_path.unlink()
    store.lock_path.symlink_to(target)
    with pytest.raises(PyflowError, match="Too many levels of symbolic links"):
        with store.locked():
            pass
    assert target.read_text() == "keep\n"


def test_a_foreign_or_writable_socket_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(PyflowError, match="owned by uid 65534"):
        pyflowd._check_socket_dir(str(run))
    os.chown(run, 0, 0)
    os.chmod(run, 0o777)
    with pytest.raises(PyflowError, match="writable by group or others"):
        pyflowd._check_socket_dir(str(run))
    os.chmod(run, 0o755)
    pyflowd._check_socket_dir(str(run))


def test_a_planted_pin_dir_is_not_adopted():
    planted, link = pin_dir("planted"), pin_dir("plantlink")
    try:
        os.mkdir(planted, 0o755)
        os.chown(planted, NOBODY, NOBODY)  # as if uid 65534 had made it in world-writable /sys/fs/bpf
        with pytest.raises(PyflowError, match="owned by uid 65534"):
            PinDir(planted).prepare()
        os.chown(planted, 0, 0)
        os.symlink(planted, link)
        with pytest.raises(PyflowError, match="symbolic link is not followed"):
            PinDir(link).prepare()
        os.chmod(planted, 0o777)
        with pytest.raises(PyflowError, match="writable by group or others"):
            PinDir(planted).prepare()
        os.chmod(planted, 0o700)
        assert PinDir(planted).prepare() is False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(planted)


# ---- item: corrupt state is kept aside, never overwritten; writes are durable ----------

@pytest.mark.parametrize("text", [
    "[]", '{"version": 1, "devices": []}', '{"version": 1, "devices": {"3": {"ifname": 5}}}',
    '{"version": 1, "devices": {"x": {}}}', '{"version": 1, "slots": {"3": "a"}}', '{"version": true}',
    '{"version": 1, "devices": {"3": {"ifname": "a", "ifindex": 3, "mode": "tc", "prog_id": 1, ' + '"re',
])
def test_a_wrong_shaped_state_file_is_kept_aside(tmp_path, caplog, text):
    store = _state(tmp_path)
    store.path.parent.mkdir(mode=0o700)
    store.path.write_text(text)
    with caplog.at_level(logging.ERROR):
        with store.locked() as st:
            assert st.devices == {} and st.slots == {}
    aside = store.path.with_name("datapath.json.corrupt")
    assert aside.read_text() == text and not store.path.exists()
    assert f"{store.path} is corrupt" in caplog.text and str(aside) in caplog.text


def test_a_good_state_file_round_trips(tmp_path):
    store = _state(tmp_path)
    with store.locked() as st:
        st.devices[3] = Attachment("lan0", 3, "tc", 7, "asked for tc", own_clsact=True)
        st.slots[3], st.names[4] = 0, "wan0"
        store.write(st)
    with store.locked() as again:
        assert again == State({3: Attachment("lan0", 3, "tc", 7, "asked for tc", own_clsact=True)},
                              {3: 0}, {4: "wan0"})


def test_a_truncated_device_list_is_kept_aside_not_overwritten(tmp_path, caplog):
    full = {"version": 1, "devices": [{"name": "wan0", "mode": "tc"}, {"name": "wan1", "mode": "native"}]}
    text = json.dumps(full)[:-20]
    (tmp_path / DEVICES_FILE).write_text(text)
    with caplog.at_level(logging.ERROR):
        devices = DeviceList([], tmp_path)
    assert devices.runtime == {}
    devices.runtime["lan9"] = "auto"  # add-device
    devices.save()
    assert (tmp_path / (DEVICES_FILE + ".corrupt")).read_text() == text
    assert json.loads((tmp_path / DEVICES_FILE).read_text())["devices"] == [{"name": "lan9", "mode": "auto"}]
    assert "is corrupt" in caplog.text and DEVICES_FILE + ".corrupt" in caplog.text


def test_a_device_list_that_cannot_be_read_is_never_overwritten(tmp_path):
    raw = b'{"version": 1, "devices": [{"name": "wan0\xff"}]}'
    (tmp_path / DEVICES_FILE).write_bytes(raw)
    devices = DeviceList([], tmp_path)
    devices.runtime["lan9"] = "auto"
    with pytest.raises(OSError, match="could not be read"):
        devices.save()
    assert (tmp_path / DEVICES_FILE).read_bytes() == raw


def test_writes_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = _state(tmp_path)
    with store.locked() as st:
        store.write(st)
    state_dir = str(store.path.parent)
    assert any(p.startswith(state_dir + "/.datapath.json.tmp") for p in synced) and state_dir in synced
    synced.clear()
    DeviceList([], state_dir).save()
    assert any(DEVICES_FILE in p for p in synced) and state_dir in synced
