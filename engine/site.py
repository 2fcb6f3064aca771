"""A site's engine in one process: startup kit + deployed MMAR → fitter + client, logged."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from engine.client.data_processors import build_client_state_processors, build_processors
from engine.client.deploy import code_refusal
from engine.client.fed_client import FederatedClient
from engine.config import (
    ClientKitConfig,
    ConfigError,
    MMARClientConfig,
    ServerEndpoint,
    load_client_kit,
    load_environment,
    load_mmar_client_config,
)
from engine.events import Event, EventBus, EventLogHandler, MetricsReported, ProgressUpdated
from engine.privacy import build_privacy

__all__ = [
    "SiteEngine",
    "SitePaths",
    "SiteService",
    "attach_workspace_logs",
    "find_deployed_mmar",
    "latest_run",
]

log = logging.getLogger("engine.site")

PROGRESS_PERIOD = 0.5  # seconds between two ProgressUpdated events of a site


@dataclass(frozen=True)
class SitePaths:
    """Where a site workspace keeps things (DESIGN §5)."""

    root: Path

    @property
    def startup(self) -> Path:
        return self.root / "startup"

    @property
    def kit(self) -> Path:
        return self.startup / "fed_client.json"

    @property
    def transfer(self) -> Path:
        return self.root / "transfer"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def mmar(self, run_number: int, site: str) -> Path:
        return self.root / f"run_{run_number}" / f"mmar_{site}"


def find_deployed_mmar(
    workspace: Path, site: str, run_number: int | None = None
) -> tuple[int, Path]:
    """The deployed MMAR to train: ``run_<N>/mmar_<site>``, the highest N unless one is given.

    Raises:
        ConfigError: there is no deployed MMAR (deploy one first).
    """
    paths = SitePaths(workspace)
    if run_number is not None:
        mmar = paths.mmar(run_number, site)
        if not (mmar / "config").is_dir():
            raise ConfigError(
                mmar, "", f"run {run_number} has no deployed MMAR for {site} (deploy first)"
            )
        return run_number, mmar
    number = latest_run(workspace, site)
    if number is None:
        raise ConfigError(
            workspace,
            "",
            f"no deployed MMAR (expected run_<N>/mmar_{site}/config/); deploy one first",
        )
    return number, paths.mmar(number, site)


def latest_run(workspace: Path, site: str) -> int | None:
    """The highest N with a deployed ``run_<N>/mmar_<site>/config``, or None."""
    numbers = [
        int(m.group(1))
        for p in Path(workspace).glob("run_*")
        if (m := re.fullmatch(r"run_([0-9]+)", p.name)) and (p / f"mmar_{site}" / "config").is_dir()
    ]
    return max(numbers) if numbers else None


class _JsonlWriter:
    """Appends every event as one JSON line to a file (``logs/events.jsonl``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_dict(), default=str)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _NotServer(logging.Filter):
    # A site's handlers sit on "engine"; the embedded server's records have their own files.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("engine.server")


