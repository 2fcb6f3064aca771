"""Engine ↔ console: events queue up from any thread; actions run on the site's admin interface.

The console reaches the engine only through ``SiteBridge``: ``drain()`` hands over the events
that arrived since the last call (the app calls it a few times a second, on its own thread, so
high-rate events are coalesced into one screen update), and the action methods are called from
Textual thread workers. ``LocalBridge`` runs the engine in this process: a site from its
workspace, or the whole demo federation. A bridge to a running site service (over its control
socket) implements the same interface.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

from engine.admin_defs import Message, MsgHeader, Topic
from engine.events import Event, EventBus, LogRecord

__all__ = ["BridgeError", "LocalBridge", "SiteBridge"]

MAX_PENDING = 20_000


class BridgeError(RuntimeError):
    """An action that cannot be done (the text is for the operator)."""


class SiteBridge:
    """What the console needs from a site's engine."""

    site: str = ""
    mode: str = ""

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

    def latest_run(self) -> int | None:
        return None


class LocalBridge(SiteBridge):
    """The engine in this process.

    Args:
        workspace: the site workspace (or, in demo mode, the demo's root folder).
        demo: run the demo federation (server + site-1 here, peers as child processes).
        demo_sites, demo_rounds: the demo's size.
        gpu_sampler: an ``engine.gpu.GpuSampler``-like object (``start(bus, site)``/``stop()``),
            or None for none.
    """

    def __init__(
        self,
        workspace: Path,
        demo: bool = False,
        demo_sites: int = 3,
        demo_rounds: int = 5,
        gpu_sampler: Any = None,
    ) -> None:
        self.workspace = Path(workspace)
        self.demo = demo
        self.mode = "demo" if demo else "site"
        self.demo_sites, self.demo_rounds = demo_sites, demo_rounds
        self.bus = EventBus()
        self._pending: collections.deque[Event] = collections.deque(maxlen=MAX_PENDING)
        self._lock = threading.Lock()
        self.bus.subscribe(self._queue)
        self._thread: threading.Thread | None = None
        self._service: Any = None
        self._demo: Any = None
        self._stopping = threading.Event()
        self.gpu_sampler = gpu_sampler
        self.site = "site-1" if demo else ""
        self.result: Any = None

    # ------------------------------------------------------------------ events

    def _queue(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)

    def drain(self) -> list[Event]:
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
        return events

    def _say(self, level: str, message: str) -> None:
        self.bus.publish(
            LogRecord(site=self.site or "console", level=level, logger="fltui", message=message)
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Starts the engine in a background thread (never blocks the caller)."""
        target = self._run_demo if self.demo else self._run_site
        self._thread = threading.Thread(target=target, name="engine", daemon=True)
        self._thread.start()

    def _start_gpu(self, site: str) -> None:
        if self.gpu_sampler is not None:
            self.gpu_sampler.start(self.bus, site)

    def _run_demo(self) -> None:
        from engine.demo import DemoFederation

        self._start_gpu("site-1")
        demo = DemoFederation(
            self.workspace,
            self.bus,
            self.demo_sites,
            self.demo_rounds,
            torch_in_subprocess=True,
            site_1_stays=True,
        )
        self._demo = demo
        try:
            self.result = demo.run()
        except Exception as exc:  # the console shows it; it must not vanish with the thread
            self._say("ERROR", f"demo federation failed: {type(exc).__name__}: {exc}")
        else:
            outcome = "finished" if self.result.ok else "FAILED"
            self._say("INFO", f"demo federation {outcome}: {self.result.outcomes}")

    def _run_site(self) -> None:
        from engine.config import ConfigError
        from engine.site import SiteService, attach_workspace_logs

        while not self._stopping.is_set():
            try:
                service = SiteService(self.workspace, self.bus)
            except ConfigError as exc:
                self._say("ERROR", str(exc))
                return
            self.site = service.site
            self._service = service
            if self._stopping.is_set():  # stop() came while the service was being built
                return
            self._start_gpu(service.site)
            detach = attach_workspace_logs(self.workspace, self.bus, service.site)
            try:
                service.run(auto_start=False)
            except Exception as exc:
                self._say("ERROR", f"site engine failed: {type(exc).__name__}: {exc}")
                return
            finally:
                detach()
            if not service.restart_requested:
                return
            self._say("INFO", "restarting the site engine")

    def stop(self) -> None:
        """Stops the engine (the demo's peers too); waits a little for it."""
        self._stopping.set()
        if self.gpu_sampler is not None:
            self.gpu_sampler.stop()
        if self._demo is not None:
            self._demo.abort()
        service = self._service
        if service is not None:
            service.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=20)

    # ------------------------------------------------------------------ actions

    @property
    def interface(self) -> Any:
        service = self._demo.site_service if self._demo is not None else self._service
        if service is None:
            raise BridgeError("the site engine is still starting; try again in a moment")
        return service.interface

    def _site_root(self) -> Path:
        return self.workspace / "site-1" if self.demo else self.workspace

    def _local(self, topic: str, action: Any, *args: Any) -> str:
        from engine.client.admin_interface import AdminError

        try:
            return str(self.interface.local(topic, action, *args))
        except AdminError as exc:
            raise BridgeError(str(exc)) from None

    def transfer_mmars(self) -> list[str]:
        folder = self._site_root() / "transfer"
        return sorted(p.name for p in folder.glob("*") if (p / "config").is_dir())

    def latest_run(self) -> int | None:
        from engine.site import latest_run

        return latest_run(self._site_root(), self.site or "site-1")

    def deploy(self, mmar: str, run_number: int) -> str:
        from engine.client.deploy import DeployError, make_mmar_zip

        path = Path(mmar)
        folder = path if path.is_absolute() else self._site_root() / "transfer" / mmar
        if not (folder / "config").is_dir():
            raise BridgeError(f"{folder} is not an MMAR (no config/ folder)")
        try:
            data = make_mmar_zip(folder)
        except DeployError as exc:
            raise BridgeError(str(exc)) from None
        request = Message(
            Topic.DEPLOY,
            data,
            {MsgHeader.RUN_NUMBER: str(run_number), MsgHeader.APP_NAME: folder.name},
        )
        return self._local(Topic.DEPLOY, self.interface.deploy_mmar, request)

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        if gpus > 1:
            return self._local(Topic.START_MGPU, self.interface.start_mgpu_client, run_number, gpus)
        return self._local(Topic.START, self.interface.start_client, run_number)

    def abort(self) -> str:
        return self._local(Topic.ABORT, self.interface.abort_client)

    def restart(self) -> str:
        return self._local(Topic.RESTART, self.interface.restart_client)

    def validate(self) -> str:
        request = Message(Topic.VALIDATE, "", {MsgHeader.USER_NAME: "local"})
        return self._local(Topic.VALIDATE, self.interface.do_validate, request)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Waits until actions can be taken (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.interface  # noqa: B018 - raises until the engine is up
                return True
            except BridgeError:
                time.sleep(0.05)
        return False
