"""The control socket under a hostile or broken peer (no root, no datapath): a thread that
cannot be started or failing accepts do not end the accept loop; a slow client cannot hold
a connection by trickling bytes; one uid cannot take every slot and root keeps one; a
refused peer is drained for a bounded time only."""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import socket
import threading
import time

import pytest

from pyflow.daemon import api
from pyflow.daemon.api import ControlServer

ECHO = json.dumps({"version": 1, "command": "echo"}).encode() + b"\n"
_names = itertools.count()


def handler(command, args):
    return {"command": command}


def _uid_of_peer(conn: socket.socket) -> tuple[int, int, int]:
    """The tests' peer credentials: a client binds to an abstract name carrying the uid it
    plays (one process cannot have connections of several uids otherwise)."""
    name = conn.getpeername()
    uid = int(name.split(b"-")[2]) if isinstance(name, bytes) and name.startswith(b"\0pft-") else 0
    return os.getpid(), uid, uid


def connect(path: str, uid: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind(f"\0pft-uid-{uid}-{os.getpid()}-{next(_names)}")
    s.connect(path)
    return s


def ask(s: socket.socket) -> dict:
    """One echo request and its answer (ok, or the error the server gave instead)."""
    s.sendall(ECHO)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data.splitlines()[0])


def closed_within(s: socket.socket, seconds: float, trickle: bytes = b"", *, eof: bool = True) -> bool:
    """Whether the server closes ``s`` within ``seconds`` while the client sends one byte of
    ``trickle`` every 0.1 s (polled: bounded in count and time). ``eof``: an end of the
    server's data counts as closed (not after a shutdown of its sending side: then only a
    send that fails does)."""
    s.setblocking(False)
    deadline = time.monotonic() + seconds
    for i in range(int(seconds / 0.1) + 1):
        if trickle:
            try:
                s.send(trickle[i % len(trickle):][:1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            except BlockingIOError:
                pass
        ready, _, _ = select.select([s], [], [], 0.1)
        if not eof:
            time.sleep(0.1 if ready else 0)  # EOF stays readable: do not spin on it
        elif ready:
            try:
                while s.recv(65536):
                    pass
                return True  # EOF
            except BlockingIOError:
                pass  # an answer came, the connection stays
            except ConnectionResetError:
                return True
        if time.monotonic() > deadline:
            break
    return False


@pytest.fixture
def fake_peers(monkeypatch):
    monkeypatch.setattr(api, "peer_credentials", _uid_of_peer)


@pytest.fixture
def server(tmp_path, fake_peers):
    srv = ControlServer(str(tmp_path / "ctl.sock"), handler)
    srv.start()
    yield srv
    srv.stop()


# ---- the accept loop survives -------------------------------------------------------------

def test_a_thread_that_cannot_start_does_not_end_the_accept_loop(server, monkeypatch):
    real = threading.Thread
    failing = threading.Event()

    class TaskLimit(real):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            if failing.is_set():
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threading, "Thread", TaskLimit)
    failing.set()
    with connect(server.path) as first:
        try:
            answer = ask(first)
        except (OSError, ValueError, IndexError):
            answer = {}
        assert answer.get("ok") is not True  # no thread for it: refused one way or another
    failing.clear()
    with connect(server.path) as second:
        assert ask(second) == {"version": 1, "ok": True, "result": {"command": "echo"}}


class FailingAccepts:
    """The listening socket, its accept() failing with EMFILE for ``window`` seconds."""

    def __init__(self, sock: socket.socket, window: float):
        self.sock, self.until, self.calls = sock, time.monotonic() + window, 0

    def accept(self):
        if time.monotonic() < self.until:
            self.calls += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.sock.accept()

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_failing_accepts_back_off_instead_of_spinning(tmp_path, fake_peers):
    srv = ControlServer(str(tmp_path / "ctl.sock"), handler)
    srv.bind()
    assert srv._sock is not None
    flaky = FailingAccepts(srv._sock, 1.0)
    srv._sock = flaky  # type: ignore[assignment]
    srv.start()
    try:
        with connect(srv.path) as s:  # waits in the backlog meanwhile, answered after
            assert ask(s)["ok"] is True
        assert 0 < flaky.calls < 100, flaky.calls  # a tight loop makes hundreds of thousands
    finally:
        srv.stop()


# ---- slow and greedy clients --------------------------------------------------------------

def test_a_trickling_client_is_dropped_at_its_request_deadline(server, monkeypatch):
    monkeypatch.setattr(api, "REQUEST_TIMEOUT", 0.5, raising=False)
    with connect(server.path) as slow:
        # one byte every 0.1 s of a request that never ends: each byte once reset the timeout
        assert closed_within(slow, 8.0, trickle=b'{"version": 1, "command": "echo", "args": {"x": "'
                                                  + b"a" * 200)
    with connect(server.path) as s:
        assert ask(s)["ok"] is True


def test_one_uid_cannot_take_every_slot_and_root_keeps_one(server, monkeypatch):
    monkeypatch.setattr(api, "MAX_CLIENTS", 8)
    monkeypatch.setattr(api, "MAX_PER_UID", 3, raising=False)
    monkeypatch.setattr(api, "ROOT_RESERVED", 1, raising=False)
    monkeypatch.setattr(ControlServer, "allowed", lambda self, pid, uid, gid: True)
    held = []
    try:
        answers = []
        for _ in range(5):
            s = connect(server.path, uid=1000)
            held.append(s)
            answers.append(ask(s))
        codes = [a["error"]["code"] if not a["ok"] else "ok" for a in answers]
        assert codes == ["ok", "ok", "ok", "busy", "busy"], codes
        for uid in (1001, 1001, 1001, 1002):  # 7 held: the 8th slot is root's
            s = connect(server.path, uid=uid)
            held.append(s)
            assert ask(s)["ok"] is True
        s = connect(server.path, uid=1003)
        held.append(s)
        assert ask(s)["error"]["code"] == "busy"
        s = connect(server.path, uid=0)
        held.append(s)
        assert ask(s)["ok"] is True
    finally:
        for s in held:
            s.close()


def test_a_refused_peer_is_drained_for_a_bounded_time(server, monkeypatch):
    monkeypatch.setattr(api, "REFUSE_DRAIN_S", 0.5, raising=False)
    with connect(server.path, uid=65534) as outsider:  # not root, no socket group: refused
        answer = ask(outsider)
        assert answer["error"]["code"] == "permission_denied"
        # it keeps sending one byte every 0.1 s: each byte once renewed a 1 s drain timeout
        assert closed_within(outsider, 8.0, trickle=b"x", eof=False)
