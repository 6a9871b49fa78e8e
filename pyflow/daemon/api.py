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

Limits, so that no local user can stall the socket for the others: one thread per
client, at most ``MAX_CLIENTS`` at once, of which ``ROOT_RESERVED`` only for uid 0, and
at most ``MAX_PER_UID`` per other uid (more are answered "busy" and closed). A connection
may wait ``IDLE_TIMEOUT`` seconds for its next request to begin; a request must then
arrive whole (first byte to newline) within ``REQUEST_TIMEOUT`` seconds, however the bytes
trickle in. A refused peer gets its answer and is read for at most ``REFUSE_DRAIN_S``
seconds, by at most ``MAX_REFUSING`` threads (beyond that it is closed at once). A client
thread that cannot be started (task limit) is answered "busy", and failing accepts
(descriptor limit) back off instead of spinning: neither ends the accept loop. Requests
are executed by a handler the daemon provides (it runs them inside the control loop).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pyflow.errors import RequestError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 64  # connections served at once, every peer together
ROOT_RESERVED = 4  # of those, kept for uid 0: other users together cannot lock root out
MAX_PER_UID = 8  # connections one uid other than 0 may hold at once
IDLE_TIMEOUT = 60.0  # seconds a connection may wait for its next request to begin
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its newline (and for its answer)
REFUSE_DRAIN_S = 1.0  # how long a refused peer's unread data is read before closing
MAX_REFUSING = 8  # refused peers drained at once; more are closed without draining
ACCEPT_BACKOFF_MAX_S = 1.0  # the longest pause between accepts that keep failing
# accept() errors about the one connection (it went away first): try the next at once
_ACCEPT_RETRY = frozenset((errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EAGAIN))
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
    except RecursionError:  # 60k '[' fit in one request line and overflow the decoder's stack
        raise RequestError("bad_request", "request is not JSON: nested too deeply") from None
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
        self._clients: dict[socket.socket, int] = {}  # served connection -> its peer's uid
        self._per_uid: dict[int, int] = {}
        self._refusing = 0  # threads draining refused peers
        self._lock = threading.Lock()
        self.credentials = peer_credentials  # (pid, uid, gid) of a connection's peer

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
        backoff = 0.0
        while not self._stopping.is_set():
            if backoff:
                self._stopping.wait(backoff)
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _ACCEPT_RETRY:
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the backlog;
                # retrying at once would spin a core until a descriptor frees up
                if not backoff:
                    log.warning("control socket: accept failed (%s); backing off", exc.strerror or exc)
                backoff = min(max(backoff * 2, 0.01), ACCEPT_BACKOFF_MAX_S)
                continue
            try:
                started = self._admit(conn)
            except Exception:  # noqa: BLE001 - one connection's failure must not end the accept loop
                log.exception("control socket: cannot take a connection")
                conn.close()
                started = False
            backoff = 0.0 if started else min(max(backoff * 2, 0.01), ACCEPT_BACKOFF_MAX_S)

    def _admit(self, conn: socket.socket) -> bool:
        """Check the peer and the limits, then hand ``conn`` to a thread of its own; a
        refused peer gets its answer. False if a thread could not be started (the caller
        backs off)."""
        try:
            pid, uid, gid = self.credentials(conn)
        except OSError:
            conn.close()  # gone already
            return True
        if not self.allowed(pid, uid, gid):
            who = "root" if self.gid is None else f"root or group {self.gid}"
            log.warning("control socket: refused uid %d (pid %d): only %s may connect", uid, pid, who)
            return self._refuse(conn, response_error("permission_denied",
                                                     f"permission denied: uid {uid} is not {who}"))
        with self._lock:
            full = self._full(uid)
            if full is None:
                self._clients[conn] = uid
                self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        if full is not None:
            return self._refuse(conn, response_error("busy", full))
        try:
            self._spawn(self._serve, conn, "pyflow-client")
        except RuntimeError as exc:  # "can't start new thread": the task limit
            self._release(conn)
            log.warning("control socket: cannot start a client thread (%s): answered busy", exc)
            self._last_word_now(conn, response_error("busy", "pyflowd cannot start a thread for this "
                                                             "client now; try again"))
            return False
        return True

    def _full(self, uid: int) -> str | None:
        """Why a new connection of ``uid`` finds no room, or None (under the lock)."""
        if len(self._clients) >= MAX_CLIENTS:
            return f"too many clients (at most {MAX_CLIENTS})"
        if uid == 0:
            return None
        if len(self._clients) >= MAX_CLIENTS - ROOT_RESERVED:
            return f"too many clients (the last {ROOT_RESERVED} are kept for root)"
        if self._per_uid.get(uid, 0) >= MAX_PER_UID:
            return f"too many clients of uid {uid} (at most {MAX_PER_UID} each)"
        return None

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            uid = self._clients.pop(conn, None)
            if uid is not None:
                left = self._per_uid.get(uid, 1) - 1
                if left > 0:
                    self._per_uid[uid] = left
                else:
                    self._per_uid.pop(uid, None)

    @staticmethod
    def _spawn(target: Callable[[socket.socket], None], conn: socket.socket, name: str) -> None:
        threading.Thread(target=target, args=(conn,), name=name, daemon=True).start()

    def _refuse(self, conn: socket.socket, answer: bytes) -> bool:
        """Answer a refused peer and close: drained by a thread of its own (bounded in time
        and in number), else at once. False if a thread could not be started."""
        with self._lock:
            room = self._refusing < MAX_REFUSING
            if room:
                self._refusing += 1
        if room:
            try:
                self._spawn(lambda c: self._drain_refused(c, answer), conn, "pyflow-refuse")
                return True
            except RuntimeError:
                with self._lock:
                    self._refusing -= 1
                self._last_word_now(conn, answer)
                return False
        self._last_word_now(conn, answer)
        return True

    def _drain_refused(self, conn: socket.socket, answer: bytes) -> None:
        try:
            self._last_word(conn, answer)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self._refusing -= 1

    @staticmethod
    def _last_word_now(conn: socket.socket, answer: bytes) -> None:
        """The answer without waiting for anything (no thread to wait in): what the client
        sent already is read so that closing does not reset the connection over it."""
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(answer)
            conn.shutdown(socket.SHUT_WR)
            for _ in range(16):
                if not conn.recv(65536):
                    break
        conn.close()

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        if self.gid is None:
            return False
        return gid == self.gid or self.gid in _supplementary_groups(pid)

    def _serve(self, conn: socket.socket) -> None:
        try:
            buf = b""
            # the time by which the next line must be complete: IDLE_TIMEOUT for a request to
            # begin, then REQUEST_TIMEOUT from its first byte, not renewed by later bytes
            deadline = time.monotonic() + IDLE_TIMEOUT
            while not self._stopping.is_set():
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_REQUEST:
                        self._refuse_oversized(conn)
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if buf:
                            self._timed_out(conn)
                        return
                    conn.settimeout(left)
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    if not buf:
                        deadline = time.monotonic() + REQUEST_TIMEOUT
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1:]
                if len(line) > MAX_REQUEST:
                    self._refuse_oversized(conn)
                    return
                if line.strip():
                    answer = self._answer(line)
                    conn.settimeout(REQUEST_TIMEOUT)  # a client that does not read its answer
                    conn.sendall(answer)
                deadline = time.monotonic() + (REQUEST_TIMEOUT if buf else IDLE_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the client went away or idled out: nothing to answer
        finally:
            self._release(conn)
            conn.close()

    def _timed_out(self, conn: socket.socket) -> None:
        self._last_word_now(conn, response_error(
            "timeout", f"request not complete within {REQUEST_TIMEOUT:.0f} s of its first byte"))

    @staticmethod
    def _refuse_oversized(conn: socket.socket) -> None:
        answer = response_error("too_large", f"request longer than {MAX_REQUEST} bytes")
        ControlServer._last_word(conn, answer)

    @staticmethod
    def _last_word(conn: socket.socket, answer: bytes) -> None:
        """Send a final answer, then read what the client still sends before the caller
        closes: closing with unread data makes the kernel reset the connection, and the
        client would lose the answer. Bounded in bytes and in time as a whole (REFUSE_DRAIN_S),
        not per read: a peer trickling bytes is not waited for."""
        deadline = time.monotonic() + REFUSE_DRAIN_S
        conn.settimeout(REFUSE_DRAIN_S)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < 16 * MAX_REQUEST:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
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
