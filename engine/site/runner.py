"""The site service: one engine per workspace, with the workspace lock and the control socket.

A site's engine runs in one process, the *service* (``fltui --no-ui``, or a console that found
no service and runs the engine itself). The service holds the workspace's lock
(``engine.site.lock``), serves its control socket (``engine.site.control_server``) and runs the
console's actions on the engine (``engine.site.actions``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import load_client_kit
from engine.events import EventBus, SitePulse
from engine.site.actions import SiteActions
from engine.site.control_server import ControlServer
from engine.site.lock import ActionError, ServiceInfo, WorkspaceLock
from engine.site.logs import attach_workspace_logs
from engine.site.state import PULSE_S

__all__ = ["ServiceHost", "SiteRunner"]

log = logging.getLogger(__name__)


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
        # The consoles' bus: every engine event, plus the service's pulse (which the event log
        # and the headless printer, subscribers of ``bus``, never see).
        self.console_bus = EventBus()
        self._unsubscribe: Callable[[], None] | None = None
        self._pulse_stop = threading.Event()
        self._pulse: threading.Thread | None = None

    def open(self) -> ServiceInfo:
        """Takes the workspace and opens the socket; raises WorkspaceBusy or ServiceError."""
        info = self.lock.acquire(self.site, self.mode)
        self._unsubscribe = self.bus.subscribe(self.console_bus.publish)
        try:
            control = ControlServer(
                Path(info.socket),
                self.console_bus,
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
            self._unsubscribe()
            self.lock.release()
            raise
        self.control, self.info = control, info
        self.lock.publish()
        self._pulse_stop.clear()
        self._pulse = threading.Thread(target=self._pulse_loop, name="pulse", daemon=True)
        self._pulse.start()
        return info

    def pulse(self) -> SitePulse:
        """What the service knows now of itself and its worker."""
        try:
            executor = getattr(self.actions.interface, "executor", None)
        except ActionError:  # the engine is (re)starting: no worker yet
            executor = None
        pid = getattr(executor, "pid", None) if executor is not None else None
        running = bool(executor is not None and executor.is_running())
        alive = False
        if pid is not None and running:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        return SitePulse(
            site=self.site,
            worker_pid=pid if running else None,
            worker_alive=alive,
            worker_seen=getattr(executor, "worker_seen", None),
        )

    def _pulse_loop(self) -> None:
        while not self._pulse_stop.wait(PULSE_S):
            try:
                self.console_bus.publish(self.pulse())
            except Exception:  # a pulse must never take the service down
                log.exception("the service's pulse failed")

    def close(self) -> None:
        self._pulse_stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
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
