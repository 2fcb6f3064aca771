"""A site's engine in one process: startup kit + deployed MMAR → fitter + client, logged."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.client.data_processors import build_client_state_processors, build_processors
from engine.client.fed_client import FederatedClient
from engine.config import (
    LOCAL_ENVIRONMENT_FILE,
    ClientKitConfig,
    ConfigError,
    ConfigProblems,
    MMARClientConfig,
    ServerEndpoint,
    load_client_kit,
    load_environment,
    load_mmar_client_config,
    local_environment_file,
)
from engine.events import EventBus, MetricsReported, ProgressUpdated
from engine.privacy import build_privacy
from engine.site.deploy import policy_refusal
from engine.site.paths import SitePaths, find_deployed_mmar
from engine.site.policy import load_site_policy
from engine.training import build_fitter
from engine.training.config import bundle_layout_problems, is_bundle, load_train_config
from engine.training.script import script_model_problem

PROGRESS_PERIOD = 0.5  # seconds between two ProgressUpdated events of a site

__all__ = ["SiteEngine", "check_mmar", "served_endpoint"]

log = logging.getLogger("engine.site")


def served_endpoint(kit: ClientKitConfig, mmar_config: MMARClientConfig) -> ServerEndpoint:
    """The startup kit's server for the MMAR's task (``servers[0].name``).

    Raises:
        ConfigError: no server of the kit serves that task (naming the MMAR's key, the task
            and the kit's federations).
    """
    task = mmar_config.task_name
    if not task and len(kit.servers) == 1:
        task = kit.servers[0].name  # an MMAR that names none (a bare MONAI bundle)
    for server in kit.servers:
        if server.name == task:
            return server
    names = ", ".join(s.name for s in kit.servers)
    raise ConfigError(
        mmar_config.path,
        "servers[0].name",
        f"task {task!r} is not served by any server of {kit.path} ({names}); the MMAR's "
        "servers[0].name must name the federation of this site's startup kit",
    )


def check_mmar(mmar: Path, kit: ClientKitConfig | None = None) -> None:
    """Parses an MMAR's configs and builds its built-in federated components (no torch).

    Components named by ``path`` (a site's own code) are not imported here: only the training
    worker runs them, after the site policy allowed them. With ``kit`` (the site's startup
    kit), the MMAR's task must be one of the kit's federations, as at start.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    config = load_mmar_client_config(mmar)
    if kit is not None:
        served_endpoint(kit, config)
    # environment.json (with the site's own local/environment.json over it, for an MMAR in a
    # site workspace) and config_train.json's form too (a TensorFlow one is refused here,
    # before a worker starts); building the torch components is the worker's.
    environment = load_environment(mmar, local_environment_file(mmar))
    if config.script is not None:
        # The research team's own script (run only where the policy allows custom/ code):
        # no training config to parse, but a model to start from.
        problem = script_model_problem(mmar)
        if problem is not None:
            raise problem
    elif is_bundle(mmar):
        problems = bundle_layout_problems(mmar)
        if problems:
            raise problems[0] if len(problems) == 1 else ConfigProblems(problems)
    else:
        load_train_config(mmar, environment)
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
        self.policy = load_site_policy(self.paths.startup / "site_policy.json")
        refusal = policy_refusal(self.mmar, self.policy)
        if refusal:
            raise ConfigError(self.mmar, "", refusal)
        # The site's own variables (its data, its datalist) over the MMAR's: one MMAR for every
        # site. The fitter finds the same file (engine.config.local_environment_file).
        local = self.paths.root / LOCAL_ENVIRONMENT_FILE
        self.environment = load_environment(self.mmar, local)
        if self.environment.local_names:
            log.info(
                "%s: %s sets %s over the MMAR's config/environment.json",
                self.site,
                local,
                ", ".join(self.environment.local_names),
            )
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
        server = served_endpoint(self.kit, self.mmar_config)
        # The MMAR's service.options go to gRPC too; the kit's win for the same option.
        given = {name for name, _ in server.options}
        extra = [o for o in self.mmar_config.server_options(server.name) if o[0] not in given]
        if extra:
            server = ServerEndpoint(server.name, server.target, [*server.options, *extra])
        return [server]

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
        cfg = self.mmar_config
        device = None
        # A script runs its ranks itself (torchrun semantics, started by rank 0's trainer):
        # the workers form no process group of their own for it.
        workers_train = self.world_size > 1 and cfg.script is None
        if workers_train:
            device = self._init_distributed()
        self.fitter = build_fitter(
            self.mmar,
            site_name=self.site,
            local_epochs=cfg.local_epochs,
            steps_aggregation=cfg.steps_aggregation,
            on_progress=self._on_progress if self.rank == 0 else None,
            on_epoch_end=self._on_epoch_end if self.rank == 0 else None,
            device=device,
            script=cfg.script,
            round_info=self._round_info,
            ranks=self.world_size,
        )
        if workers_train:
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
        if workers_train:
            self.client.round_sync = self._sync_ranks
        return self.client

    def _round_info(self) -> tuple[int, int]:
        """``(current_round, total_rounds)`` of the federation, for a script's tasks."""
        if self.client is None:
            return 0, 0
        return self.client.current_round, self.client.num_rounds

    def _end_training(self, outcome: str) -> None:
        """A trainer that runs a process of its own (a script) ends it with the run."""
        close = getattr(getattr(self, "fitter", None), "close", None)
        if close is not None:
            try:
                close(outcome)
            except Exception as exc:  # the outcome stands; say why the end was untidy
                log.warning("%s: ending the training script: %s", self.site, exc)

    def _init_distributed(self) -> str:
        import torch  # deferred: torch loads in the worker, not with the site's engine
        import torch.distributed as dist  # deferred: part of torch, loaded in the worker only

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            torch.cuda.set_device(local)
            backend, device = "nccl", f"cuda:{local}"
        else:
            backend, device = "gloo", "cpu"
        if not dist.is_initialized():
            # Not torch's 30 min default: a rank whose peers died must give up its GPU soon.
            dist.init_process_group(
                backend, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=120)
            )
        return device

    def _sync_ranks(self, go_on: bool) -> None:
        """Rank 0, after each pull: tells the other ranks whether to train, and with what."""
        import torch  # deferred: torch loads in the worker, not with the site's engine
        import torch.distributed as dist  # deferred: part of torch, loaded in the worker only

        flag = torch.tensor([1 if go_on else 0], device=self.fitter.device)
        dist.broadcast(flag, src=0)
        if go_on:
            self.fitter.broadcast_weights(0)

    def _follow(self) -> str:
        """Ranks > 0: train each round on rank 0's global model until rank 0 says stop."""
        import torch  # deferred: torch loads in the worker, not with the site's engine
        import torch.distributed as dist  # deferred: part of torch, loaded in the worker only

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
        outcome = "failed"
        try:
            client.model_manager.set_fitter(self.fitter)
            results = client.run_cross_site_validation()
            outcome = "completed"
        except Exception as exc:
            log.error("%s: cross-site validation failed: %s", self.site, exc)
            return "failed"
        finally:
            client.communicator.close()
            self._end_training(outcome)
        log.info("%s: cross-site validation done: %d models", self.site, len(results))
        return "completed"

    def run(self) -> str:
        """Runs the federation to its end in this thread; returns the outcome."""
        client = self.client or self.build()
        if self.rank > 0:
            if self.mmar_config.script is not None:
                log.info(
                    "%s: rank %d: the script's ranks are started by rank 0", self.site, self.rank
                )
                return "completed"
            return self._follow()
        log.info(
            "%s: training %s (run %d) with server %s",
            self.site,
            self.mmar.name,
            self.run_number,
            client.servers[client.task_name].target,
        )
        outcome = "failed"
        try:
            outcome = client.admin_run(self.fitter)
        finally:
            self._end_training(outcome)
        return outcome

    def abort(self) -> None:
        if self.client is not None:
            self.client.abort()
