"""The site's long-running engine: a registered session, the admin agent and an executor."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.admin_defs import Topic
from engine.client.admin import AdminMessageSender, FedAdminAgent
from engine.client.communicator import FLCommunicationError
from engine.client.fed_client_base import FederatedClientBase
from engine.config import (
    ConfigError,
    load_client_kit,
)
from engine.events import EventBus, FederationFinished, SiteConfigured
from engine.site.admin_interface import AdminError, ClientAdminInterface
from engine.site.deploy import policy_refusal
from engine.site.executor import ProcessExecutor, ThreadExecutor
from engine.site.paths import SitePaths, find_deployed_mmar
from engine.site.policy import AuditLog, LivePolicy
from engine.site.processors import request_processors
from engine.site.site_engine import check_mmar
from engine.status import ClientStatus

__all__ = ["SiteService"]

log = logging.getLogger("engine.site")


class SiteService:
    """The site's long-running engine: a registered session, the admin agent and an executor.

    The service registers and heart-beats for the site; training runs in a worker process
    (or a thread) that uses the service's session, so the site stays administrable between
    runs. Local actions (``interface.local``) and the federation's requests go through the same
    ClientAdminInterface and into the same audit log.

    Args:
        workspace: the site workspace.
        bus: where every event goes (the worker's included).
        executor: "process" (default: a child process group per run) or "thread".
    """

    def __init__(self, workspace: Path, bus: EventBus, executor: str = "process") -> None:
        self.paths = SitePaths(Path(workspace))
        self.bus = bus
        self.kit = load_client_kit(self.paths.kit)
        self.site = self.kit.client_name
        # Read afresh at each use (deploy, start, every request): an edit of the policy takes
        # effect without restarting the site; a broken edit refuses everything.
        self.policy = LivePolicy(self.paths.startup / "site_policy.json")
        self.audit = AuditLog(self.paths.logs / "audit.jsonl")
        server = self.kit.servers[0]
        ssl = {
            "ssl_root_cert": self.kit.ssl_root_cert,
            "ssl_cert": self.kit.ssl_cert,
            "ssl_private_key": self.kit.ssl_private_key,
        }
        self.session = FederatedClientBase(
            self.site,
            {
                "heartbeat_interval": self.kit.heartbeat_interval,
                "ssl_args": ssl,
                "workspace": self.paths.root,
            },
            self.kit.secure_train,
            [server],
            retry_timeout=self.kit.retry_timeout,
            compression=self.kit.compression,
            bus=bus,
        )
        # Registered before any MMAR is known: whether its runs encrypt (HE) is the MMAR's, so
        # the session does not say; the server checks every upload (and the worker's own).
        self.session.communicator.declares_he = False
        if executor == "thread":
            self.executor: Any = ThreadExecutor(self.session, ThreadPoolExecutor(1))
        elif executor == "process":
            threads = os.environ.get("OMP_NUM_THREADS")
            self.executor = ProcessExecutor(
                self.paths.root, {"OMP_NUM_THREADS": threads} if threads else None
            )
        else:
            raise ValueError(f"executor must be 'process' or 'thread', got {executor!r}")
        self.sender = AdminMessageSender(
            lambda: self.session.token or "",
            root_cert=str(self.kit.ssl_root_cert) if self.kit.ssl_root_cert else None,
            ssl_cert=str(self.kit.ssl_cert) if self.kit.ssl_cert else None,
            private_key=str(self.kit.ssl_private_key) if self.kit.ssl_private_key else None,
            server_args={"target": server.target, "options": server.options},
            secure=self.kit.secure_train,
        )
        self.interface = ClientAdminInterface(
            self.session,
            self.site,
            self.sender,
            {
                "workspace": self.paths.root,
                "executor": self.executor,
                "policy": self.policy,
                "audit": self.audit,
                "bus": bus,
                "on_shutdown": self._on_shutdown,
            },
        )
        self.agent = FedAdminAgent(self.site, self.sender, self.interface)
        # Clara 3.1's req_processors in the kit: only those topics are served.
        for processor in request_processors(self.kit.req_processors):
            self.agent.register_processor(processor)
        self.interface.set_agent(self.agent)
        self.restart_requested = False
        # Why registration failed; ``failure.security``: TLS/auth refused it (exit code 3).
        self.failure: Any = None
        self._done = threading.Event()
        self._stopped = False

    def _on_shutdown(self, restart: bool) -> None:
        self.restart_requested = restart
        self._done.set()

    def request_stop(self) -> None:
        """Ends ``run`` (as a shutdown request would), cutting short any retry in progress."""
        self._done.set()
        self.session.stop_event.set()

    def run(
        self, auto_start: bool = True, run_number: int | None = None, stay: bool = False
    ) -> str:
        """Registers, serves admin requests and, with ``auto_start``, trains a deployed run.

        Args:
            auto_start: train the deployed run at once.
            run_number: which run (default: the latest).
            stay: keep serving after that training ends, until a stop request (a console).

        Returns:
            with ``auto_start``: the training's outcome ("completed", "aborted", "failed");
            otherwise "stopped" after a shutdown or restart request.
        """
        number = None
        if auto_start:
            number, mmar = find_deployed_mmar(self.paths.root, self.site, run_number)
            refusal = policy_refusal(mmar, self.policy.current())
            if refusal:
                raise ConfigError(mmar, "", refusal)
            # Config mistakes are found here, with file and key, before anything starts.
            check_mmar(mmar)
        self.bus.publish(
            SiteConfigured(
                site=self.site,
                server=self.kit.servers[0].target,
                tls=self.kit.secure_train,
                workspace=str(self.paths.root),
                executor=self.executor.kind,
                heartbeat_interval=self.kit.heartbeat_interval,
            )
        )
        try:
            self.session.register()
        except FLCommunicationError as exc:
            self.failure = exc
            self.session.set_status(ClientStatus.TRAINING_EXCEPTION, exc.reason)
            self.bus.publish(
                FederationFinished(site=self.site, outcome="failed", rounds=0, detail=exc.reason)
            )
            self.session.communicator.close()
            return "failed"
        self.session.start_heartbeat()
        self.agent.start()
        try:
            if not auto_start:
                self._done.wait()
                return "stopped"
            try:
                self.interface.local(Topic.START, self.interface.start_client, number)
            except AdminError as exc:
                log.error("%s: cannot start run %s: %s", self.site, number, exc)
                return "failed"
            while not self._done.is_set():
                if self.executor.wait_process_complete(self.session, timeout=0.5):
                    break
            if self._done.is_set():
                return "aborted"
            outcome = getattr(self.executor, "outcome", None)
            if outcome is None:
                future = getattr(self.executor, "_future", None)
                outcome = future.result() if future is not None else None
            if stay:
                self._done.wait()
            return outcome or "failed"
        finally:
            self.stop()

    def stop(self) -> None:
        """Stops training, the agent and the session (Quit), in that order; once (an interrupt
        handler may call it after ``run`` did: a second Quit is refused as an unknown site)."""
        if self._stopped:
            return
        self._stopped = True
        self.agent.shutdown()
        self.executor.close()
        # Say goodbye to the server even after a stop request, but do not linger on it.
        self.session.stop_event.clear()
        self.session.communicator.retry_timeout = min(self.session.communicator.retry_timeout, 2.0)
        self.session.close()
        self.sender.close()
        self.interface.close()
