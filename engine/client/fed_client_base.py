"""FederatedClientBase: registration, model pull/push, heartbeat and cross-site validation steps."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc

from engine.client.communicator import Communicator, FLCommunicationError, RemoteModel
from engine.client.data_assembler import DataAssembler
from engine.client.fl_context import FLContext
from engine.client.model_manager import ClientModelManager
from engine.client.status import ClientStatus
from engine.config import ServerEndpoint
from engine.events import (
    CrossSiteValidated,
    EventBus,
    HeartbeatAcknowledged,
    PhaseChanged,
    StatusChanged,
)

__all__ = ["FederatedClientBase"]

log = logging.getLogger("engine.client")


def _servers(server_args: Any) -> dict[str, ServerEndpoint]:
    if isinstance(server_args, Mapping):
        return dict(server_args)
    return {s.name: s for s in server_args}


class FederatedClientBase:
    """Federated client-side base: the steps both FederatedClient and DirectFederatedClient use.

    Args:
        client_id: this site's name.
        client_args: extra settings: ``heartbeat_interval`` (s), ``cross_val_timeout`` (s),
            ``cross_val_poll`` (s), ``ssl_args``.
        secure_train: TLS on the channel.
        server_args: the servers, as ServerEndpoints or ``{task_name: ServerEndpoint}``.
        exclude_vars: regex of variables kept local.
        privacy: PrivacyProtocol for Δ, or None.
        retry_timeout: seconds within which transient failures are retried.
        cross_site_validate: take part in cross-site validation after training.
        model_reader_writer: see ClientModelManager.
        model_validator: see ClientModelManager.
        pre_processors: DataProcessors run on each contribution before upload.
        post_processors: DataProcessors run on each model after download.
        client_state_processors: processors adding metadata to every ClientState.
        req_processors: admin request processors (run by the admin agent).
        handlers: event handlers of the lineage (called with every event).
        compression: "Gzip", "Deflate" or None.
        bus: where this client's events go.
    """

    def __init__(
        self,
        client_id: str,
        client_args: Mapping[str, Any] | None,
        secure_train: bool,
        server_args: Any = None,
        exclude_vars: str | None = None,
        privacy: Any = None,
        retry_timeout: float = 30,
        cross_site_validate: bool = False,
        model_reader_writer: Any = None,
        model_validator: Any = None,
        pre_processors: list[Any] | None = None,
        post_processors: list[Any] | None = None,
        client_state_processors: list[Any] | None = None,
        req_processors: list[Any] | None = None,
        handlers: list[Any] | None = None,
        compression: str | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.client_name = client_id
        self.client_args = dict(client_args or {})
        self.servers = _servers(server_args or [])
        if not self.servers:
            raise ValueError("a federated client needs at least one server")
        self.secure_train = secure_train
        self.cross_site_validate = cross_site_validate
        self.pre_processors = list(pre_processors or [])
        self.post_processors = list(post_processors or [])
        self.req_processors = list(req_processors or [])
        self.bus = bus or EventBus()
        for handler in handlers or []:
            self.bus.subscribe(handler)
        self.stop_event = threading.Event()
        self.model_manager = ClientModelManager(
            task_names=list(self.servers),
            exclude_vars=exclude_vars,
            privacy=privacy,
            model_reader_writer=model_reader_writer,
            model_validator=model_validator,
        )
        self.communicator = Communicator(
            model_manager=self.model_manager,
            ssl_args=self.client_args.get("ssl_args"),
            secure_train=secure_train,
            retry_timeout=retry_timeout,
            pre_processors=self.pre_processors,
            post_processors=self.post_processors,
            client_state_processors=client_state_processors,
            compression=compression,
            bus=self.bus,
            site=client_id,
            stop=self.stop_event,
        )
        self.token: str | None = None
        self.status = ClientStatus.TRAINING_NOT_STARTED
        self.current_round = 0
        self.num_rounds = 0
        self.train_end = False
        self.remote_models: dict[str, RemoteModel] = {}
        self.cross_site_results: dict[str, dict[str, float]] = {}
        self.heartbeat_interval = float(self.client_args.get("heartbeat_interval", 60.0))
        self._heartbeat_done = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._token_lock = threading.Lock()

    # ------------------------------------------------------------------ context and status

    @property
    def app_context(self) -> dict[str, Any]:
        """What processors see of the client: site, round, token state."""
        return {
            "client_name": self.client_name,
            "current_round": self.current_round,
            "num_rounds": self.num_rounds,
            "status": self.status,
        }

    def set_status(self, status: int, detail: str = "") -> None:
        if status == self.status and not detail:
            return
        self.status = status
        self.bus.publish(
            StatusChanged(
                site=self.client_name,
                status=status,
                message=ClientStatus.get_status_message(status),
                detail=detail,
            )
        )

    def phase(self, phase: str, round: int | None = None) -> None:
        """Publishes the phase; ``round`` is 1-based (default: the round being trained)."""
        rnd = self.current_round + 1 if round is None else round
        self.bus.publish(PhaseChanged(site=self.client_name, phase=phase, round=rnd))

    @property
    def task_name(self) -> str:
        return next(iter(self.servers))

    # ------------------------------------------------------------------ registration

    def client_register(self, task_name: str) -> str:
        """Registers with ``task_name``'s server and keeps the token."""
        token = self.communicator.client_registration(self.client_name, self.servers, task_name)
        with self._token_lock:
            self.token = token
        log.info("%s registered with %s", self.client_name, self.servers[task_name].target)
        return token

    def register(self) -> None:
        """Registers with every server."""
        for task_name in self.servers:
            self.client_register(task_name)

    def _with_token(self, action: Any) -> Any:
        """Runs ``action(token)``; registers again once if the server forgot this site."""
        if self.token is None:
            self.register()
        try:
            return action(self.token)
        except FLCommunicationError as exc:
            if not exc.token_expired:
                raise
            log.warning(
                "%s: the server no longer knows this site; registering again", self.client_name
            )
            self.register()
            return action(self.token)

    # ------------------------------------------------------------------ models

    def fetch_remote_model(self, task_name: str) -> RemoteModel:
        """Fetches the server's current model for ``task_name`` (waits for the next round)."""
        return self._with_token(
            lambda token: self.communicator.getModel(
                self.servers, task_name, token, self.app_context
            )
        )

    def pull_models(self) -> bool:
        """Fetches the global models, runs the post-processors and loads them locally.

        Returns:
            True if the local model changed.
        """
        from engine.client.data_processors import DataContext

        for task_name in self.servers:
            remote = self.fetch_remote_model(task_name)
            data_ctx = DataContext(model=remote.params, header=remote.meta, fl_ctx=FLContext())
            for processor in self.post_processors:
                processor.process(data_ctx, self.app_context)
            remote.params = data_ctx.model
            self.remote_models[task_name] = remote
        self.check_progress(self.remote_models)
        return self.model_manager.assign_current_model(self.remote_models)

    def check_progress(self, remote_models: Mapping[str, RemoteModel]) -> None:
        """Updates round and end-of-training state from the received models' meta."""
        for remote in remote_models.values():
            self.current_round = int(remote.meta.current_round)
            self.num_rounds = int(remote.meta.num_rounds)
            if remote.meta.finished:
                self.train_end = True

    def push_remote_model(self, task_name: str) -> str:
        """Reads Δ, runs privacy and the pre-processors, and submits it to ``task_name``."""
        fl_ctx = FLContext(best_validation_metric=self._best_metric())

        def submit(token: str) -> str:
            state = self.communicator.get_client_state(task_name, token, self.app_context)
            header, data = DataAssembler.get_contribution_data(
                self.model_manager, task_name, state, self.pre_processors, fl_ctx, self.app_context
            )
            fl_ctx.set_prop("contribution", header)
            fl_ctx.set_prop("model_data", data)
            reply = self.communicator.submitUpdate(
                self.servers, task_name, token, fl_ctx, self.app_context, self.client_name
            )
            return reply.comment

        return str(self._with_token(submit))

    def push_models(self) -> None:
        """Pushes this round's contribution to every server."""
        for task_name in self.servers:
            comment = self.push_remote_model(task_name)
            log.info("%s: server says: %s", self.client_name, comment)

    def _best_metric(self) -> float | None:
        fitter = self.model_manager.get_fitter()
        return getattr(fitter, "best_metric", None) if fitter is not None else None

    # ------------------------------------------------------------------ heartbeat

    def send_heartbeat(self, task_name: str) -> None:
        if self.token is None:
            return
        self.communicator.send_heartbeat(self.servers, task_name, self.token)

    def heartbeat(self) -> None:
        """Sends one heartbeat to every server; failures are logged, never raised."""
        for task_name in self.servers:
            try:
                t0 = time.perf_counter()
                self.send_heartbeat(task_name)
                if self.token is not None:
                    rtt = (time.perf_counter() - t0) * 1000
                    self.bus.publish(HeartbeatAcknowledged(site=self.client_name, rtt_ms=rtt))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # Dropped (silent too long) or the server restarted: join again.
                    log.warning(
                        "%s: the server no longer knows this site; registering again",
                        self.client_name,
                    )
                    with contextlib.suppress(Exception):
                        self.client_register(task_name)
                else:
                    log.warning(
                        "%s: heartbeat to %s failed: %s",
                        self.client_name,
                        task_name,
                        exc.details() if hasattr(exc, "details") else exc,
                    )
            except Exception as exc:  # the next beat tries again
                log.warning("%s: heartbeat to %s failed: %s", self.client_name, task_name, exc)

    def run_heartbeat(self) -> None:
        """Heartbeat loop: one beat every ``heartbeat_interval`` seconds until stopped."""
        while not self._heartbeat_done.wait(self.heartbeat_interval):
            self.heartbeat()

    def start_heartbeat(self) -> None:
        if self._heartbeat_thread is None or not self._heartbeat_thread.is_alive():
            self._heartbeat_done.clear()
            self._heartbeat_thread = threading.Thread(
                target=self.run_heartbeat, name=f"heartbeat-{self.client_name}", daemon=True
            )
            self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._heartbeat_done.set()
        self.communicator.heartbeat_done = True

    # ------------------------------------------------------------------ cross-site validation

    def push_best_model(self, task_name: str) -> str:
        """Sends this site's best local model to ``task_name`` for cross-site validation."""

        def submit(token: str) -> str:
            state = self.communicator.get_client_state(task_name, token)
            _, params = DataAssembler.get_best_local_model(self.model_manager, task_name, state)
            return self.communicator.submit_best_local_model(
                self.client_name, self.servers, task_name, token, disable=not params, params=params
            )

        return str(self._with_token(submit))

    def push_best_models(self) -> None:
        for task_name in self.servers:
            log.info(
                "%s: server reply to SubmitBestLocalModel: %s",
                self.client_name,
                self.push_best_model(task_name),
            )

    def get_validation_models(self, task_name: str) -> tuple[list[RemoteModel], bool]:
        """Models of other sites to validate, and whether more will come later."""
        return self._with_token(
            lambda token: self.communicator.get_validation_models(
                self.client_name, self.servers, task_name, token
            )
        )

    def submit_cross_site_validation_results(
        self, params: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Sends ``{model_owner: metrics}`` to every server."""
        owners = list(params)
        for task_name in self.servers:
            self._with_token(
                lambda token, t=task_name: self.communicator.submit_cross_site_validation_results(
                    self.client_name, self.servers, t, token, owners, [params[o] for o in owners]
                )
            )

    def run_cross_site_validation(self) -> dict[str, dict[str, float]]:
        """Submits the best local model, then validates every model the server offers.

        Returns:
            ``{model_owner: metrics}`` measured on this site's data.
        """
        timeout = float(self.client_args.get("cross_val_timeout", 600.0))
        poll = float(self.client_args.get("cross_val_poll", 1.0))
        self.set_status(ClientStatus.CROSS_SITE_VALIDATION)
        self.phase("cross-site validation", 0)
        self.push_best_models()
        deadline = time.monotonic() + timeout
        for task_name in self.servers:
            while True:
                models, more = self.get_validation_models(task_name)
                batch: dict[str, dict[str, float]] = {}
                for remote in models:
                    metrics = self.model_manager.validate_model(None, remote.params)
                    batch[remote.owner] = metrics
                    self.bus.publish(
                        CrossSiteValidated(
                            site=self.client_name, model_owner=remote.owner, metrics=metrics
                        )
                    )
                if batch:
                    self.submit_cross_site_validation_results(batch)
                    self.cross_site_results.update(batch)
                if not more:
                    break
                if time.monotonic() > deadline:
                    log.warning(
                        "%s: cross-site validation timed out; not all models arrived",
                        self.client_name,
                    )
                    break
                if self.stop_event.wait(poll):
                    break
        return self.cross_site_results

    # ------------------------------------------------------------------ leaving

    def quit_remote(self, task_name: str) -> str:
        """Tells ``task_name``'s server this site leaves."""
        if self.token is None:
            return ""
        return self.communicator.quit_remote(self.servers, task_name, self.token)

    def close(self) -> None:
        """Quits every server (best effort) and closes the channels."""
        self.stop_heartbeat()
        for task_name in self.servers:
            try:
                self.quit_remote(task_name)
            except Exception as exc:
                log.warning("%s: quit failed: %s", self.client_name, exc)
        self.communicator.close()
        self.model_manager.close()
