"""Engine ↔ console: events queue up from any thread; actions run on the site's engine.

The console reaches the engine only through ``SiteBridge``: ``drain()`` hands over the events
that arrived since the last call (the app calls it a few times a second, on its own thread, so
high-rate events are coalesced into one screen update), and the action methods are called from
Textual thread workers.

- ``RemoteBridge``: the console attached to the site's service (``engine.site.runner``) over
  its control socket (``engine.site.control_client``); quitting the console leaves the service
  running. ``RemoteBridge.demo`` starts the demo federation as such a service, in a child
  process, and stops it on quit.
- ``LocalBridge``: no service runs, so the console runs the site's engine itself (and serves the
  control socket, so that a second console or ``fltui ctl`` can attach); the engine ends when
  this console quits.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from engine.config import ConfigError
from engine.events import (
    Event,
    EventBus,
    LogRecord,
    ServiceLink,
    StateSnapshot,
    event_from_dict,
)
from engine.site.actions import SiteActions
from engine.site.control_client import ControlClient
from engine.site.lock import ActionError, NoService, ServiceError, ServiceInfo, find_service
from engine.site.runner import SiteRunner

__all__ = ["BridgeError", "LocalBridge", "RemoteBridge", "SiteBridge"]

MAX_PENDING = 20_000
RECONNECT_S = 60.0  # how long a console waits for a lost service to come back (systemd: 10 s)

# One error type for the console, whichever side the engine runs on.
BridgeError = ActionError


class SiteBridge:
    """What the console needs from a site's engine."""

    site: str = ""
    mode: str = ""

    @property
    def label(self) -> str:
        """Where the engine runs, for the header."""
        return "fltui demo" if self.mode == "demo" else "fltui"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def drain(self) -> list[Event]:
        raise NotImplementedError

    def transfer_mmars(self) -> list[str]:
        return []

    def deploy(self, mmar: str, run_number: int) -> str:
        raise NotImplementedError

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        raise NotImplementedError

    def abort(self) -> str:
        raise NotImplementedError

    def restart(self) -> str:
        raise NotImplementedError

    def validate(self) -> str:
        raise NotImplementedError

    def shutdown(self) -> str:
        """Stops the site's engine (the service, where one runs)."""
        raise NotImplementedError

    def latest_run(self) -> int | None:
        return None


class _Queue:
    """The pending events of a bridge (bounded; the oldest go first when a console stalls)."""

    def __init__(self) -> None:
        self._pending: collections.deque[Event] = collections.deque(maxlen=MAX_PENDING)
        self._lock = threading.Lock()

    def put(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)

    def drain(self) -> list[Event]:
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
        return events


