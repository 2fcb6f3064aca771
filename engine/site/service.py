"""The site service: one engine per workspace, and a control socket for consoles and scripts.

A site's engine runs in one process, the *service* (``fltui --no-ui``, or a console that found
no service and runs the engine itself). The service:

- holds an exclusive lock on the workspace (``.fltui/service.lock``; the kernel drops it when
  the process dies, so a killed service never blocks the next start), and describes itself in
  ``.fltui/service.json`` (pid, control socket, site);
- listens on a Unix domain socket that only its own user (and root) may use: the folder and the
  socket are owner-only, and every connection's peer credentials are checked;
- sends each connection a ``hello``, then a snapshot of the site's state, then every event about
  the site as it happens (JSON lines); takes the console's actions (``deploy``, ``start_training``,
  ``abort``, ``restart``, ``validate``, ``status``, ``shutdown``) and answers each with a reply.

Wire format, one JSON object per line, UTF-8:

    service → client  {"type": "hello", "protocol": 1, "pid": …, "site": …, "mode": …, …}
                      {"type": "snapshot", "state": {…SiteState.to_dict()…}}
                      {"type": "event", "event": {…Event.to_dict()…}}
                      {"type": "reply", "id": N, "ok": true|false, "result": …, "error": "…"}
                      {"type": "refused", "error": "…"}      (then the connection closes)
    client → service  {"op": "action", "id": N, "name": "abort", "args": [...]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import load_client_kit
from engine.events import Event, EventBus, GpuSampled
from engine.procs import pid_alive
from engine.site.logs import attach_workspace_logs
from engine.site.state import SiteState

__all__ = [
    "ACTIONS",
    "PROTOCOL",
    "ActionError",
    "ControlServer",
    "NoService",
    "ServiceError",
    "ServiceInfo",
    "SiteActions",
    "WorkspaceBusy",
    "WorkspaceLock",
    "control_socket_path",
    "find_service",
]

log = logging.getLogger(__name__)

PROTOCOL = 1
SERVICE_DIR = ".fltui"
MAX_LINE = 1 << 20  # a request line longer than this is refused
# What waits for one slow console (one stopped with Ctrl-Z): past this it is dropped, and may
# attach again for a fresh snapshot.
MAX_QUEUED_BYTES = 8 << 20
MAX_CONNECTIONS = 32
ACTION_WAIT_S = 30.0  # how long a closing connection or a stopping service waits for actions
# What a client may ask; each maps to a SiteActions method (status/shutdown are the server's own).
ACTIONS = (
    "transfer_mmars",
    "latest_run",
    "deploy",
    "start_training",
    "abort",
    "restart",
    "validate",
    "status",
    "shutdown",
)


class ServiceError(RuntimeError):
    """Something about the site service the operator must know (the text says what and where)."""


class ActionError(ServiceError):
    """An action that cannot be done; the text is for the operator."""


class WorkspaceBusy(ServiceError):
    """The workspace already has a running service."""

    def __init__(self, workspace: Path, info: ServiceInfo | None) -> None:
        self.info = info
        who = info.describe() if info else "another fltui process (it has not described itself)"
        super().__init__(
            f"{workspace} is already run by {who}. Attach a console to it with "
            f"`fltui --workspace {workspace}`, or stop it with "
            f"`fltui ctl --workspace {workspace} shutdown`."
        )


class NoService(ServiceError):
    """No service runs for the workspace (or its socket cannot be reached)."""


# ---------------------------------------------------------------------------- where things are


def service_dir(workspace: Path) -> Path:
    return Path(workspace).resolve() / SERVICE_DIR


def control_socket_path(workspace: Path) -> Path:
    """``WORKSPACE/.fltui/control.sock``, or a short path when that one is too long for AF_UNIX.

    Unix socket paths are limited to about 107 bytes; a deep workspace gets a socket in
    ``$XDG_RUNTIME_DIR`` (or ``/tmp/fltui-UID``), named by a hash of the workspace path.
    """
    path = service_dir(workspace) / "control.sock"
    if len(os.fsencode(path)) <= 100:
        return path
    digest = hashlib.sha256(os.fsencode(Path(workspace).resolve())).hexdigest()[:20]
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fltui-{os.getuid()}"
    return Path(base) / f"fltui-{digest}.sock"


def _private_dir(path: Path) -> None:
    """Creates ``path`` owner-only, or checks that an existing one is ours and owner-only."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ServiceError(f"{path} should be a folder for fltui's control socket, but is not")
    if info.st_uid != os.getuid():
        raise ServiceError(
            f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); "
            "fltui will not put its control socket there"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


