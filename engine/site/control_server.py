"""The control socket's server: the site's state, events and actions for consoles and scripts.

It listens on a Unix domain socket that only its own user (and root) may use: the folder and the
socket are owner-only, and every connection's peer credentials are checked. It sends each
connection a ``hello``, then a snapshot of the site's state, then every event about the site as it
happens; it takes the console's actions and answers each with a reply
(``engine.site.control_protocol`` has the wire format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.events import Event, EventBus, GpuSampled
from engine.site.actions import SiteActions
from engine.site.control_protocol import ACTIONS, MAX_LINE, PROTOCOL
from engine.site.lock import ActionError, ServiceError, private_dir
from engine.site.state import SiteState

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)

# What waits for one slow console (one stopped with Ctrl-Z): past this it is dropped, and may
# attach again for a fresh snapshot.
MAX_QUEUED_BYTES = 8 << 20
MAX_CONNECTIONS = 32
ACTION_WAIT_S = 30.0  # how long a closing connection or a stopping service waits for actions


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class _Connection:
    """One attached console or script: an outgoing queue with its own writer thread."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self.closed = False  # nothing more is queued; the writer flushes what is, then closes
        self.actions = 0  # actions of this connection still running
        self.writer: threading.Thread | None = None

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode()
        with self._cond:
            if self.closed:
                return
            if self._queued + len(line) > MAX_QUEUED_BYTES:
                log.warning("control: %s reads too slowly; dropping it", self.name)
                self._drop_locked()
                return
            self._queue.append(line)
            self._queued += len(line)
            self._cond.notify_all()

    def _drop_locked(self) -> None:
        self.closed = True
        self._queue.clear()
        self._queued = 0
        self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Cuts the connection now (what is queued is lost)."""
        with self._cond:
            self._drop_locked()

    def finish(self) -> None:
        """Closes after the writer has sent what is queued (replies included)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def action_started(self) -> None:
        with self._cond:
            self.actions += 1

    def action_done(self) -> None:
        with self._cond:
            self.actions -= 1
            self._cond.notify_all()

    def wait_actions(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.actions > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self.closed:
                        self._cond.wait()
                    if not self._queue:  # closed and flushed
                        break
                    batch = b"".join(self._queue)
                    self._queue.clear()
                    self._queued = 0
                self.sock.sendall(batch)
            # Flushed. Half-close, and discard what the peer still sends for a moment: closing
            # with unread data would reset the connection and lose our last lines (a refusal).
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(0.2)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            with self._cond:
                self.closed = True
                self._queue.clear()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()


class ControlServer:
    """Serves the site's state, events and actions on a Unix socket (see ``control_protocol``).

    Args:
        path: the socket path (its folder must be owner-only; see ``private_dir``).
        bus: the engine's bus; every event about the site goes to every connection.
        actions: what the actions run on.
        hello: what the service says about itself first (pid, site, mode, ...).
        on_shutdown: called (once, on its own thread) when a client asks the service to stop.
        site: the site whose state is kept (events about other sites are not sent).
        allowed_uids: users who may connect (default: this process's user and root).
    """

    def __init__(
        self,
        path: Path,
        bus: EventBus,
        actions: SiteActions,
        hello: dict[str, Any],
        on_shutdown: Callable[[], None],
        site: str = "",
        allowed_uids: set[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.bus = bus
        self.actions = actions
        self.hello = {"type": "hello", "protocol": PROTOCOL, **hello}
        self.on_shutdown = on_shutdown
        self.allowed_uids = allowed_uids if allowed_uids is not None else {os.getuid(), 0}
        self.state = SiteState(site=site)
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._stopping = threading.Event()  # a shutdown was asked: no new actions
        self._actions: set[threading.Thread] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self.refused = 0
        self.bye_reason = "the site service stopped"

    # -- state and events

    def _on_event(self, event: Event) -> None:
        with self._lock:
            changed = self.state.apply(event)
            if not changed and not isinstance(event, GpuSampled):
                return  # not about this site: consoles would drop it too
            if not self._conns:
                return
            message = {"type": "event", "event": event.to_dict()}
            for conn in self._conns:
                conn.send(message)

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.closed)

    # -- lifecycle

    def start(self) -> None:
        """Binds and listens; raises ServiceError naming the socket when it cannot."""
        private_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed service (we hold the workspace lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ServiceError(f"cannot open the control socket {self.path}: {exc}") from None
        finally:
            os.umask(old)
        self._sock = sock
        self._unsubscribe = self.bus.subscribe(self._on_event)
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()
        log.info("control socket %s", self.path)

    def close(self) -> None:
        """Stops taking connections; lets running actions end (a while); closes every one."""
        self._stopping.set()
        self._closed.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
        deadline = time.monotonic() + ACTION_WAIT_S
        for thread in list(self._actions):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            conns, self._conns = list(self._conns), []
        for conn in conns:  # consoles hear that the service ended, rather than lost
            conn.send({"type": "bye", "reason": self.bye_reason})
            conn.finish()
        # The writers are daemon threads: let them deliver the goodbyes before this process ends.
        deadline = time.monotonic() + 3.0
        for conn in conns:
            if conn.writer is not None:
                conn.writer.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError, OSError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(sock,), name="control-conn", daemon=True
            ).start()

    # -- one connection

    def _refuse(self, conn: _Connection, error: str) -> None:
        conn.send({"type": "refused", "error": error})
        conn.finish()

    def _serve(self, sock: socket.socket) -> None:
        try:
            uid = _peer_uid(sock)
        except OSError:
            sock.close()
            return
        conn = _Connection(sock, f"uid {uid}")
        conn.writer = threading.Thread(target=conn.write_loop, name="control-write", daemon=True)
        conn.writer.start()
        if uid not in self.allowed_uids:
            self.refused += 1
            log.warning("control: refused a connection from uid %d", uid)
            self._refuse(
                conn,
                f"this site service belongs to uid {os.getuid()}; uid {uid} may not control it",
            )
            return
        with self._lock:  # snapshot and registration under one lock: no event lost or doubled
            if len(self._conns) >= MAX_CONNECTIONS:
                self._refuse(conn, f"the site service has {MAX_CONNECTIONS} consoles already")
                return
            conn.send(self.hello)
            conn.send({"type": "snapshot", "state": self.state.to_dict()})
            self._conns.append(conn)
        try:
            self._read_loop(sock, conn)
            conn.wait_actions(ACTION_WAIT_S)  # a client that sent and closed still gets replies
        finally:
            conn.finish()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _read_loop(self, sock: socket.socket, conn: _Connection) -> None:
        reader = sock.makefile("rb")
        while not conn.closed:
            try:
                raw = reader.readline(MAX_LINE + 1)
            except OSError:
                return
            if not raw:
                return
            if len(raw) > MAX_LINE:
                self._refuse(conn, f"request longer than {MAX_LINE} bytes")
                return
            rid: Any = None
            try:
                request = json.loads(raw)
                if not isinstance(request, dict) or request.get("op") != "action":
                    raise ValueError(
                        "expected {'op': 'action', 'id': N, 'name': ..., 'args': [...]}"
                    )
                rid = request.get("id")
                name = request.get("name")
                args = request.get("args", [])
                if name not in ACTIONS:
                    raise ValueError(f"unknown action {name!r} (actions: {', '.join(ACTIONS)})")
                if not isinstance(args, list):
                    raise ValueError("'args' must be a list")
            except (ValueError, RecursionError) as exc:
                problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
                conn.send(
                    {"type": "reply", "id": rid, "ok": False, "error": f"bad request: {problem}"}
                )
                continue
            if self._stopping.is_set():
                if name == "shutdown":  # asked twice: that is what is happening
                    conn.send(
                        {"type": "reply", "id": rid, "ok": True, "result": "already stopping"}
                    )
                else:
                    conn.send(
                        {
                            "type": "reply",
                            "id": rid,
                            "ok": False,
                            "error": "the service is stopping",
                        }
                    )
                continue
            # Actions can take seconds (abort waits for the worker): never hold up the reader.
            conn.action_started()
            thread = threading.Thread(
                target=self._act, args=(conn, rid, name, args), name=f"action-{name}", daemon=True
            )
            self._actions.add(thread)
            thread.start()

    def _act(self, conn: _Connection, rid: Any, name: str, args: list[Any]) -> None:
        try:
            self._reply(conn, rid, name, args)
        finally:
            conn.action_done()
            self._actions.discard(threading.current_thread())

    def _reply(self, conn: _Connection, rid: Any, name: str, args: list[Any]) -> None:
        try:
            if name == "status":
                with self._lock:
                    result: Any = {**self.hello, **self.state.snapshot()}
                result.pop("type", None)
            elif name == "shutdown":
                self._stopping.set()
                self.bye_reason = "the site service was stopped on request"
                result = "the site service is stopping"
            else:
                result = getattr(self.actions, name)(*args)
        except ActionError as exc:
            conn.send({"type": "reply", "id": rid, "ok": False, "error": str(exc)})
            return
        except TypeError as exc:
            conn.send(
                {
                    "type": "reply",
                    "id": rid,
                    "ok": False,
                    "error": f"bad arguments for {name}: {exc}",
                }
            )
            return
        except Exception as exc:  # the client hears what broke; the service stays up
            log.exception("control: %s failed", name)
            conn.send(
                {
                    "type": "reply",
                    "id": rid,
                    "ok": False,
                    "error": f"{name} failed: {type(exc).__name__}: {exc}",
                }
            )
            return
        conn.send({"type": "reply", "id": rid, "ok": True, "result": result})
        if name == "shutdown" and not self._closed.is_set():
            threading.Thread(target=self.on_shutdown, name="control-shutdown", daemon=True).start()
