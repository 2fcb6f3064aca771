"""The one-service-per-workspace lock, and how consoles find that service; the service's errors.

The service holds an exclusive lock on the workspace (``.fltui/service.lock``; the kernel drops
it when the process dies, so a killed service never blocks the next start), and describes itself
in ``.fltui/service.json`` (pid, control socket, site) once its control socket listens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from engine.procs import pid_alive

__all__ = [
    "SERVICE_DIR",
    "ActionError",
    "NoService",
    "ServiceError",
    "ServiceInfo",
    "SessionClaim",
    "SessionTaken",
    "WorkspaceBusy",
    "WorkspaceLock",
    "control_socket_path",
    "find_service",
    "private_dir",
    "service_dir",
]

SERVICE_DIR = ".fltui"


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


class SessionTaken(WorkspaceBusy):
    """This machine already holds a live session of the same site with the same server."""

    def __init__(self, site: str, target: str, holder: dict[str, object]) -> None:
        self.info = None
        self.holder = holder
        pid, where = holder.get("pid", "?"), holder.get("workspace", "?")
        ServiceError.__init__(
            self,
            f"{site} already has a live session with {target} from this machine: pid {pid} "
            f"(workspace {where}). Registering again would take that session over; attach to "
            f"it with `fltui --workspace {where}` or `fltui ctl --workspace {where} status`, "
            "or stop it first.",
        )


class NoService(ServiceError):
    """No service runs for the workspace (or its socket cannot be reached)."""


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


def private_dir(path: Path) -> None:
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
        self.claim: SessionClaim | None = None

    def _claim_session(self) -> None:
        from engine.config import ConfigError, load_client_kit  # deferred: the console's path

        kit = self.workspace / "startup" / "fed_client.json"
        if not kit.is_file():
            return
        try:
            config = load_client_kit(kit)
        except ConfigError:
            return  # the engine reports the kit's errors, with file and key
        if not config.servers:
            return
        claim = SessionClaim(config.client_name, config.servers[0].target, self.workspace)
        claim.acquire()
        self.claim = claim

    def _holder(self) -> ServiceInfo | None:
        info = _read_info(self.workspace)
        if info is not None and pid_alive(info.pid):
            return info
        try:  # not described yet (it is starting): the pid it wrote into the lock file
            pid = int((self.dir / "service.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return ServiceInfo(pid, "", "?", "starting", time.time(), str(self.workspace))

    def acquire(self, site: str, mode: str, claim_session: bool = True) -> ServiceInfo:
        """Takes the lock; raises WorkspaceBusy naming the holder, or ServiceError.

        With ``claim_session`` and a startup kit in the workspace, also this machine's claim on
        the site's session with its server (``SessionClaim``): SessionTaken (a WorkspaceBusy)
        when another workspace of the same site holds it.
        """
        if not self.workspace.is_dir():
            raise ServiceError(f"workspace {self.workspace} does not exist")
        try:
            private_dir(self.dir)
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
        if claim_session:
            try:
                self._claim_session()
            except BaseException:
                os.close(fd)
                raise
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

    def acquire_alias(self, site: str, mode: str, socket: str) -> ServiceInfo:
        """Takes this workspace for a service whose socket is elsewhere (the demo's site-1).

        Consoles, ``fltui ctl`` and ``fltui screenshot`` pointed at this workspace find that
        service; a second engine for it is refused as for any running service.
        """
        self.workspace.mkdir(parents=True, exist_ok=True)
        info = self.acquire(site, mode, claim_session=False)
        self.info = dataclasses.replace(info, socket=socket)
        return self.info

    def publish(self) -> None:
        """Writes service.json: consoles and ``fltui ctl`` find the service from now on."""
        from engine.fileio import atomic_write  # deferred: numpy; the console's start path

        assert self.info is not None, "acquire first"
        text = json.dumps(dataclasses.asdict(self.info), indent=2) + "\n"
        atomic_write(self.dir / "service.json", lambda f: f.write(text.encode()))

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.dir / "service.json").unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None


def _sessions_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fltui-{os.getuid()}"
    return Path(base) / "fltui-sessions"


class SessionClaim:
    """One live session per (server, site) from this machine and user (``flock``, like the
    workspace lock: the kernel drops it when the holder dies).

    Two workspaces of the same site (a copy, the demo's site-1 and a console pointed at it)
    would register twice and take each other's session; the second is refused here, before
    it registers, naming the pid of the first.
    """

    def __init__(self, site: str, target: str, workspace: Path) -> None:
        self.site, self.target = site, target
        self.workspace = Path(workspace).resolve()
        digest = hashlib.sha256(f"{target}\n{site}".encode()).hexdigest()[:24]
        self.path = _sessions_dir() / f"{digest}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the claim; raises SessionTaken naming the holder."""
        if not os.environ.get("XDG_RUNTIME_DIR"):
            private_dir(self.path.parent.parent)  # /tmp/fltui-UID: ours and owner-only
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            raise SessionTaken(self.site, self.target, holder) from None
        text = json.dumps({"pid": os.getpid(), "workspace": str(self.workspace), "site": self.site})
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