class LocalBridge(SiteBridge):
    """The site's engine in this process (no service runs for the workspace).

    It still takes the workspace's lock and serves the control socket, so a second console or
    ``fltui ctl`` attaches to it; the engine stops when this console quits.

    Args:
        workspace: the site workspace.
        gpu_sampler: an ``engine.gpu.GpuSampler``-like object (``start(bus, site)``/``stop()``),
            or None for none.
    """

    def __init__(self, workspace: Path, gpu_sampler: Any = None) -> None:
        self.workspace = Path(workspace)
        self.mode = "console"
        self.bus = EventBus()
        self._queue = _Queue()
        self.bus.subscribe(self._queue.put)
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._stopping = threading.Event()
        self.gpu_sampler = gpu_sampler
        self.site = ""
        self.actions = SiteActions(self.workspace, self._interface, lambda: self.site)

    @property
    def label(self) -> str:
        return "fltui · engine in this console"

    def drain(self) -> list[Event]:
        # The engine is in this process: the link is always there (the ticks still let the
        # console age what the server last confirmed).
        return [*self._queue.drain(), ServiceLink(site=self.site, remote=False, connected=True)]

    def _say(self, level: str, message: str) -> None:
        self.bus.publish(
            LogRecord(site=self.site or "console", level=level, logger="fltui", message=message)
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Starts the engine in a background thread (never blocks the caller)."""
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            runner = SiteRunner(
                self.workspace, self.bus, gpu_sampler=self.gpu_sampler, mode="console"
            )
            self.site = runner.site
            if self._stopping.is_set():  # stop() came while the runner was being built
                return
            info = runner.open()
        except (ConfigError, ServiceError) as exc:
            self._say("ERROR", str(exc))
            return
        self._runner = runner
        self._say(
            "INFO",
            f"no site service runs for {self.workspace}: the engine runs in this console "
            f"(pid {info.pid}) and stops when it quits. Other consoles can attach to it.",
        )
        try:
            if not self._stopping.is_set():
                runner.run(auto_start=False)
        except Exception as exc:
            self._say("ERROR", f"site engine failed: {type(exc).__name__}: {exc}")
        finally:
            runner.close()

    def stop(self) -> None:
        """Stops the engine; waits a little for it."""
        self._stopping.set()
        if self._runner is not None:
            self._runner.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=20)

    def shutdown(self) -> str:
        self.stop()
        return "the site engine stopped"

    # ------------------------------------------------------------------ actions

    def _interface(self) -> Any:
        service = self._runner.service if self._runner is not None else None
        return service.interface if service is not None else None

    @property
    def interface(self) -> Any:
        return self.actions.interface

    def transfer_mmars(self) -> list[str]:
        return self.actions.transfer_mmars()

    def latest_run(self) -> int | None:
        return self.actions.latest_run()

    def deploy(self, mmar: str, run_number: int) -> str:
        return self.actions.deploy(mmar, run_number)

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        return self.actions.start_training(run_number, gpus)

    def abort(self) -> str:
        return self.actions.abort()

    def restart(self) -> str:
        return self.actions.restart()

    def validate(self) -> str:
        return self.actions.validate()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Waits until actions can be taken (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._interface() is not None:
                return True
            time.sleep(0.05)
        return False


class RemoteBridge(SiteBridge):
    """A console attached to a site service over its control socket.

    Args:
        workspace: the service's workspace (the demo's root for a demo service).
        site: the site the service runs (known before connecting, for the first frame).
        launch: a command that starts the service (the demo); the bridge then owns it and stops
            it when the console quits. Without it, the service is someone else's and keeps
            running after the console quits.
        wait_s: how long to wait for a launched service to open its socket.
    """

    def __init__(
        self,
        workspace: Path,
        site: str = "",
        launch: list[str] | None = None,
        wait_s: float = 120.0,
    ) -> None:
        self.workspace = Path(workspace)
        self.site = site
        self.launch = launch
        self.mode = "demo" if launch else "attached"
        self.wait_s = wait_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.client: Any = None
        self._queue = _Queue()
        self._gone = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.seen: float | None = None  # when the service was last heard from (any message)

    @classmethod
    def demo(
        cls,
        root: Path,
        sites: int = 3,
        rounds: int = 5,
        secure: bool = False,
        task: str = "classification",
        mmar: Path | None = None,
    ) -> RemoteBridge:
        """The demo federation as a service in a child process, which this console owns."""
        command = [
            sys.executable,
            "-m",
            "fltui",
            "demo",
            "--no-ui",
            "--service",
            "--workspace",
            str(root),
            "--sites",
            str(sites),
            "--rounds",
            str(rounds),
            *(["--secure"] if secure else []),
            *("--task", task),
            *(["--mmar", str(mmar)] if mmar is not None else []),
        ]
        return cls(root, "site-1", launch=command)

    @property
    def label(self) -> str:
        if self._gone == "reconnecting":
            return "service lost · reconnecting"
        if self._gone:
            return "service gone"
        if self.pid is None:
            return "starting the demo service" if self.launch else "attaching to service"
        if self.launch:
            return f"fltui demo · service pid {self.pid}"
        return f"attached to service (pid {self.pid})"

    @property
    def connected(self) -> bool:
        client = self.client
        return client is not None and not client.closed.is_set() and not self._gone

    def drain(self) -> list[Event]:
        """The events since the last call, then the link's liveness now (a ServiceLink)."""
        link = ServiceLink(site=self.site, remote=True, connected=self.connected, seen=self.seen)
        return [*self._queue.drain(), link]

    def _say(self, level: str, message: str) -> None:
        self._queue.put(
            LogRecord(site=self.site or "console", level=level, logger="fltui", message=message)
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connects (launching the service first, where it is ours) in the background."""
        self._thread = threading.Thread(target=self._connect, name="attach", daemon=True)
        self._thread.start()

    def _log_path(self) -> Path:
        return self.workspace / "demo-service.log"

    def _spawn(self) -> None:
        assert self.launch is not None
        self.workspace.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLTUI_PARENT_PID": str(os.getpid())}
        with self._log_path().open("ab") as out:
            self.proc = subprocess.Popen(
                self.launch,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C reaches the console, not the demo
            )
        self._say("INFO", f"starting the demo federation as a service (pid {self.proc.pid})")

    def _find(self, wait_s: float) -> ServiceInfo | None:
        """The service, once it listens (waiting up to ``wait_s``); None if it does not come."""
        from engine.fileio import tail_text  # deferred: numpy; the console's start path

        deadline = time.monotonic() + wait_s
        while not self._stopping.is_set():
            try:
                info = find_service(self.workspace)
            except ServiceError as exc:
                self._fail(str(exc))
                return None
            if info is not None and (self.proc is None or info.pid == self.proc.pid):
                return info
            if self.proc is not None and self.proc.poll() is not None:
                tail = tail_text(self._log_path(), 5, "demo service log")
                self._fail(f"the demo service exited with code {self.proc.returncode}: {tail}")
                return None
            if time.monotonic() > deadline:
                return None
            self._stopping.wait(0.1)
        return None

    def _connect(self) -> None:
        """Attaches; after a lost connection (a crash, a restart by systemd), attaches again."""
        if self.launch:
            try:
                self._spawn()
            except OSError as exc:
                self._fail(f"cannot start the demo service: {exc}")
                return
        wait_s = self.wait_s if self.launch else 2.0
        deadline = time.monotonic() + wait_s
        while not self._stopping.is_set():
            info = self._find(max(0.0, deadline - time.monotonic()))
            if info is None:
                if self._gone in ("", "reconnecting"):
                    self._fail(
                        f"no site service runs for {self.workspace}"
                        if self.pid is None
                        else f"the site service did not come back within {wait_s:.0f} s"
                    )
                return
            client = ControlClient(info.socket, self._on_message)
            try:
                hello = client.connect()
            except NoService as exc:
                # A service that is dying (killed: its lock and socket go a moment after its
                # pid stops answering) or not yet accepting: look again until the wait ends.
                if time.monotonic() >= deadline:
                    self._fail(str(exc))
                    return
                self._stopping.wait(0.2)
                continue
            except ServiceError as exc:
                self._fail(str(exc))
                return
            again = self.pid is not None
            self.seen = time.time()
            self.client, self.pid, self._gone = client, int(hello.get("pid") or info.pid), ""
            self.site = self.site or str(hello.get("site", ""))
            self.ready.set()
            if not self.launch:
                self._say(
                    "INFO",
                    f"{'re-' if again else ''}attached to the site service (pid {self.pid}); "
                    "quitting this console leaves it running",
                )
            client.closed.wait()
            if self._stopping.is_set():
                return
            if client.bye or self.launch:
                self._fail(f"the site service (pid {self.pid}) ended: {client.closed_reason}")
                return
            # Lost without a goodbye: it died. systemd (or an operator) may start it again.
            self._gone = "reconnecting"
            self._say(
                "WARNING",
                f"lost the site service (pid {self.pid}): {client.closed_reason}; "
                "waiting for it to come back",
            )
            wait_s = RECONNECT_S
            deadline = time.monotonic() + wait_s

    def _fail(self, message: str) -> None:
        self._gone = message
        self._say("ERROR", message)

    def _on_message(self, message: dict[str, Any]) -> None:
        self.seen = time.time()
        kind = message.get("type")
        try:
            if kind == "snapshot":
                self._queue.put(StateSnapshot(site=self.site, state=message["state"]))
            elif kind == "event":
                self._queue.put(event_from_dict(message["event"]))
        except (KeyError, ValueError, TypeError) as exc:
            self._say("WARNING", f"an unreadable message from the service: {exc}")

    def stop(self) -> None:
        """Detaches; a service this console launched (the demo) is asked to stop."""
        self._stopping.set()
        client = self.client
        if self.launch and client is not None:
            with contextlib.suppress(ActionError):
                client.call("shutdown", timeout=3)
        if client is not None:
            client.close()
        if self.proc is not None and self.proc.poll() is None and client is None:
            self.proc.terminate()  # it never opened its socket: nothing else would stop it

    # ------------------------------------------------------------------ actions

    def _call(self, name: str, *args: Any, timeout: float = 120.0) -> Any:
        if self.client is None:
            raise BridgeError(self._gone or "not attached to the site service yet; a moment")
        return self.client.call(name, *args, timeout=timeout)

    def transfer_mmars(self) -> list[str]:
        try:
            return list(self._call("transfer_mmars", timeout=5))
        except BridgeError:
            return []

    def latest_run(self) -> int | None:
        try:
            found = self._call("latest_run", timeout=5)
        except BridgeError:
            return None
        return int(found) if found is not None else None

    def deploy(self, mmar: str, run_number: int) -> str:
        return str(self._call("deploy", mmar, run_number))

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        return str(self._call("start_training", run_number, gpus))

    def abort(self) -> str:
        return str(self._call("abort"))

    def restart(self) -> str:
        return str(self._call("restart"))

    def validate(self) -> str:
        return str(self._call("validate"))

    def shutdown(self) -> str:
        return str(self._call("shutdown", timeout=10))
