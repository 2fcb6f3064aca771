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

from engine.events import Event, EventBus, GpuSampled
from engine.state import SiteState

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
MAX_QUEUED = (
    50_000  # events waiting for one slow console; past this it is dropped (it may reattach)
)
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
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"the fltui service pid {self.pid} ({self.mode} {self.site}, running since {since})"


def _read_info(workspace: Path) -> ServiceInfo | None:
    try:
        data = json.loads((service_dir(workspace) / "service.json").read_text("utf-8"))
        return ServiceInfo(**{f.name: data[f.name] for f in dataclasses.fields(ServiceInfo)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lock_held(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def find_service(workspace: Path) -> ServiceInfo | None:
    """The service that runs ``workspace`` now, or None (a stale service.json is ignored)."""
    if not _lock_held(service_dir(workspace) / "service.lock"):
        return None
    return _read_info(workspace)


class WorkspaceLock:
    """The one-engine-per-workspace lock (``flock``; released by the kernel if we die)."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace).resolve()
        self.dir = service_dir(self.workspace)
        self._fd: int | None = None
        self.info: ServiceInfo | None = None

    def acquire(self, site: str, mode: str) -> ServiceInfo:
        """Takes the lock and writes service.json; raises WorkspaceBusy naming the holder."""
        if not self.workspace.is_dir():
            raise ServiceError(f"workspace {self.workspace} does not exist")
        _private_dir(self.dir)
        fd = os.open(self.dir / "service.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # The holder may be a moment from writing its service.json.
            info = None
            for _ in range(20):
                info = _read_info(self.workspace)
                if info is not None:
                    break
                time.sleep(0.05)
            raise WorkspaceBusy(self.workspace, info) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.info = ServiceInfo(
            pid=os.getpid(),
            socket=str(control_socket_path(self.workspace)),
            site=site,
            mode=mode,
            started=time.time(),
            workspace=str(self.workspace),
        )
        from engine.fileio import atomic_write

        text = json.dumps(dataclasses.asdict(self.info), indent=2) + "\n"
        atomic_write(self.dir / "service.json", lambda f: f.write(text.encode()))
        return self.info

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
        from engine.client.admin_interface import AdminError

        try:
            return str(self.interface.local(topic, action, *args))
        except AdminError as exc:
            raise ActionError(str(exc)) from None

    def transfer_mmars(self) -> list[str]:
        folder = self.site_root / "transfer"
        return sorted(p.name for p in folder.glob("*") if (p / "config").is_dir())

    def latest_run(self) -> int | None:
        from engine.site import latest_run

        return latest_run(self.site_root, self._site())

    def deploy(self, mmar: str, run_number: int) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic
        from engine.client.deploy import DeployError, make_mmar_zip

        if not isinstance(mmar, str) or not mmar:
            raise ActionError("deploy needs an MMAR: a name in transfer/ or a path")
        if isinstance(run_number, bool) or not isinstance(run_number, int) or run_number < 1:
            raise ActionError(
                f"the run number must be a whole number of 1 or more, not {run_number!r}"
            )
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
        from engine.admin_defs import Topic

        for name, value in (("run number", run_number), ("GPU count", gpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ActionError(f"the {name} must be a whole number of 1 or more, not {value!r}")
        if gpus > 1:
            return self._local(Topic.START_MGPU, self.interface.start_mgpu_client, run_number, gpus)
        return self._local(Topic.START, self.interface.start_client, run_number)

    def abort(self) -> str:
        from engine.admin_defs import Topic

        return self._local(Topic.ABORT, self.interface.abort_client)

    def restart(self) -> str:
        from engine.admin_defs import Topic

        return self._local(Topic.RESTART, self.interface.restart_client)

    def validate(self) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic

        request = Message(Topic.VALIDATE, "", {MsgHeader.USER_NAME: "local"})
        return self._local(Topic.VALIDATE, self.interface.do_validate, request)


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
        self._cond = threading.Condition()
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode()
        with self._cond:
            if self.closed:
                return
            if len(self._queue) >= MAX_QUEUED:
                log.warning("control: %s reads too slowly; dropping it", self.name)
                self._close_locked()
                return
            self._queue.append(line)
            self._cond.notify()

    def _close_locked(self) -> None:
        self.closed = True
        self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._cond:
            self._close_locked()

    def write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self.closed:
                        self._cond.wait()
                    if not self._queue:  # closed and flushed
                        return
                    batch = b"".join(self._queue)
                    self._queue.clear()
                self.sock.sendall(batch)
        except OSError:
            pass
        finally:
            self.close()
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
        self.actions = actions
        self.hello = {"type": "hello", "protocol": PROTOCOL, **hello}
        self.on_shutdown = on_shutdown
        self.allowed_uids = allowed_uids if allowed_uids is not None else {os.getuid(), 0}
        self.state = SiteState(site=site)
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._shutdown_once = threading.Lock()
        self._unsubscribe = bus.subscribe(self._on_event)
        self.refused = 0

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
        _private_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed service (we hold the workspace lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()
        log.info("control socket %s", self.path)

    def close(self) -> None:
        self._closed.set()
        self._unsubscribe()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), []
        for conn in conns:
            conn.close()
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

    def _serve(self, sock: socket.socket) -> None:
        try:
            uid = _peer_uid(sock)
        except OSError:
            sock.close()
            return
        conn = _Connection(sock, f"uid {uid}")
        writer = threading.Thread(target=conn.write_loop, name="control-write", daemon=True)
        writer.start()
        if uid not in self.allowed_uids:
            self.refused += 1
            log.warning("control: refused a connection from uid %d", uid)
            conn.send(
                {
                    "type": "refused",
                    "error": f"this site service belongs to uid {os.getuid()}; "
                    f"uid {uid} may not control it",
                }
            )
            with conn._cond:  # let the writer flush the refusal, then close
                conn.closed = True
                conn._cond.notify_all()
            return
        with self._lock:  # snapshot and registration under one lock: no event lost or doubled
            conn.send(self.hello)
            conn.send({"type": "snapshot", "state": self.state.to_dict()})
            self._conns.append(conn)
        try:
            self._read_loop(sock, conn)
        finally:
            conn.close()
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
                conn.send({"type": "refused", "error": f"request longer than {MAX_LINE} bytes"})
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
            except ValueError as exc:
                conn.send({"type": "reply", "id": rid, "ok": False, "error": f"bad request: {exc}"})
                continue
            # Actions can take seconds (abort waits for the worker): never hold up the reader.
            threading.Thread(
                target=self._act, args=(conn, rid, name, args), name=f"action-{name}", daemon=True
            ).start()

    def _act(self, conn: _Connection, rid: Any, name: str, args: list[Any]) -> None:
        try:
            if name == "status":
                with self._lock:
                    result: Any = {**self.hello, **self.state.snapshot()}
                result.pop("type", None)
            elif name == "shutdown":
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
        if name == "shutdown" and self._shutdown_once.acquire(blocking=False):
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
            first = json.loads(self._file.readline(MAX_LINE) or b"{}")
        except (OSError, ValueError) as exc:
            sock.close()
            raise NoService(f"the site service on {self.path} did not say hello: {exc}") from None
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
                if message.get("type") == "reply" and isinstance(message.get("id"), int):
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                elif self.on_message is not None:
                    self.on_message(message)
            self.closed_reason = "the service closed the connection"
        except OSError as exc:
            self.closed_reason = f"connection lost: {exc}"
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()

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
        from engine.config import load_client_kit
        from engine.site import SitePaths

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
        from engine.site import SiteService, attach_workspace_logs

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