@dataclasses.dataclass(frozen=True)
class ServiceInfo:
    """What a running service says about itself in ``.fltui/service.json``."""

    pid: int
    socket: str
    site: str
    mode: str
    started: float
    workspace: str

    def describe(self) -> str:
        if self.mode == "starting":
            return f"the fltui service pid {self.pid} (starting)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"the fltui service pid {self.pid} ({self.mode} {self.site}, running since {since})"


def _read_info(workspace: Path) -> ServiceInfo | None:
    try:
        data = json.loads((service_dir(workspace) / "service.json").read_text("utf-8"))
        return ServiceInfo(**{f.name: data[f.name] for f in dataclasses.fields(ServiceInfo)})
    except PermissionError:
        raise _not_ours(service_dir(workspace)) from None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _not_ours(folder: Path) -> ServiceError:
    try:
        owner = f"uid {folder.stat().st_uid}"
    except OSError:
        owner = "another user"
    return ServiceError(
        f"{folder} belongs to {owner}, not to this user (uid {os.getuid()}): its site service "
        "may only be used by that user; run fltui as that user (e.g. sudo -u USER fltui ...)"
    )


def _lock_held(lock_path: Path) -> bool:
    """Whether a process holds the workspace lock (a probe of a few microseconds)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise _not_ours(lock_path.parent) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def find_service(workspace: Path) -> ServiceInfo | None:
    """The service that runs ``workspace`` now, ready for consoles; else None.

    A service.json left by a killed service is ignored (no lock held, or its pid is gone).

    Raises:
        ServiceError: the workspace's service folder belongs to another user.
    """
    folder = service_dir(workspace)
    if not folder.exists():
        return None
    info = _read_info(workspace)
    if info is None or not pid_alive(info.pid):
        return None
    if not _lock_held(folder / "service.lock"):
        return None
    return info


class WorkspaceLock:
    """The one-engine-per-workspace lock (``flock``; released by the kernel if we die).

    ``acquire`` takes the lock; ``publish`` writes ``service.json`` once the service can be
    reached (its socket listens), so a console never finds a service it cannot attach to.
    """

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace).resolve()
        self.dir = service_dir(self.workspace)
        self._fd: int | None = None
        self.info: ServiceInfo | None = None

    def _holder(self) -> ServiceInfo | None:
        info = _read_info(self.workspace)
        if info is not None and pid_alive(info.pid):
            return info
        try:  # not described yet (it is starting): the pid it wrote into the lock file
            pid = int((self.dir / "service.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return ServiceInfo(pid, "", "?", "starting", time.time(), str(self.workspace))

    def acquire(self, site: str, mode: str) -> ServiceInfo:
        """Takes the lock; raises WorkspaceBusy naming the holder, or ServiceError."""
        if not self.workspace.is_dir():
            raise ServiceError(f"workspace {self.workspace} does not exist")
        try:
            _private_dir(self.dir)
            fd = os.open(self.dir / "service.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except PermissionError:
            raise _not_ours(self.dir) from None
        # A console probing for a service holds a shared lock for microseconds: try a while.
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                raise WorkspaceBusy(self.workspace, self._holder()) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        with contextlib.suppress(OSError):
            (self.dir / "service.json").unlink()  # a killed service's
        self.info = ServiceInfo(
            pid=os.getpid(),
            socket=str(control_socket_path(self.workspace)),
            site=site,
            mode=mode,
            started=time.time(),
            workspace=str(self.workspace),
        )
        return self.info

    def publish(self) -> None:
        """Writes service.json: consoles and ``fltui ctl`` find the service from now on."""
        from engine.fileio import atomic_write  # deferred: numpy; the console's start path

        assert self.info is not None, "acquire first"
        text = json.dumps(dataclasses.asdict(self.info), indent=2) + "\n"
        atomic_write(self.dir / "service.json", lambda f: f.write(text.encode()))

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.dir / "service.json").unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None


# ---------------------------------------------------------------------------- actions


class SiteActions:
    """The console's actions on a site, for the in-console engine and the control socket alike.

    Args:
        site_root: the site workspace (its ``transfer/`` holds MMARs to deploy).
        interface: returns the live ClientAdminInterface (it changes when the engine restarts),
            or None while the engine is starting.
        site: returns the site's name.
    """

    def __init__(
        self,
        site_root: Path,
        interface: Callable[[], Any],
        site: Callable[[], str],
    ) -> None:
        self.site_root = Path(site_root)
        self._interface = interface
        self._site = site

    @property
    def interface(self) -> Any:
        found = self._interface()
        if found is None:
            raise ActionError("the site engine is still starting; try again in a moment")
        return found

    def _local(self, topic: str, action: Any, *args: Any) -> str:
        from engine.site.admin_interface import AdminError  # deferred: numpy, protobuf

        try:
            return str(self.interface.local(topic, action, *args))
        except AdminError as exc:
            raise ActionError(str(exc)) from None

    def transfer_mmars(self) -> list[str]:
        folder = self.site_root / "transfer"
        return sorted(p.name for p in folder.glob("*") if (p / "config").is_dir())

    def latest_run(self) -> int | None:
        from engine.site.paths import latest_run  # deferred: numpy; the console's start path

        return latest_run(self.site_root, self._site())

    def deploy(self, mmar: str, run_number: int) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic  # deferred: protobuf
        from engine.site.deploy import DeployError, make_mmar_zip  # deferred: numpy

        if not isinstance(mmar, str) or not mmar:
            raise ActionError("deploy needs an MMAR: a name in transfer/ or a path")
        _check_run(run_number)
        path = Path(mmar)
        folder = path if path.is_absolute() else self.site_root / "transfer" / mmar
        if not (folder / "config").is_dir():
            raise ActionError(f"{folder} is not an MMAR (no config/ folder)")
        try:
            data = make_mmar_zip(folder)
        except DeployError as exc:
            raise ActionError(str(exc)) from None
        request = Message(
            Topic.DEPLOY,
            data,
            {MsgHeader.RUN_NUMBER: str(run_number), MsgHeader.APP_NAME: folder.name},
        )
        return self._local(Topic.DEPLOY, self.interface.deploy_mmar, request)

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        _check_run(run_number)
        _whole("GPU count", gpus)
        if gpus > 1:
            return self._local(Topic.START_MGPU, self.interface.start_mgpu_client, run_number, gpus)
        return self._local(Topic.START, self.interface.start_client, run_number)

    def abort(self) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        return self._local(Topic.ABORT, self.interface.abort_client)

    def restart(self) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        return self._local(Topic.RESTART, self.interface.restart_client)

    def validate(self) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic  # deferred: protobuf

        request = Message(Topic.VALIDATE, "", {MsgHeader.USER_NAME: "local"})
        return self._local(Topic.VALIDATE, self.interface.do_validate, request)


def _check_run(value: Any) -> None:
    """Refuses what is not a run number (over the socket, JSON can carry anything)."""
    from engine.site.paths import check_run_number  # deferred: numpy; the console's start path

    try:
        check_run_number(value)
    except ValueError as exc:
        raise ActionError(str(exc)) from None


def _whole(name: str, value: Any) -> None:
    """Refuses what is not a whole number >= 1 (over the socket, JSON can carry anything)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ActionError(f"the {name} must be a whole number of 1 or more, not {value!r}")


