"""The control socket protocol and pyflowctl's client side, against a server with a fake
handler (no root, no datapath): requests, errors, limits, concurrency, permissions."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from pyflow.cli import main as ctl
from pyflow.daemon.api import MAX_REQUEST, PROTOCOL_VERSION, ControlServer, parse_request
from pyflow.errors import RequestError


def handler(command, args):
    if command == "echo":
        return {"args": args}
    if command == "fail":
        raise RequestError("no_such_device", "no such device: eth9")
    if command == "crash":
        raise ValueError("boom")
    raise RequestError("unknown_command", f"unknown command {command!r}")


@pytest.fixture
def server(tmp_path):
    srv = ControlServer(str(tmp_path / "ctl.sock"), handler)
    srv.start()
    yield srv
    srv.stop()


def talk(path, *lines: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"".join(lines))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_is_private_by_default(server):
    assert os.stat(server.path).st_mode & 0o777 == 0o600


def test_requests_on_one_connection_each_get_an_answer(server):
    good = json.dumps({"version": 1, "command": "echo", "args": {"x": 1}}).encode() + b"\n"
    answers = talk(server.path, good, b"garbage\n", b"[1]\n", b'{"version": 9, "command": "echo"}\n',
                   b'{"version": 1}\n', b'{"version": 1, "command": "nope"}\n',
                   b'{"version": 1, "command": "fail"}\n', b'{"version": 1, "command": "crash"}\n', good)
    assert [a["version"] for a in answers] == [PROTOCOL_VERSION] * 9
    assert answers[0] == {"version": 1, "ok": True, "result": {"args": {"x": 1}}}
    codes = [a["error"]["code"] for a in answers[1:8]]
    assert codes == ["bad_request", "bad_request", "bad_version", "bad_request", "unknown_command",
                     "no_such_device", "internal"]
    assert answers[6]["error"]["message"] == "no such device: eth9"
    assert answers[8]["ok"] is True  # the connection kept working after every error


def test_oversized_request_is_refused_and_the_server_carries_on(server):
    answers = talk(server.path, b"x" * (MAX_REQUEST + 10))
    error = {"code": "too_large", "message": f"request longer than {MAX_REQUEST} bytes"}
    assert answers == [{"version": 1, "ok": False, "error": error}]
    assert ctl.request(server.path, "echo", {"y": 2}) == {"args": {"y": 2}}


def test_many_concurrent_clients(server):
    results: list = []
    errors: list = []

    def client(n):
        try:
            for i in range(20):
                results.append(ctl.request(server.path, "echo", {"n": n, "i": i})["args"]["i"] == i)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 320 and all(results)


def test_peer_credentials_decide():
    srv = ControlServer("/nonexistent/x.sock", handler)
    assert srv.allowed(1, 0, 0) and not srv.allowed(1, 65534, 65534)
    grouped = ControlServer("/nonexistent/x.sock", handler, group="nogroup")
    assert grouped.allowed(1, 65534, 65534)  # nogroup's gid as primary group
    assert not grouped.allowed(os.getpid(), 1000, 1000)


def test_a_second_server_does_not_take_over_a_live_socket(server):
    other = ControlServer(server.path, handler)
    with pytest.raises(OSError, match="another pyflowd is serving"):
        other.bind()
    other.stop()  # must not remove the live server's socket
    assert ctl.request(server.path, "echo") == {"args": {}}


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    srv = ControlServer(path, handler)
    srv.start()
    try:
        assert ctl.request(path, "echo") == {"args": {}}
    finally:
        srv.stop()
    assert not os.path.exists(path)


def test_parse_request_args_must_be_an_object():
    with pytest.raises(RequestError, match="args"):
        parse_request(b'{"version": 1, "command": "x", "args": [1]}')


def test_ctl_without_daemon_says_so(tmp_path, capsys):
    path = str(tmp_path / "none.sock")
    assert ctl.main(["--socket", path, "status"]) == 1
    assert capsys.readouterr().err == f"pyflowd is not running (no socket at {path})\n"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["add-device"], ["add-device", "eth1", "--mode", "fast"],
                                  ["flows", "--limit", "x"], ["flows", "--port", "0"],
                                  ["flows", "--proto", "icmp"]])
def test_ctl_usage_errors_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ctl.main(["--socket", str(tmp_path / "s"), *argv])
    assert exc.value.code == 2


def test_table_aligns_columns():
    out = ctl.table(["A", "BB", "C"], [["xxx", 1, None], ["y", 22222, "z"]]).splitlines()
    assert out == ["A    BB     C", "xxx  1      -", "y    22222  z"]


def test_notifier_speaks_sd_notify(tmp_path):
    from pyflow.daemon.main import Notifier

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        assert n.watchdog_s == 3.0
        n.notify("READY=1", "STATUS=running")
        assert listener.recv(100) == b"READY=1\nSTATUS=running"
    abstract = Notifier({"NOTIFY_SOCKET": "@pyflow-test", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"})
    assert abstract.address == "\0pyflow-test" and abstract.watchdog_s is None  # another pid's watchdog
    silent = Notifier({})
    assert silent.address is None and silent.watchdog_s is None
    silent.notify("READY=1")  # no socket: nothing happens, nothing raises
