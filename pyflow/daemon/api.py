"""The control socket: line-delimited JSON over a Unix stream socket.

A request is one line, a JSON object::

    {"version": 1, "command": "flows", "args": {"limit": 10}}

and every request gets one response line::

    {"version": 1, "ok": true, "result": {...}}
    {"version": 1, "ok": false, "error": {"code": "no_such_device", "message": "no such device: eth9"}}

A client may send many requests on one connection. A malformed line (not JSON, not an
object, a missing or unsupported version, an unknown command) gets an error response
and the connection stays usable; a line longer than ``MAX_REQUEST`` bytes gets an error
response and the connection is closed (its end cannot be found without reading it all).

Access: the socket file is mode 0600 (root only) or, with a socket group, 0660 owned
by that group; on top of the file mode every peer's credentials are checked with
SO_PEERCRED when it connects (uid 0, or the group as its primary or a supplementary
group), so a process that gets past the file mode some other way (CAP_DAC_OVERRIDE, an
inherited descriptor of a connected socket is not a new connection) is still refused.

One thread per client, at most ``MAX_CLIENTS`` at once (more are answered "busy" and
closed); a client idle for ``IDLE_TIMEOUT`` seconds is dropped. Requests are executed
by a handler the daemon provides (it runs them inside the control loop).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyflow.errors import RequestError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 64
IDLE_TIMEOUT = 60.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


def response_ok(result: Any) -> bytes:
    return _line({"version": PROTOCOL_VERSION, "ok": True, "result": result})


def response_error(code: str, message: str) -> bytes:
    return _line({"version": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}})


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """(command, args) of one request line; RequestError(bad_request) if it is not one."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("bad_request", f"request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError("bad_request", "request must be a JSON object")
    version = req.get("version")
    # type first: JSON true equals 1 in Python and must not pass for version 1
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RequestError("bad_version", f"unsupported protocol version {version!r}: this pyflowd speaks "
                                      f"{PROTOCOL_VERSION}")
    command = req.get("command")
    if not isinstance(command, str):
        raise RequestError("bad_request", "request needs a \"command\" string")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise RequestError("bad_request", "\"args\" must be a JSON object")
    return command, args


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    """Serves the control socket at ``path`` in threads of its own."""

    def __init__(self, path: str, handler: Handler, *, group: str = ""):
        self.path = path
        self.handler = handler
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket file (mode set before anyone can connect). Refuses to take over
        the socket of a pyflowd that answers; removes a stale one."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # nobody listens: left by a process that died
            else:
                raise OSError(f"another pyflowd is serving {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the file is born 0600: no window where others may connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)  # the group only: needs no CAP_CHOWN if we are in it
            os.chmod(self.path, 0o660)
        sock.listen(64)
        self._sock = sock

    def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._accept_loop, name="pyflow-ctlsock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the socket and remove its file (only if this server made it: a failed
        bind must not remove the socket of the pyflowd that holds it)."""
        self._stopping.set()
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ---- serving --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                busy = len(self._clients) >= MAX_CLIENTS
                if not busy:
                    self._clients.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.sendall(response_error("busy", f"too many clients (at most {MAX_CLIENTS})"))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="pyflow-client", daemon=True).start()

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        if self.gid is None:
            return False
        return gid == self.gid or self.gid in _supplementary_groups(pid)

    def _serve(self, conn: socket.socket) -> None:
        try:
            pid, uid, gid = peer_credentials(conn)
            if not self.allowed(pid, uid, gid):
                who = "root" if self.gid is None else f"root or group {self.gid}"
                log.warning("control socket: refused uid %d (pid %d): only %s may connect", uid, pid, who)
                self._last_word(conn, response_error("permission_denied",
                                                     f"permission denied: uid {uid} is not {who}"))
                return
            conn.settimeout(IDLE_TIMEOUT)
            buf = b""
            while not self._stopping.is_set():
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_REQUEST:
                        self._refuse_oversized(conn)
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1:]
                if len(line) > MAX_REQUEST:
                    self._refuse_oversized(conn)
                    return
                if line.strip():
                    conn.sendall(self._answer(line))
        except (OSError, TimeoutError):
            pass  # the client went away or idled out: nothing to answer
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    @staticmethod
    def _refuse_oversized(conn: socket.socket) -> None:
        answer = response_error("too_large", f"request longer than {MAX_REQUEST} bytes")
        ControlServer._last_word(conn, answer)

    @staticmethod
    def _last_word(conn: socket.socket, answer: bytes) -> None:
        """Send a final answer, then read what the client still sends (bounded) before the
        caller closes: closing with unread data makes the kernel reset the connection,
        and the client would lose the answer."""
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        drained = 0
        while drained < 16 * MAX_REQUEST:
            chunk = conn.recv(65536)
            if not chunk:
                return
            drained += len(chunk)

    def _answer(self, line: bytes) -> bytes:
        try:
            command, args = parse_request(line)
            return response_ok(self.handler(command, args))
        except RequestError as exc:
            return response_error(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the daemon
            log.exception("control request failed")
            return response_error("internal", f"internal error: {exc}")