def attach_workspace_logs(root: Path, bus: EventBus, site: str) -> Any:
    """Writes ``logs/fltui.log`` (human) and ``logs/events.jsonl`` (events) under ``root``.

    For site "server" the records of ``engine.server`` and the events of the server are kept;
    for a site, every other engine record and the site's own events. Engine log records also
    become LogRecord events on ``bus``.

    Returns:
        a function that detaches and closes everything.
    """
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(logs / "fltui.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    event_handler = EventLogHandler(bus, site)
    logger = logging.getLogger("engine.server" if site == "server" else "engine")
    logging.getLogger("engine").setLevel(logging.INFO)
    for handler in (file_handler, event_handler):
        if site != "server":
            handler.addFilter(_NotServer())
        logger.addHandler(handler)
    writer = _JsonlWriter(logs / "events.jsonl")

    def mine(event: Event) -> None:
        if event.site == site:
            writer(event)

    unsubscribe = bus.subscribe(mine)

    def detach() -> None:
        logger.removeHandler(file_handler)
        logger.removeHandler(event_handler)
        file_handler.close()
        unsubscribe()
        writer.close()

    return detach


def check_mmar(mmar: Path) -> None:
    """Parses an MMAR's configs and builds its built-in federated components (no torch).

    Components named by ``path`` (a site's own code) are not imported here: only the training
    worker runs them, after the site policy allowed them.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    from engine.training.config import load_train_config

    config = load_mmar_client_config(mmar)
    # environment.json and config_train.json's form too (a TensorFlow one is refused here,
    # before a worker starts); building the torch components is the worker's.
    load_train_config(mmar, load_environment(mmar))
    if config.privacy is not None and config.privacy.name is not None:
        build_privacy(config.privacy)
    build_processors([s for s in config.pre_processors if s.name is not None])
    build_processors([s for s in config.post_processors if s.name is not None])
    build_client_state_processors([s for s in config.client_state_processors if s.name is not None])


class SiteEngine:
    """Runs this site's part of a federation from its workspace.

    Args:
        workspace: the site workspace (``startup/fed_client.json``, ``run_<N>/mmar_<site>``).
        bus: where every event goes.
        run_number: the deployed run to train (default: the highest).
    """

    def __init__(self, workspace: Path, bus: EventBus, run_number: int | None = None) -> None:
        self.paths = SitePaths(Path(workspace))
        self.bus = bus
        self.kit: ClientKitConfig = load_client_kit(self.paths.kit)
        self.site = self.kit.client_name
        self.run_number, self.mmar = find_deployed_mmar(self.paths.root, self.site, run_number)
        # The site policy before anything of the MMAR is built: its own code is imported only
        # where allow_byoc says so (the worker also gates every import: set_code_policy).
        from engine.client.policy import load_site_policy

        self.policy = load_site_policy(self.paths.startup / "site_policy.json")
        refusal = code_refusal(self.mmar, self.policy.allow_byoc, self.policy.path)
        if refusal:
            raise ConfigError(self.mmar, "", refusal)
        self.mmar_config: MMARClientConfig = load_mmar_client_config(self.mmar)
        custom = [self.mmar / "custom"]
        self.privacy = build_privacy(self.mmar_config.privacy, custom)
        self.pre_processors = build_processors(self.mmar_config.pre_processors, custom)
        self.post_processors = build_processors(self.mmar_config.post_processors, custom)
        self.client_state_processors = build_client_state_processors(
            self.mmar_config.client_state_processors, custom
        )
        self.client: FederatedClient | None = None
        self._last_progress = 0.0
        self.rank, self.world_size = 0, 1

    def distributed(self, rank: int, world_size: int) -> None:
        """Makes this engine one rank of a multi-GPU run (set before ``build``).

        ``torch.distributed`` is initialised from the environment (MASTER_ADDR, MASTER_PORT):
        NCCL on GPUs, gloo on CPU. Only rank 0 talks to the server; it broadcasts each global
        model to the others, and all ranks train together (DistributedDataParallel).
        """
        self.rank, self.world_size = rank, world_size

    def _server_args(self) -> list[Any]:
        # The MMAR names the task; the startup kit says where its server is.
        task = self.mmar_config.task_name
        for server in self.kit.servers:
            if server.name == task:
                # The MMAR's service.options go to gRPC too; the kit's win for the same option.
                given = {name for name, _ in server.options}
                extra = [o for o in self.mmar_config.server_options(task) if o[0] not in given]
                if extra:
                    server = ServerEndpoint(server.name, server.target, [*server.options, *extra])
                return [server]
        names = ", ".join(s.name for s in self.kit.servers)
        raise ConfigError(
            self.mmar_config.path,
            "servers[0].name",
            f"task {task!r} is not served by any server of {self.kit.path} ({names})",
        )

    def _on_progress(self, step: int, total: int, epoch: int, loss: float) -> None:
        now = time.monotonic()
        if step < total and now - self._last_progress < PROGRESS_PERIOD:
            return
        self._last_progress = now
        rnd = (self.client.current_round + 1) if self.client else 0
        self.bus.publish(
            ProgressUpdated(
                site=self.site, round=rnd, step=step, total_steps=total, epoch=epoch, loss=loss
            )
        )

    def _on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        rnd = (self.client.current_round + 1) if self.client else 0
        self.bus.publish(
            MetricsReported(site=self.site, round=rnd, scope="train", metrics=metrics, epoch=epoch)
        )

    def build(self) -> FederatedClient:
        """Builds the fitter and the client (imports torch)."""
        from engine.training import build_fitter

        cfg = self.mmar_config
        device = None
        if self.world_size > 1:
            device = self._init_distributed()
        self.fitter = build_fitter(
            self.mmar,
            site_name=self.site,
            local_epochs=cfg.local_epochs,
            steps_aggregation=cfg.steps_aggregation,
            on_progress=self._on_progress if self.rank == 0 else None,
            on_epoch_end=self._on_epoch_end if self.rank == 0 else None,
            device=device,
        )
        if self.world_size > 1:
            self.fitter.enable_distributed(self.rank, self.world_size)
        kit = self.kit
        self.client = FederatedClient(
            self.site,
            {
                "heartbeat_interval": kit.heartbeat_interval,
                # The session token file there is shared with the site service (renewals).
                "workspace": self.paths.root,
                # The kit's certificates: the site's identity, which registered the session this
                # worker uses (the server binds tokens to certificates). An MMAR's ssl_* are
                # checked, not used.
                "ssl_args": {
                    "ssl_root_cert": kit.ssl_root_cert,
                    "ssl_cert": kit.ssl_cert,
                    "ssl_private_key": kit.ssl_private_key,
                },
            },
            kit.secure_train,
            self._server_args(),
            exclude_vars=cfg.exclude_vars,
            privacy=self.privacy,
            retry_timeout=cfg.retry_timeout if cfg.retry_timeout is not None else kit.retry_timeout,
            cross_site_validate=cfg.cross_site_validate,
            pre_processors=self.pre_processors,
            post_processors=self.post_processors,
            client_state_processors=self.client_state_processors,
            compression=cfg.wire_compression or kit.compression,
            bus=self.bus,
        )
        if self.world_size > 1:
            self.client.round_sync = self._sync_ranks
        return self.client

    def _init_distributed(self) -> str:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            torch.cuda.set_device(local)
            backend, device = "nccl", f"cuda:{local}"
        else:
            backend, device = "gloo", "cpu"
        if not dist.is_initialized():
            from datetime import timedelta

            # Not torch's 30 min default: a rank whose peers died must give up its GPU soon.
            dist.init_process_group(
                backend, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=120)
            )
        return device

    def _sync_ranks(self, go_on: bool) -> None:
        """Rank 0, after each pull: tells the other ranks whether to train, and with what."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if go_on else 0], device=self.fitter.device)
        dist.broadcast(flag, src=0)
        if go_on:
            self.fitter.broadcast_weights(0)

    def _follow(self) -> str:
        """Ranks > 0: train each round on rank 0's global model until rank 0 says stop."""
        import torch
        import torch.distributed as dist

        flag = torch.zeros(1, dtype=torch.long, device=self.fitter.device)
        while True:
            dist.broadcast(flag, src=0)
            if not int(flag.item()):
                return "completed"
            self.fitter.broadcast_weights(0)
            self.fitter.train()

    def validate_only(self) -> str:
        """Cross-site validation on its own (the admin's ``validate``), with the best model."""
        client = self.client or self.build()
        try:
            client.model_manager.set_fitter(self.fitter)
            results = client.run_cross_site_validation()
        except Exception as exc:
            log.error("%s: cross-site validation failed: %s", self.site, exc)
            return "failed"
        finally:
            client.communicator.close()
        log.info("%s: cross-site validation done: %d models", self.site, len(results))
        return "completed"

    def run(self) -> str:
        """Runs the federation to its end in this thread; returns the outcome."""
        client = self.client or self.build()
        if self.rank > 0:
            return self._follow()
        log.info(
            "%s: training %s (run %d) with server %s",
            self.site,
            self.mmar.name,
            self.run_number,
            client.servers[client.task_name].target,
        )
        return client.admin_run(self.fitter)

    def abort(self) -> None:
        if self.client is not None:
            self.client.abort()


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
        from concurrent.futures import ThreadPoolExecutor

        from engine.client.admin import AdminMessageSender, FedAdminAgent
        from engine.client.admin_interface import ClientAdminInterface
        from engine.client.executor import ProcessExecutor, ThreadExecutor
        from engine.client.fed_client_base import FederatedClientBase
        from engine.client.policy import AuditLog, load_site_policy
        from engine.client.processors import request_processors

        self.paths = SitePaths(Path(workspace))
        self.bus = bus
        self.kit = load_client_kit(self.paths.kit)
        self.site = self.kit.client_name
        self.policy = load_site_policy(self.paths.startup / "site_policy.json")
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
        from engine.admin_defs import Topic
        from engine.client.admin_interface import AdminError
        from engine.client.communicator import FLCommunicationError
        from engine.client.status import ClientStatus
        from engine.events import FederationFinished

        number = None
        if auto_start:
            number, mmar = find_deployed_mmar(self.paths.root, self.site, run_number)
            refusal = code_refusal(mmar, self.policy.allow_byoc, self.policy.path)
            if refusal:
                raise ConfigError(mmar, "", refusal)
            # Config mistakes are found here, with file and key, before anything starts.
            check_mmar(mmar)
        from engine.events import SiteConfigured

        self.bus.publish(
            SiteConfigured(
                site=self.site,
                server=self.kit.servers[0].target,
                tls=self.kit.secure_train,
                workspace=str(self.paths.root),
                executor=self.executor.kind,
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
