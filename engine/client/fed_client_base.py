"""FederatedClientBase: registration, model pull/push, heartbeat and cross-site validation steps."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from engine import he
from engine.client.communicator import Communicator, FLCommunicationError, RemoteModel
from engine.client.data_assembler import DataAssembler
from engine.client.data_processors import he_processors, missing_decryptor
from engine.client.fl_context import FLContext
from engine.client.model_manager import ClientModelManager
from engine.config import ServerEndpoint
from engine.events import (
    CrossSiteValidated,
    EventBus,
    HeartbeatAcknowledged,
    HomomorphicEncryptionApplied,
    PhaseChanged,
    SessionRenewed,
    StatusChanged,
    ValidationProgress,
)
from engine.fileio import atomic_write
from engine.status import ClientStatus
from protos import federated_pb2 as pb

__all__ = ["SESSION_FILE", "FederatedClientBase", "SessionTokenFile"]

log = logging.getLogger("engine.client")

SESSION_FILE = "session_token.json"  # "token" in the name: the admin shell never reads it
_LOST_SESSION = "the server no longer knows this site: it restarted, or dropped the site"


class SessionTokenFile:
    """The session token that a site's processes share: the service and its training worker.

    One site has one session on the server (registering again voids the old token). When the
    server forgets the session (it restarted), whichever process notices first registers again
    and writes the new token here; the others find it here instead of registering themselves,
    which would void each other's tokens in turn. A lock file makes "read, else register and
    write" one step across processes.

    Args:
        path: the token file (owner-only), normally ``<workspace>/session_token.json``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_suffix(".lock")

    def read(self) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        token = data.get("token") if isinstance(data, dict) else None
        return str(token) if token else None

    def write(self, token: str) -> None:
        text = json.dumps({"token": token}).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(text))  # mkstemp's 0600: owner only

    @contextlib.contextmanager
    def locked(self, stop: threading.Event, timeout: float) -> Iterator[None]:
        """Holds the lock (polling, so that ``stop`` and ``timeout`` end the wait)."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if stop.is_set() or time.monotonic() > deadline:
                        raise FLCommunicationError(
                            "Register", None, "another process of this site holds the session"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


@dataclass
class _Pending:
    """This round's contribution, kept until the server has aggregated its round.

    Attributes:
        round: the server's ``current_round`` of the model it was trained from.
        header: the Contribution header (its id stays the same when it is sent again).
        data: the Δ as sent (after privacy: the same noise, never drawn twice).
    """

    round: int
    header: pb.Contribution
    data: dict[str, np.ndarray]


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
        # Homomorphic encryption: the same processors encrypt the best local model and decrypt
        # the models offered for cross-site validation.
        self.he_encryptor, self.he_decryptor = he_processors(
            self.pre_processors, self.post_processors
        )
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
        self._renew_lock = threading.Lock()
        workspace = self.client_args.get("workspace")
        self.session_file = SessionTokenFile(Path(workspace) / SESSION_FILE) if workspace else None
        # Contributions sent and not yet aggregated, by task; and those the server lost.
        self._pending: dict[str, _Pending] = {}
        self.lost_contributions: dict[str, _Pending] = {}

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
        if self.session_file is not None:
            self.session_file.write(token)
        log.info("%s registered with %s", self.client_name, self.servers[task_name].target)
        return token

    def register(self) -> None:
        """Registers with every server."""
        for task_name in self.servers:
            self.client_register(task_name)

    def renew_session(self, stale: str | None, reason: str = _LOST_SESSION) -> str:
        """A token for a session the server no longer knows (``stale`` was refused).

        Another thread or process of this site may have registered again already: its token
        is taken (from the session file). Otherwise this one registers and publishes
        SessionRenewed.

        Returns:
            the token to use now.
        """
        with self._renew_lock:
            if self.token and self.token != stale:
                return self.token  # another thread of this process renewed it meanwhile
            if self.session_file is None:
                return self._register_again(reason)
            timeout = self.communicator.retry_timeout + 30.0
            with self.session_file.locked(self.stop_event, timeout):
                shared = self.session_file.read()
                if shared and shared != stale:
                    with self._token_lock:
                        self.token = shared
                    log.info("%s: using the session registered again elsewhere", self.client_name)
                    return shared
                return self._register_again(reason)

    def _register_again(self, reason: str) -> str:
        log.warning("%s: %s; registering again", self.client_name, reason)
        self.register()
        assert self.token is not None
        self.bus.publish(
            SessionRenewed(
                site=self.client_name,
                server=", ".join(s.target for s in self.servers.values()),
                reason=reason,
            )
        )
        return self.token

    def _with_token(self, action: Any) -> Any:
        """Runs ``action(token)``; registers again once if the server forgot this site."""
        if self.token is None:
            self.register()
        token = self.token
        try:
            return action(token)
        except FLCommunicationError as exc:
            if not exc.token_expired:
                raise
            return action(self.renew_session(token))

    # ------------------------------------------------------------------ models

    def fetch_remote_model(self, task_name: str) -> RemoteModel:
        """Fetches the server's current model for ``task_name`` (waits for the next round)."""
        return self._with_token(
            lambda token: self.communicator.getModel(
                self.servers,
                task_name,
                token,
                self.app_context,
                on_header=lambda header: self._settle_pending(task_name, header.meta),
            )
        )

    def pull_models(self) -> bool:
        """Fetches the global models (through the post-processors) and loads them locally.

        Returns:
            True if the local model changed.
        """
        self.lost_contributions = {}
        for task_name in self.servers:
            self.remote_models[task_name] = self._receive(task_name)
        self.check_progress(self.remote_models)
        changed = self.model_manager.assign_current_model(self.remote_models)
        # The model manager holds the received arrays now, as the baseline of Δ (the round's
        # contribution computes Δ in them): only the meta stays here, not a second reference.
        for task_name, remote in self.remote_models.items():
            self.remote_models[task_name] = dataclasses.replace(remote, params={})
        return changed

    def _receive(self, task_name: str) -> RemoteModel:
        """``task_name``'s global model, through the post-processors (the communicator runs
        them), with this site's sent contribution checked against it."""
        remote = self.fetch_remote_model(task_name)
        if any(he.is_ciphertext(v) for v in remote.params.values()):
            # Refused before the model manager sees it: the local model stays as it was.
            raise missing_decryptor("the server's global model")
        finished = bool(remote.meta.finished)
        self._he_event(
            self.he_decryptor,
            "decrypt",
            "global model",
            int(remote.meta.current_round) + (0 if finished else 1),
        )
        self._check_pending(task_name, remote)
        return remote

    def _he_event(self, processor: Any, direction: str, what: str, rnd: int) -> None:
        """Publishes what an HE processor just did (nothing when it encrypted nothing)."""
        if processor is None or not processor.bytes_before:
            return
        plain, cipher = processor.bytes_before, processor.bytes_after
        if direction == "decrypt":
            plain, cipher = cipher, plain
        self.bus.publish(
            HomomorphicEncryptionApplied(
                site=self.client_name,
                round=rnd,
                direction=direction,
                what=what,
                variables=processor.variables,
                plain_bytes=plain,
                cipher_bytes=cipher,
                seconds=processor.seconds,
            )
        )

    def _check_pending(self, task_name: str, remote: RemoteModel) -> None:
        """Keeps a sent contribution until its round is aggregated; notes it if it was lost.

        The server hands out the same round again, with the very model the contribution was
        computed from, only when it restarted before aggregating that round: the contribution
        is then sent again (same id, same bytes) instead of training the round again.
        """
        self._settle_pending(task_name, remote.meta)
        pending = self._pending.get(task_name)
        if pending is None:
            return
        rnd = int(remote.meta.current_round)
        if rnd == pending.round and self.model_manager.is_current_global(task_name, remote.params):
            self.lost_contributions[task_name] = pending
            return
        del self._pending[task_name]
        log.warning(
            "%s: the server went back to round %d (the contribution to round %d no longer "
            "fits its model); training that round again",
            self.client_name,
            rnd + 1,
            pending.round + 1,
        )

    def _settle_pending(self, task_name: str, meta: pb.ModelMetaData) -> None:
        """Forgets a sent contribution once the server's model is of a later round (or the
        last): it was aggregated. Called as soon as a model's header arrives, so the kept
        contribution is not held beside the incoming model."""
        pending = self._pending.get(task_name)
        if pending is not None and (int(meta.current_round) > pending.round or meta.finished):
            del self._pending[task_name]

    def check_progress(self, remote_models: Mapping[str, RemoteModel]) -> None:
        """Updates round and end-of-training state from the received models' meta."""
        for remote in remote_models.values():
            self.current_round = int(remote.meta.current_round)
            self.num_rounds = int(remote.meta.num_rounds)
            if remote.meta.finished:
                self.train_end = True

    def push_remote_model(self, task_name: str) -> str:
        """Reads Δ, runs privacy and the pre-processors, and submits it to ``task_name``.

        Δ is computed once (privacy noise is drawn once); every retry, and a resend after a
        server restart, sends the same bytes under the same contribution id.
        """
        if self.token is None:
            self.register()
        fl_ctx = FLContext(best_validation_metric=self._best_metric())
        state = self.communicator.get_client_state(task_name, self.token or "", self.app_context)
        if self.model_manager.privacy is not None:
            self.phase("privacy")  # Δ, then the privacy protocol, then the pre-processors
        header, data = DataAssembler.get_contribution_data(
            self.model_manager, task_name, state, self.pre_processors, fl_ctx, self.app_context
        )
        self._he_event(self.he_encryptor, "encrypt", "round update", self.current_round + 1)
        if not header.contribution_id:
            header.contribution_id = f"{self.client_name}-{uuid.uuid4()}"
        pending = _Pending(round=self.current_round, header=header, data=data)
        self._pending[task_name] = pending
        return self.send_contribution(task_name, pending)

    def send_contribution(self, task_name: str, pending: _Pending) -> str:
        """Sends a kept contribution (again); returns the server's comment."""
        self.phase("submitting", pending.round + 1)

        def submit(token: str) -> str:
            pending.header.client.token = token  # the session may have been renewed
            reply = self.communicator.submit_contribution(
                self.servers, task_name, token, pending.header, pending.data
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
            stale = self.token
            try:
                t0 = time.perf_counter()
                self.send_heartbeat(task_name)
                if self.token is not None:
                    rtt = (time.perf_counter() - t0) * 1000
                    self.bus.publish(HeartbeatAcknowledged(site=self.client_name, rtt_ms=rtt))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # Dropped (silent too long) or the server restarted: join again, once for
                    # every process of this site.
                    with contextlib.suppress(Exception):
                        self.renew_session(stale)
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
        """Sends this site's best local model to ``task_name`` for cross-site validation.

        In a federation with homomorphic encryption it leaves encrypted like every update
        (the ModelEncryptor's variables, not weighted): the server stores and forwards a
        ciphertext it cannot read, and each site decrypts it before validating it.
        """
        sent: dict[str, dict[str, np.ndarray]] = {}

        def submit(token: str) -> str:
            if task_name not in sent:  # encrypted once, whatever the retries
                state = self.communicator.get_client_state(task_name, token)
                _, params = DataAssembler.get_best_local_model(self.model_manager, task_name, state)
                if params and self.he_encryptor is not None:
                    params = self.he_encryptor.encrypt_model(params)
                    self._he_event(self.he_encryptor, "encrypt", "best local model", 0)
                sent[task_name] = params
            params = sent[task_name]
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
        began = time.monotonic()
        counts = {"received": 0, "validated": 0}

        def progress(current: str = "", outcome: str = "running", more: bool = True) -> None:
            self.bus.publish(
                ValidationProgress(
                    site=self.client_name,
                    received=counts["received"],
                    expected=0 if more else counts["received"],
                    validated=counts["validated"],
                    current=current,
                    elapsed=round(time.monotonic() - began, 1),
                    timeout=timeout,
                    outcome=outcome,
                )
            )

        progress()
        self.push_best_models()
        deadline = time.monotonic() + timeout
        outcome = "done"
        for task_name in self.servers:
            while True:
                models, more = self.get_validation_models(task_name)
                counts["received"] += len(models)
                batch: dict[str, dict[str, float]] = {}
                for remote in models:
                    progress(remote.owner, more=more)
                    try:
                        params = self._decrypted(remote)
                    except he.HEError as exc:
                        if self.he_decryptor is None:
                            raise  # this site cannot read any model of its federation
                        # One unreadable model (a garbled ciphertext) costs only its result.
                        log.warning(
                            "%s: %s's model not validated: %s", self.client_name, remote.owner, exc
                        )
                        continue
                    metrics = self.model_manager.validate_model(None, params)
                    del params
                    counts["validated"] += 1
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
                    outcome = "timed out"
                    log.warning(
                        "%s: cross-site validation timed out after %g s; %d models came, more "
                        "were due (cross_val_timeout)",
                        self.client_name,
                        timeout,
                        counts["received"],
                    )
                    break
                if self.stop_event.wait(poll):
                    outcome = "stopped"
                    break
        progress(outcome=outcome, more=outcome != "done")
        return self.cross_site_results

    def _decrypted(self, remote: RemoteModel) -> dict[str, np.ndarray]:
        """A model offered for cross-site validation, decrypted when it is encrypted."""
        if not any(he.is_ciphertext(v) for v in remote.params.values()):
            return remote.params
        what = (
            "the server's global model"
            if remote.owner == "server"
            else (f"{remote.owner}'s best local model")
        )
        if self.he_decryptor is None:
            raise missing_decryptor(f"{what}, offered for cross-site validation,")
        params = self.he_decryptor.decrypt_model(remote.params)
        remote.params.clear()  # the ciphertexts are not needed once decrypted
        self._he_event(self.he_decryptor, "decrypt", what.removeprefix("the "), 0)
        return params

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