# ---------------------------------------------------------------------------- control socket


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
    """Serves the site's state, events and actions on a Unix socket (see the module doc).

    Args:
        path: the socket path (its folder must be owner-only; see ``_private_dir``).
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
        _private_dir(self.path.parent)
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


# ---------------------------------------------------------------------------- a client


class ControlClient:
    """A connection to a service's control socket (consoles and ``fltui ctl``).

    Events and the snapshot go to ``on_message``, on the client's reader thread; ``call`` sends an
    action and waits for its reply.
    """

    def __init__(
        self, path: str | Path, on_message: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path = str(path)
        self.on_message = on_message
        self.hello: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next = 0
        self.closed_reason = ""
        self.closed = threading.Event()
        self.bye = ""  # the service said it is stopping (not a lost connection)

    def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Connects and reads the hello; raises NoService or ServiceError with the reason."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ServiceError(
                    f"not allowed to use the control socket {self.path}: it belongs to another user"
                ) from None
            raise NoService(
                f"no site service answers on {self.path}: {exc.strerror or exc}"
            ) from None
        self._file = sock.makefile("rb")
        try:
            raw = self._file.readline(MAX_LINE)
            if not raw.endswith(b"\n") and len(raw) < MAX_LINE:
                # Closed before or during the hello: a service in the moment it stops.
                raise OSError("it closed the connection before its hello")
            first = json.loads(raw)
        except OSError as exc:
            sock.close()
            raise NoService(f"the site service on {self.path} did not say hello: {exc}") from None
        except ValueError:
            first = {"answer": raw[:200].decode("utf-8", "replace")}
        if not isinstance(first, dict):
            first = {"answer": first}
        if first.get("type") == "refused":
            sock.close()
            raise ServiceError(f"the site service refused this connection: {first.get('error')}")
        if first.get("type") != "hello" or first.get("protocol") != PROTOCOL:
            sock.close()
            raise ServiceError(
                f"the process on {self.path} does not speak fltui control protocol "
                f"{PROTOCOL}: {first!r:.200}"
            )
        sock.settimeout(None)
        self._sock = sock
        self.hello = first
        threading.Thread(target=self._read_loop, name="control-client", daemon=True).start()
        return first

    def _read_loop(self) -> None:
        try:
            for raw in self._file:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if message.get("type") == "bye":
                    self.bye = str(message.get("reason") or "the site service stopped")
                    continue
                if message.get("type") == "reply" and isinstance(message.get("id"), int):
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                elif self.on_message is not None:
                    self.on_message(message)
            self.closed_reason = self.bye or "the service closed the connection"
        except OSError as exc:
            self.closed_reason = f"connection lost: {exc}"
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()
            self.close()  # the service sees our end close at once

    def call(self, name: str, *args: Any, timeout: float = 120.0) -> Any:
        """Runs an action on the service; returns its result or raises ActionError."""
        if self._sock is None or self.closed.is_set():
            raise ActionError(
                f"not connected to the site service ({self.closed_reason or 'not yet connected'})"
            )
        with self._cond:
            self._next += 1
            rid = self._next
        line = json.dumps({"op": "action", "id": rid, "name": name, "args": list(args)}) + "\n"
        try:
            self._sock.sendall(line.encode())
        except OSError as exc:
            raise ActionError(f"lost the site service: {exc}") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if self.closed.is_set():
                    raise ActionError(
                        f"lost the site service before it answered {name}: {self.closed_reason}"
                    )
                if left <= 0:
                    raise ActionError(
                        f"the site service did not answer {name} within {timeout:.0f} s"
                    )
                self._cond.wait(left)
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise ActionError(str(reply.get("error") or f"{name} failed"))
        return reply.get("result")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()


# ---------------------------------------------------------------------------- hosting an engine


class ServiceHost:
    """The lock and the control socket around an engine (a site's, or the demo's site-1).

    Args:
        workspace: the folder to lock (a site workspace, or the demo's root).
        bus: the engine's bus.
        site: the site the consoles follow.
        mode: what this process is, for the consoles' header: "service", "console", "demo".
        actions: what the control socket's actions run on.
        on_shutdown: what a ``shutdown`` request does.
        allowed_uids: who may connect (default: this user and root).
    """

    def __init__(
        self,
        workspace: Path,
        bus: EventBus,
        site: str,
        mode: str,
        actions: SiteActions,
        on_shutdown: Callable[[], None],
        allowed_uids: set[int] | None = None,
    ) -> None:
        self.workspace = Path(workspace)
        self.bus = bus
        self.site, self.mode = site, mode
        self.actions = actions
        self.on_shutdown = on_shutdown
        self.allowed_uids = allowed_uids
        self.lock = WorkspaceLock(self.workspace)
        self.control: ControlServer | None = None
        self.info: ServiceInfo | None = None

    def open(self) -> ServiceInfo:
        """Takes the workspace and opens the socket; raises WorkspaceBusy or ServiceError."""
        info = self.lock.acquire(self.site, self.mode)
        try:
            control = ControlServer(
                Path(info.socket),
                self.bus,
                self.actions,
                {
                    "pid": info.pid,
                    "site": self.site,
                    "mode": self.mode,
                    "workspace": info.workspace,
                },
                self.on_shutdown,
                site=self.site,
                allowed_uids=self.allowed_uids,
            )
            control.start()
        except BaseException:
            self.lock.release()
            raise
        self.control, self.info = control, info
        self.lock.publish()
        return info

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        self.lock.release()

    def __enter__(self) -> ServiceHost:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SiteRunner:
    """A site's engine, run as its workspace's one service: restarts, GPU sampler, lock, socket.

    ``fltui --no-ui`` runs one (mode "service"); so does a console that found no service
    (mode "console": the engine ends when that console quits).

    Args:
        workspace: the site workspace.
        bus: where every event goes.
        executor: "process" or "thread".
        gpu_sampler: ``start(bus, site)``/``stop()``, or None.
        mode: "service" or "console".

    Raises:
        ConfigError: the startup kit is wrong (with file and key).
    """

    def __init__(
        self,
        workspace: Path,
        bus: EventBus,
        executor: str = "process",
        gpu_sampler: Any = None,
        mode: str = "service",
    ) -> None:
        from engine.site.paths import SitePaths  # deferred: numpy; the console's start path

        self.workspace = Path(workspace)
        self.bus = bus
        self.executor = executor
        self.gpu_sampler = gpu_sampler
        self.site = load_client_kit(SitePaths(self.workspace).kit).client_name
        self.service: Any = None
        self._stop = threading.Event()
        self.actions = SiteActions(
            self.workspace,
            lambda: self.service.interface if self.service is not None else None,
            lambda: self.site,
        )
        self.host = ServiceHost(
            self.workspace, bus, self.site, mode, self.actions, on_shutdown=self.request_stop
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def open(self) -> ServiceInfo:
        info = self.host.open()
        if self.gpu_sampler is not None:
            self.gpu_sampler.start(self.bus, self.site)
        return info

    def run(
        self, auto_start: bool = True, run_number: int | None = None, stay: bool = False
    ) -> str:
        """Runs the engine until training ends (``auto_start``) or a stop; restarts on request.

        Args:
            auto_start: train run ``run_number`` (default the latest) at once.
            run_number: which deployed run.
            stay: keep serving after training ends, until a stop request (a service).

        Returns:
            the training's outcome with ``auto_start`` and without ``stay``, else "stopped".
        """
        from engine.site.site_service import SiteService  # deferred: gRPC, numpy, the engine

        while True:
            service = SiteService(self.workspace, self.bus, executor=self.executor)
            self.service = service
            if self._stop.is_set():
                return "stopped"
            detach = attach_workspace_logs(self.workspace, self.bus, self.site)
            try:
                outcome = service.run(auto_start=auto_start, run_number=run_number, stay=stay)
            finally:
                detach()
            if not service.restart_requested or self._stop.is_set():
                return "stopped" if stay or not auto_start else outcome
            log.info("%s: restarting the site engine", self.site)
            # A restarted service waits for its next command; a one-shot run trains again.
            auto_start = auto_start and not stay

    def request_stop(self) -> None:
        """Ends ``run``: training stops, the site says goodbye to the server."""
        self._stop.set()
        service = self.service
        if service is not None:
            service.request_stop()

    def close(self) -> None:
        if self.gpu_sampler is not None:
            self.gpu_sampler.stop()
        self.host.close()
