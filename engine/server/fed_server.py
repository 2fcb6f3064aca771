"""The reference FL server: the FederatedTraining service, its rounds, and the gRPC server."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from engine import he, serde
from engine.config import ConfigError, ServerConfig
from engine.events import (
    ContributionRefused,
    EventBus,
    ServerResumed,
    ServerRoundAggregated,
    ServerRoundRetaken,
    SiteJoined,
    SiteLeft,
)
from engine.rpc import federated_generic_handler
from engine.server import persistence
from engine.server.admin import AdminQueues
from engine.server.admin_console import AdminConsoleService
from engine.server.aggregator import (
    PEAK_OFFENDER,
    FedAvgAccumulator,
    HEAccumulator,
    non_finite_variables,
)
from engine.server.auth import (
    Abort,
    call_token,
    check_name,
    check_peer,
    check_registration_peer,
    check_site_peer,
)
from engine.server.buffers import BufferPool
from engine.server.cross_site import SERVER_OWNER, CrossSiteStore
from engine.server.rounds import Round, Site
from engine.tls import (
    ROLE_ADMIN,
    ROLE_SITE,
    TOKEN_REFUSED,
    KitError,
    PeerIdentity,
    SecurityFailure,
    preflight_certificate,
    read_tls_files,
)
from protos import admin_pb2_grpc
from protos import federated_pb2 as pb

__all__ = ["FederatedServer"]

log = logging.getLogger("engine.server")

ENCODE_ONCE_BYTES = 64 << 20
"""A global model up to this size is encoded once per round; every site gets the same messages
(the cost of one more copy of the model in memory)."""
CLOSE_WAIT_S = 60.0
"""The longest an upload's reply waits for its round's close (aggregation and save) to end."""


class FederatedServer:
    """Runs a federation of sites over gRPC.

    Args:
        config: the server settings (task name, rounds, client counts, timeouts, weights).
        workspace: folder for ``models/``, ``cross_site/``, ``state.json``, results.
        initial_model: the model of round ``start_round`` (named numpy arrays).
        bus: where server events go (site "server").
        long_poll: how long GetModel waits for the next round before answering "No token".
        max_concurrent_uploads: uploads received at once (each needs a model-sized buffer);
            the others wait, their streams held back by gRPC flow control.
        resume: when ``workspace`` holds the saved state of an unfinished federation of this
            task (``state.json`` and ``models/global_model.npz``), go on from there instead of
            from ``initial_model`` (a finished one is started afresh).

    What survives a crash: each round's new global model and ``state.json`` (history with each
    contribution's id) are on disk before any site can fetch the model, so a server started
    again resumes at the round it was in; the sites register again and send the contributions
    it had not aggregated yet (same ids), so no contribution is lost or counted twice.

    Raises:
        ConfigError: the saved state cannot be resumed (another task, another model's shapes).
    """

    def __init__(
        self,
        config: ServerConfig,
        workspace: Path,
        initial_model: Mapping[str, np.ndarray],
        bus: EventBus | None = None,
        long_poll: float = 2.0,
        max_concurrent_uploads: int = 4,
        resume: bool = True,
    ) -> None:
        if not initial_model:
            raise ValueError("the server needs an initial model with at least one variable")
        self.config = config
        self.workspace = Path(workspace)
        self.bus = bus or EventBus()
        self.long_poll = long_poll
        self.global_model: dict[str, np.ndarray] = {k: _held(v) for k, v in initial_model.items()}
        bad = non_finite_variables(self.global_model)
        if bad:
            # Every site's model would be NaN from the first pull, and every contribution refused.
            raise ValueError(f"the initial model holds NaN or Inf in {', '.join(bad)}")
        self.current_round = config.start_round
        self.finished = False
        self.sites: dict[str, Site] = {}
        self._tokens: dict[str, Site] = {}  # token -> site: every call looks its caller up
        # Sites registered before a restart: a round waits for them as for registered ones,
        # until they register again or their heartbeat timeout passes (monotonic deadline).
        self._returning: dict[str, float] = {}
        self.resumed: dict[str, Any] | None = None
        self.dropped: list[str] = []
        self.history: list[dict[str, Any]] = []
        self._seen_ids: set[str] = set()
        self._cond = threading.Condition()
        self.cross_site = CrossSiteStore(self.workspace, self._cond)
        self.best_models = self.cross_site.best_models
        self.cross_val_results = self.cross_site.results
        self._fold_lock = threading.Lock()
        # Homomorphic encryption: the federation's public context, when provisioned with one.
        self.he_context = load_server_he_context(self.workspace)
        if resume:
            self._restore()
        self._round = self._new_round()
        model_bytes = sum(int(v.nbytes) for v in self.global_model.values())
        self._pool = BufferPool(max_bytes=2 * model_bytes)
        self._readers: dict[int, int] = {}
        self._retired: dict[int, list[np.ndarray]] = {}
        self._readers_lock = threading.Lock()
        self._encoded: tuple[dict[str, np.ndarray], bytes, list[bytes]] | None = None
        self._encode_lock = threading.Lock()
        self._receive_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self._save_lock = threading.Lock()
        self._saved_round = self.current_round  # the round whose model is on disk
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self._monitor: threading.Thread | None = None
        self.admin = AdminQueues(self._site_by_token, self._authorize_admin_channel)
        self.console = AdminConsoleService(self)
        self.port = 0
        self.created = time.time()
        self.secure = config.secure_train
        self._tls = self._load_tls() if self.secure else (b"", b"", b"")

    def _load_tls(self) -> tuple[bytes, bytes, bytes]:
        """The server's root, certificate and key, checked before anything listens.

        Raises:
            KitError: a file is missing, the key is readable by others, or the certificate is
                expired or not the authority's.
        """
        c = self.config
        where = str(c.path or "the server config")
        if not (c.ssl_root_cert and c.ssl_cert and c.ssl_private_key):
            raise KitError(
                where,
                "secure_train is on (the default) but servers[0].ssl_root_cert, ssl_cert and "
                "ssl_private_key are not all set: make the server's kit with `fltui provision`, "
                'or set "secure_train": false for a test federation on a trusted network',
            )
        files = read_tls_files(c.ssl_root_cert, c.ssl_cert, c.ssl_private_key)
        try:
            preflight_certificate(c.ssl_root_cert, c.ssl_cert, c.ssl_private_key)
        except SecurityFailure as exc:
            raise KitError(c.ssl_cert, exc.reason) from None
        return files

    # ------------------------------------------------------------------ lifecycle

    def start(self, target: str | None = None, max_workers: int | None = None) -> int:
        """Starts serving on ``target`` ("host:port", port 0 picks one); returns the port."""
        target = target or self.config.target
        workers = (
            max_workers
            or self.config.num_server_workers
            or min(256, 16 + 3 * self.config.max_num_clients)
        )
        # gRPC takes the first of two equal option names: the config's options replace these.
        options = list(
            {
                "grpc.max_receive_message_length": 8 << 20,
                "grpc.max_send_message_length": 8 << 20,
                # Clients ping during long transfers (keepalive); allow it instead of GOAWAY.
                "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
                "grpc.keepalive_permit_without_calls": 1,
                **dict(self.config.options),
            }.items()
        )
        compression = getattr(grpc.Compression, self.config.compression or "NoCompression")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fl-server"),
            options=options,
            compression=compression,
        )
        server.add_generic_rpc_handlers((federated_generic_handler(self),))
        admin_pb2_grpc.add_AdminCommunicatingServicer_to_server(self.admin, server)
        admin_pb2_grpc.add_AdminConsoleServicer_to_server(self.console, server)
        if self.secure:
            # Mutual TLS on all three services: every peer shows a certificate of our authority.
            creds = grpc.ssl_server_credentials(
                [(self._tls[2], self._tls[1])],
                root_certificates=self._tls[0],
                require_client_auth=True,
            )
            self.port = server.add_secure_port(target, creds)
        else:
            self.port = server.add_insecure_port(target)
        if self.port == 0:
            raise OSError(f"cannot listen on {target}")
        persistence.remove_stale_writes(self.workspace)
        server.start()
        self._server = server
        self._monitor = threading.Thread(target=self._monitor_loop, name="fl-monitor", daemon=True)
        self._monitor.start()
        self._save_state()
        if self.resumed is not None:
            log.warning(
                "resumed from the saved state at round %d/%d (%s)",
                self.current_round + 1,
                self.config.num_rounds,
                self.resumed["detail"],
            )
            self.bus.publish(
                ServerResumed(
                    site="server",
                    round=self.current_round + 1,
                    num_rounds=self.config.num_rounds,
                    sites=list(self.resumed["sites"]),
                    detail=self.resumed["detail"],
                )
            )
        log.info(
            "server for task %r listening on port %d (%s): %d rounds, min %d sites",
            self.config.task_name,
            self.port,
            "mutual TLS" if self.secure else "plaintext, no TLS",
            self.config.num_rounds,
            self.config.min_num_clients,
        )
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        """Stops serving; waiting GetModel calls are released."""
        self._stop.set()
        with self._cond:
            self._round.advanced.set()
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Blocks until every round is aggregated; returns whether it happened in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left if left is not None else 1.0)
        return True

    def wait_all_left(self, timeout: float | None = None) -> bool:
        """Blocks until every round is done and every site has left (quit or was dropped).

        Sites still fetch the final model and run cross-site validation after the last round,
        so a server that stops at ``finished`` would cut them off.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self.finished and not self.sites):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 1.0) if left is not None else 1.0)
        return True

    # ------------------------------------------------------------------ buffer reuse

    def _hold(self, model: dict[str, np.ndarray]) -> None:
        """Marks ``model`` as being read (a download, a save): it is not recycled meanwhile."""
        with self._readers_lock:
            self._readers[id(model)] = self._readers.get(id(model), 0) + 1

    def _release(self, model: dict[str, np.ndarray]) -> None:
        with self._readers_lock:
            left = self._readers.get(id(model), 1) - 1
            if left > 0:
                self._readers[id(model)] = left
                return
            self._readers.pop(id(model), None)
            retired = self._retired.pop(id(model), None)
        if retired is not None:
            self._pool.give(retired)

    def _retire(self, old: dict[str, np.ndarray]) -> None:
        """The previous global model's arrays go to the pool once nobody reads them."""
        keep = {id(a) for a in self.global_model.values()}  # arrays carried over unchanged
        free = [a for a in old.values() if id(a) not in keep]
        with self._readers_lock:
            if self._readers.get(id(old)):
                self._retired[id(old)] = free
                return
        self._pool.give(free)

    # ------------------------------------------------------------------ helpers

    def _new_round(self) -> Round:
        if self.he_context is not None:
            acc = HEAccumulator(self.he_context, self.config.exclude_vars)
            return Round(self.current_round, acc)  # type: ignore[arg-type]
        return Round(self.current_round, FedAvgAccumulator(self.config.exclude_vars))

    def _meta(self) -> pb.ModelMetaData:
        meta = pb.ModelMetaData(
            task=self.config.task_name,
            current_round=self.current_round,
            num_rounds=self.config.num_rounds,
            finished=self.finished,
        )
        meta.created.FromSeconds(int(self.created))
        return meta

    def _site_by_token(self, token: str) -> Site | None:
        with self._cond:
            site = self._tokens.get(token)
            if site is not None:
                site.last_seen = time.monotonic()
            return site

    def _forget(self, name: str) -> Site | None:
        """Removes a site and its token (call with ``_cond`` held)."""
        site = self.sites.pop(name, None)
        if site is not None:
            self._tokens.pop(site.token, None)
        return site

    def _authenticate(self, state: pb.ClientState, context: grpc.ServicerContext) -> Site:
        token = call_token(state, context)
        if state.meta.task and state.meta.task != self.config.task_name:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Requested task does not match the current server task",
            )
        site = self._site_by_token(token)
        if site is None:
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "Unknown client identity (register again)")
        if state.client_name and state.client_name != site.name:
            raise Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{TOKEN_REFUSED}: it was not issued to the session of {state.client_name!r}",
            )
        self._check_site_peer(site.name, context)
        return site

    def _peer(self, context: grpc.ServicerContext, role: str) -> PeerIdentity | None:
        """The caller's certificate identity (None without TLS), checked for ``role``."""
        return check_peer(self.config, self.secure, context, role)

    def _check_site_peer(self, site: str, context: grpc.ServicerContext) -> None:
        """With TLS, a session's token is only good over its own site's certificate."""
        check_site_peer(self._peer(context, ROLE_SITE), site, context)

    def _authorize_admin_channel(self, site: str, context: grpc.ServicerContext) -> None:
        try:
            self._check_site_peer(site, context)
        except Abort as exc:
            context.abort(exc.code, exc.details)

    def check_admin_peer(self, context: grpc.ServicerContext) -> str | None:
        """The admin's name from its certificate (None without TLS); aborts the call if refused."""
        try:
            peer = self._peer(context, ROLE_ADMIN)
        except Abort as exc:
            log.warning("admin console call from %s refused: %s", context.peer(), exc.details)
            context.abort(exc.code, exc.details)
        return peer.common_name if peer is not None else None

    def _contribution_header(
        self, frames: Iterator[bytes | memoryview], context: grpc.ServicerContext
    ) -> tuple[pb.Contribution, Site]:
        """Reads an upload's header frame and authenticates it, before any payload is read."""
        first = next(frames, None)
        if first is None:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty model stream")
        header = serde.parse_header_frame(first, pb.Contribution)
        return header, self._authenticate(header.client, context)

    def _run(self, context: grpc.ServicerContext, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Abort as exc:
            context.abort(exc.code, exc.details)
        except serde.SerdeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {exc}")

    def _expected(self, plain: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each variable's (dtype, shape) on the wire; ``plain``: what a ciphertext holds."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for k, v in self.global_model.items():
            if he.is_ciphertext(v):
                out[k] = he.plain_spec(v)[:2] if plain else (serde.CKKS, tuple(v.shape))
            else:
                out[k] = (v.dtype.name, tuple(v.shape))
        return out

    def _he_problem(self, header: pb.Contribution) -> str | None:
        """A contribution that does not match the federation's encryption, in words."""
        encrypted = any(p.array.dtype == serde.CKKS for p in header.data.params)
        if self.he_context is not None and not encrypted:
            return (
                "this federation aggregates encrypted updates (homomorphic encryption) and this "
                "contribution is plaintext: list ModelEncryptor in the site's pre_processors "
                f"(and ModelDecryptor in its post_processors), with its startup/{he.CLIENT_CONTEXT}"
            )
        if self.he_context is None and encrypted:
            return (
                "this contribution is encrypted (homomorphic encryption), but this server was "
                f"not provisioned for it (no startup/{he.SERVER_CONTEXT}): remove ModelEncryptor "
                "from the site's pre_processors, or provision the federation with "
                '"homomorphic_encryption"'
            )
        return None

    def _he_registration_problem(self, request: pb.ClientLogin) -> str | None:
        """A site whose encryption does not match the federation's, in words (None: it
        matches, or the site is older and does not say: its first upload is checked then)."""
        fields = request.meta_data.fields
        if "he" not in fields:
            return None
        encrypts = fields["he"].string_value == serde.CKKS
        decrypts = "he_decrypt" in fields and fields["he_decrypt"].bool_value
        if self.he_context is not None and not (encrypts and decrypts):
            missing = " and ".join(
                what
                for what, has in (
                    ("ModelEncryptor to its pre_processors", encrypts),
                    ("ModelDecryptor to its post_processors", decrypts),
                )
                if not has
            )
            return (
                "this federation runs homomorphic encryption (CKKS): the server aggregates "
                "encrypted updates and sends an encrypted global model, and this site does not "
                f"take part in it: add {missing} in config_fed_client.json, with the site's "
                f"startup/{he.CLIENT_CONTEXT} from its provisioned kit"
            )
        if self.he_context is None and encrypts:
            return (
                "this site encrypts its updates (homomorphic encryption), but this server was "
                f"not provisioned for it (no startup/{he.SERVER_CONTEXT}): remove ModelEncryptor "
                "from the site's pre_processors, or provision the federation with "
                '"homomorphic_encryption"'
            )
        return None

    def _save_state(
        self, current_round: int | None = None, history: list[dict[str, Any]] | None = None
    ) -> None:
        """Writes ``state.json``: the round, the history (with contribution ids), the sites."""
        with self._cond:  # a snapshot: Register and round closes change these meanwhile
            state = persistence.state_document(
                self.config,
                self.current_round if current_round is None else current_round,
                {*self.sites, *self._returning},
                self.history if history is None else history,
            )
        persistence.write_state(self.workspace, state)

    def _restore(self) -> None:
        """Goes on from the workspace's saved state, if it holds an unfinished federation."""
        saved = persistence.read_resumable(self.workspace, self.config, self.global_model)
        if saved is None:
            return
        if saved.model is not None:
            if self.he_context is None and any(he.is_ciphertext(v) for v in saved.model.values()):
                raise ConfigError(
                    self.workspace / persistence.MODEL_FILE,
                    "",
                    "the saved global model is encrypted (homomorphic encryption), but this "
                    f"server has no startup/{he.SERVER_CONTEXT}: put the federation's public "
                    "context back, or move the saved model away to start a new federation",
                )
            # Loaded here for the server alone: its arrays are the server's to recycle.
            self.global_model = {
                k: v if v.flags.c_contiguous else np.array(v, order="C")
                for k, v in saved.model.items()
            }
        self.current_round = saved.model_round
        self.history = saved.history
        for entry in saved.history:
            self._seen_ids.update(str(c) for c in dict(entry.get("contributions", {})).values())
        deadline = time.monotonic() + self.config.heart_beat_timeout
        self._returning = {name: deadline for name in saved.sites}
        self.resumed = {"sites": saved.sites, "detail": saved.detail}

    # ------------------------------------------------------------------ FederatedTraining

    def Register(
        self, request: pb.ClientLogin, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        return self._run(context, self._register, request, context)

    def _register(
        self, request: pb.ClientLogin, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        name = request.client_name
        if request.meta.task != self.config.task_name:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Requested task {request.meta.task!r} does not match the current server task "
                f"{self.config.task_name!r}",
            )
        check_name(name)
        problem = self._he_registration_problem(request)
        if problem:
            log.warning("registration of %r refused: %s", name, problem)
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        try:
            peer = self._peer(context, ROLE_SITE)
        except Abort as exc:
            log.warning("registration of %r from %s refused: %s", name, context.peer(), exc.details)
            raise
        check_registration_peer(peer, name, context)
        with self._cond:
            if name not in self.sites and len(self.sites) >= self.config.max_num_clients:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Maximum number of clients reached")
            again = name in self.sites
            self._forget(name)  # its old token is void from now on
            self._returning.pop(name, None)
            token = str(uuid.uuid4())
            now = time.monotonic()
            site = Site(name, token, request.client_ip or context.peer(), now, now)
            self.sites[name] = self._tokens[token] = site
            if name in self.dropped:
                self.dropped.remove(name)
            count = len(self.sites)
        log.info(
            "site %s %s (%d registered)", name, "registered again" if again else "joined", count
        )
        self.bus.publish(SiteJoined(site="server", site_name=name, num_sites=count))
        return pb.FederatedSummary(comment=f"Welcome {name}", token=token, meta=self._meta())

    def Quit(self, request: pb.ClientState, context: grpc.ServicerContext) -> pb.FederatedSummary:
        return self._run(context, self._quit, request, context)

    def _quit(self, request: pb.ClientState, context: grpc.ServicerContext) -> pb.FederatedSummary:
        site = self._authenticate(request, context)
        with self._cond:
            self._forget(site.name)
            self._cond.notify_all()
        self.bus.publish(SiteLeft(site="server", site_name=site.name, reason="quit"))
        self._maybe_close_round()
        return pb.FederatedSummary(comment=f"Goodbye {site.name}", meta=self._meta())

    def Heartbeat(
        self, request: pb.ClientState, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        return self._run(context, self._heartbeat, request, context)

    def _heartbeat(
        self, request: pb.ClientState, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        self._authenticate(request, context)
        return pb.FederatedSummary(comment="ok", meta=self._meta())

    def GetModel(self, request: pb.ClientState, context: grpc.ServicerContext) -> Iterator[bytes]:
        site = self._run(context, self._authenticate, request, context)
        deadline = time.monotonic() + self.long_poll
        while True:
            with self._cond:
                rnd = self._round
                waiting = not self.finished and site.name in rnd.contributions
            left = deadline - time.monotonic()
            if not waiting or left <= 0 or self._stop.is_set():
                break
            rnd.advanced.wait(left)
        with self._cond:
            if not self.finished and site.name in self._round.contributions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "No token available for the current round: waiting for the other sites",
                )
            # The model dict is replaced, never changed in place, after a round: this stream
            # keeps sending a consistent model even if the round closes meanwhile.
            model, meta = self.global_model, self._meta()
            if not self.finished:
                self._round.expected.add(site.name)
            self._hold(model)
        try:
            yield from self._model_messages(model, meta)
        finally:
            self._release(model)

    def _model_messages(self, model: dict[str, np.ndarray], meta: pb.ModelMetaData) -> Any:
        """The wire messages of ``model`` with ``meta``: encoded once per round and shared (all
        the sites wake together when a round closes), or encoded per stream when it is big."""
        header = pb.CurrentModel(meta=meta, owner=SERVER_OWNER)
        if serde.model_nbytes(model) > ENCODE_ONCE_BYTES:
            return serde.encode_model_stream(header, model, batch=True)
        key = meta.SerializeToString(deterministic=True)
        with self._encode_lock:
            # Keyed by the model object itself (held here, so its id cannot be reused).
            cached = self._encoded
            if cached is None or cached[0] is not model or cached[1] != key:
                messages = list(serde.encode_model_stream(header, model, batch=True))
                cached = self._encoded = (model, key, messages)
            return cached[2]

    def SubmitUpdate(
        self, frames: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        return self._run(context, self._submit_update, serde.unbatch(frames), context)

    def _submit_update(
        self, frames: Iterator[bytes | memoryview], context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        header, site = self._contribution_header(frames, context)
        cid = header.contribution_id
        if not cid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "contribution without contribution_id")
        base: dict[str, np.ndarray] = {}
        with self._cond:
            # A retry of an upload that was counted gets "ignored", even after the last round.
            if cid in self._seen_ids:
                log.info("duplicate contribution %s from %s ignored", cid, site.name)
                return pb.FederatedSummary(
                    comment="duplicate contribution ignored", meta=self._meta()
                )
            if self.finished:
                raise Abort(grpc.StatusCode.OUT_OF_RANGE, "Server training has stopped")
            rnd = header.client.meta.current_round
            if rnd != self.current_round:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Contrib: round {rnd} is not the current round {self.current_round}",
                )
            rnd_state = self._round
            if rnd_state.closing:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Contrib: round {rnd} closed while the contribution was received",
                )
            if site.name in rnd_state.contributions:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Contrib: {site.name} already contributed to round {rnd}",
                )
            if site.name in rnd_state.receiving.values():
                raise Abort(
                    grpc.StatusCode.ABORTED, f"an upload from {site.name} is being received"
                )
            # The weight is the site's own claim: bounded before a byte of payload is read.
            problem = (
                rnd_state.refused_ids.get(cid)
                or self._n_iter_problem(header.n_iter)
                or self._he_problem(header)
            )
            if problem is None:
                rnd_state.receiving[cid] = site.name
                expected = self._expected()
                # Screened against the model the Δ was computed from; held, so that a round
                # closing meanwhile cannot recycle its buffers under the screen.
                base = self.global_model
                self._hold(base)
        if problem is not None:
            raise self._refuse(rnd_state, site.name, problem)
        refusal: str | None = None
        try:
            # At most a few uploads are received at once: each holds a model-sized buffer.
            with self._receive_slots:
                assembler = serde.ModelAssembler(
                    pb.Contribution,
                    expected,
                    allocate=self._pool.take,
                    ciphertexts=self.he_context is not None,
                )
                assembler.on_header(header)
                try:
                    delta = serde.receive_model(assembler, frames)
                except BaseException:
                    self._pool.give(assembler.buffers())  # nobody else has seen them
                    raise
                try:
                    # Before the fold, outside the lock (uploads are screened side by side):
                    # a NaN folded into the mean could not be taken out again.
                    screening = rnd_state.accumulator.screen(delta, base)
                finally:
                    self._release(base)
                    base = {}
            if screening.variable is not None:
                self._pool.give(delta.values())
                refusal = f"variable {screening.variable!r} holds {screening.problem}"
            else:
                flag = header.meta_data.fields.get("he_weighted")
                weighted = flag is not None and flag.bool_value
                self._fold(
                    rnd_state, site.name, cid, delta, header.n_iter, screening.peaks, weighted
                )
        finally:
            if base:
                self._release(base)  # the upload failed before its screen
            with self._cond:
                rnd_state.receiving.pop(cid, None)
        if refusal is not None:
            # (After the upload left `receiving`: the round may close without this site now.)
            raise self._refuse(rnd_state, site.name, refusal)
        log.info(
            "round %d: contribution %s from %s (n_iter=%d, %.1f MB)",
            rnd + 1,
            cid,
            site.name,
            header.n_iter,
            assembler.received_bytes / 1e6,
        )
        self._maybe_close_round()
        if rnd_state.closing:
            # Closed by the monitor thread between the fold and here: answer once it is done,
            # as when this upload closes the round itself (the reply's meta is then the new
            # round's, whichever thread closed it).
            rnd_state.advanced.wait(CLOSE_WAIT_S)
        with self._cond:
            retaken = rnd_state is not self._round and self._round.number == rnd
        if retaken:
            # The site sends it again when it finds the same round's model (same id, counted).
            return pb.FederatedSummary(
                comment=f"Received contribution for round {rnd}, but the round is taken again "
                "(its average was not finite): send it again",
                meta=self._meta(),
            )
        return pb.FederatedSummary(
            comment=f"Received contribution for round {rnd}", meta=self._meta()
        )

    def _fold(
        self,
        rnd_state: Round,
        site: str,
        cid: str,
        delta: dict[str, np.ndarray],
        n_iter: int,
        peaks: dict[str, float],
        he_weighted: bool = False,
    ) -> None:
        """Folds a screened contribution into its round (refused if the round closed meanwhile).

        ``he_weighted``: the site multiplied its ciphertexts by ``n_iter`` before encryption."""
        by_n_iter = n_iter if self.config.weigh_by_local_iter else 1
        site_weight = self.config.aggregation_weights.get(site, 1.0)
        weight = float(by_n_iter) * site_weight
        # Ciphertexts hold Δ·n_iter when the site weighed them (the server cannot: CKKS costs a
        # level per multiplication); the server's own factor is the rest of the weight.
        ct_factor = site_weight if he_weighted else weight
        # Checking the round and folding in one critical section: a round cannot close
        # between the two, and a site cannot be counted twice.
        with self._cond, self._fold_lock:
            if rnd_state is not self._round or rnd_state.closing or self.finished:
                self._pool.give(delta.values())
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Contrib: round {rnd_state.number} closed while the contribution was received",
                )
            if isinstance(rnd_state.accumulator, HEAccumulator):
                rnd_state.accumulator.add(site, delta, weight, ct_factor)
            else:
                rnd_state.accumulator.add(site, delta, weight)
            # What was added (not taken over as the running mean) is free for the next upload.
            self._pool.give(a for a in delta.values() if not rnd_state.accumulator.holds(a))
            rnd_state.contributions[site] = cid
            rnd_state.peaks[site] = peaks
            rnd_state.refused.pop(site, None)  # a good one after a refused one counts
            self._seen_ids.add(cid)
            if (
                rnd_state.min_reached_at is None
                and len(rnd_state.contributions) >= self.config.min_num_clients
            ):
                rnd_state.min_reached_at = time.monotonic()

    def _n_iter_problem(self, n_iter: int) -> str | None:
        """Why a contribution's ``n_iter`` (its weight, the site's own claim) is refused."""
        if n_iter < 1:
            return f"n_iter must be >= 1, got {n_iter}"
        if n_iter > self.config.max_n_iter:
            return (
                f"n_iter {n_iter} is above max_n_iter {self.config.max_n_iter} "
                f"({self.config.max_n_iter_source})"
            )
        return None

    def _refuse(self, rnd: Round, site: str, problem: str) -> Abort:
        """Records a refused contribution (log, event, the round's list); returns the abort.

        The round no longer waits for the site (its contribution will not come), and closes now
        if that was all it waited for. The site may still send a good contribution to it.
        """
        reason = f"the contribution of {site} to round {rnd.number + 1}: {problem}"
        with self._cond:
            if rnd is self._round and site not in rnd.contributions:
                rnd.refused[site] = problem
        log.warning("refused %s", reason)
        self.bus.publish(
            ContributionRefused(site="server", site_name=site, round=rnd.number + 1, reason=problem)
        )
        self._maybe_close_round()
        return Abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {reason}")

    # ------------------------------------------------------------------ rounds

    def _maybe_close_round(self) -> None:
        with self._cond:
            rnd = self._round
            if self.finished or rnd.closing or len(rnd.contributions) < self.config.min_num_clients:
                return
            waiting = [
                s
                for s in (*self.sites, *self._returning)
                if s not in rnd.contributions and s not in rnd.refused
            ]
            timed_out = (
                rnd.min_reached_at is not None
                and time.monotonic() - rnd.min_reached_at >= self.config.wait_after_min_clients
            )
            if waiting and not timed_out:
                return
            if rnd.receiving and not timed_out:
                return  # an upload is in flight: close when it lands (or fails)
            rnd.closing = True  # uploads still arriving are refused from here on
            t0 = time.perf_counter()
            with self._fold_lock:
                new_model = rnd.accumulator.apply(self.global_model)
            # Every contribution was screened and the mean cannot overflow, yet rounding at the
            # edge of a dtype's range can still give Inf: no model is saved or sent unseen.
            bad = non_finite_variables(new_model)
            retake = self._retake(rnd, new_model, bad) if bad else None
            if retake is None or not retake.excluded:
                contributors = sorted(rnd.contributions)
                missing = sorted((set(waiting) | rnd.expected) - set(contributors))
                entry: dict[str, Any] = {
                    "round": rnd.number + 1,
                    "contributors": contributors,
                    "missing": missing,
                    "contributions": dict(sorted(rnd.contributions.items())),
                }
                if rnd.refused:
                    entry["refused"] = dict(sorted(rnd.refused.items()))
                if bad:
                    entry["not_finite"] = bad  # these variables kept their previous values
                next_round = rnd.number + 1
                history = [*self.history, entry]
                seconds = time.perf_counter() - t0
        if retake is not None:
            log.error("%s", retake.summary())
            self.bus.publish(retake)
            if retake.excluded:
                # The sites waiting on this round wake, find it open again with the model they
                # trained from, and send their kept contributions again (same ids).
                rnd.advanced.set()
                return
        # Durable before visible: no site can fetch the new model before it and the history
        # are on disk, so a restarted server never hands out a round it cannot resume from,
        # and the sites still hold every contribution it may have to receive again.
        self._persist(new_model, next_round, history)
        with self._cond:
            old = self.global_model
            self.global_model = new_model
            self._retire(old)
            self.current_round = next_round
            self.finished = self.current_round >= self.config.num_rounds
            if self.finished:
                # No upload will take these again: the memory goes back now, not at exit.
                self._pool.close()
            self.history.append(entry)
            self._round = self._new_round()
            self._cond.notify_all()
        rnd.advanced.set()
        self.bus.publish(
            ServerRoundAggregated(
                site="server",
                round=rnd.number + 1,
                num_rounds=self.config.num_rounds,
                contributors=contributors,
                missing=missing,
                seconds=seconds,
            )
        )
        if missing:
            log.warning("round %d closed without %s", rnd.number + 1, ", ".join(missing))
        if self.finished:
            log.info("all %d rounds done; global model saved", self.config.num_rounds)

    def _retake(
        self, rnd: Round, new_model: dict[str, np.ndarray], bad: list[str]
    ) -> ServerRoundRetaken:
        """Deals with an average that is not finite (call with ``_cond`` held).

        The contributions whose models reach the edge of their dtype's range in a variable that
        overflowed caused it: the round is opened again without them. The others are forgotten
        as received, so the sites send them again (a site keeps its contribution until its
        round is aggregated, and sends it again when it gets the same round's model back).
        When none stands out, those variables keep the previous round's values instead, and
        the round closes (``new_model`` is changed in place).
        """
        offenders = sorted(
            site
            for site, peaks in rnd.peaks.items()
            if any(peaks.get(v, 0.0) >= PEAK_OFFENDER for v in bad)
        )
        keep = {id(a) for a in self.global_model.values()}
        if not offenders:
            for name in bad:
                if id(new_model[name]) not in keep:
                    self._pool.give([new_model[name]])
                new_model[name] = self.global_model[name]
            return ServerRoundRetaken(
                site="server",
                round=rnd.number + 1,
                variables=bad,
                excluded=[],
                detail="no contribution stood out; these variables keep the previous round's "
                "values",
            )
        # Nobody has seen this average: its arrays go back to the pool.
        self._pool.give(a for a in new_model.values() if id(a) not in keep)
        reason = (
            f"its model reaches the edge of the dtype's range in {', '.join(bad)}, and the "
            "round's average of it came out NaN or Inf; the round is taken again without it"
        )
        fresh = self._new_round()
        fresh.expected = set(rnd.expected)
        fresh.refused = {**rnd.refused, **dict.fromkeys(offenders, reason)}
        fresh.refused_ids = {
            **rnd.refused_ids,
            **{rnd.contributions[s]: reason for s in offenders},
        }
        fresh.retakes = rnd.retakes + 1
        self._seen_ids.difference_update(rnd.contributions.values())
        self._round = fresh
        self._cond.notify_all()
        return ServerRoundRetaken(
            site="server",
            round=rnd.number + 1,
            variables=bad,
            excluded=offenders,
            detail=f"the others send theirs again; retake {fresh.retakes}",
        )

    def _persist(
        self, model: Mapping[str, np.ndarray], current_round: int, history: list[dict[str, Any]]
    ) -> None:
        """Saves the state, then the model of ``current_round`` (each atomically).

        State first: a crash between the two leaves a state ahead of the model, and ``_restore``
        goes back to the model's round (the sites still hold that round's contributions). The
        other order could leave a model that nothing says was aggregated.
        """
        try:
            with self._save_lock:
                self._save_state(current_round, history)
                persistence.save_model(self.workspace, model, self.config.task_name, current_round)
                self._saved_round = current_round
        except OSError as exc:
            # The federation goes on; a restart would resume from the last round saved.
            log.error(
                "could not save the global model of round %d (%s): a server restarted now "
                "would resume from round %d",
                current_round,
                exc,
                self._saved_round + 1,
            )

    def _monitor_loop(self) -> None:
        period = max(0.05, min(1.0, self.config.heart_beat_timeout / 4))
        while not self._stop.wait(period):
            try:
                self._check_sites()
            except Exception:  # a full disk must not end heartbeat drops and round timeouts
                log.exception("server monitor: checking sites and rounds failed; will retry")

    def _check_sites(self) -> None:
        now = time.monotonic()
        dead: list[tuple[str, str]] = []
        with self._cond:
            for name, site in list(self.sites.items()):
                if now - site.last_seen > self.config.heart_beat_timeout:
                    self._forget(name)
                    self.dropped.append(name)
                    dead.append((name, f"no heartbeat for {self.config.heart_beat_timeout:g} s"))
            for name, deadline in list(self._returning.items()):
                if now > deadline:
                    del self._returning[name]
                    self.dropped.append(name)
                    dead.append(
                        (
                            name,
                            "did not register again within "
                            f"{self.config.heart_beat_timeout:g} s of the server's restart",
                        )
                    )
            if dead:
                self._cond.notify_all()
        for name, reason in dead:
            log.warning("site %s dropped: %s", name, reason)
            self.bus.publish(SiteLeft(site="server", site_name=name, reason=reason))
        self._maybe_close_round()

    # ------------------------------------------------------------------ cross-site validation

    def SubmitBestLocalModel(
        self, frames: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        return self._run(context, self._submit_best, serde.unbatch(frames), context)

    def _submit_best(
        self, frames: Iterator[bytes | memoryview], context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        header, site = self._contribution_header(frames, context)
        # In a federation with homomorphic encryption a best local model travels encrypted like
        # every update: the server stores and forwards ciphertexts it cannot read, and each
        # site decrypts before validating. Elsewhere it is plaintext weights.
        encrypted = self.he_context is not None
        params_in = header.data.params
        if encrypted and params_in and not any(p.array.dtype == serde.CKKS for p in params_in):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "refused: this federation runs homomorphic encryption and this best local "
                "model is plaintext: the server never holds a site's weights in the clear "
                "(list ModelEncryptor in the site's pre_processors: it encrypts the best "
                "model too)",
            )
        assembler = serde.ModelAssembler(
            pb.Contribution, self._expected(plain=not encrypted), ciphertexts=encrypted
        )
        assembler.on_header(header)
        params = serde.receive_model(assembler, frames)
        problem = self._best_ciphertext_problem(params) if encrypted else None
        if problem:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {problem}")
        self.cross_site.put_best(site.name, params)
        comment = f"Received best model from {site.name}." if params else "not participating"
        return pb.FederatedSummary(comment=comment, meta=self._meta())

    def _best_ciphertext_problem(self, params: Mapping[str, np.ndarray]) -> str | None:
        """A ciphertext of a best local model that the public context cannot read, or that
        does not hold the variable's dtype and shape, in words."""
        plain = self._expected(plain=True)
        for name, value in params.items():
            if not he.is_ciphertext(value):
                continue
            try:
                _, dtype, shape = he.vector(self.he_context, value)
            except he.HEError as exc:
                return f"variable {name!r}: {exc}"
            if (dtype, shape) != plain[name]:
                return (
                    f"variable {name!r}: a ciphertext of {dtype} {shape}, the model's is "
                    f"{plain[name][0]} {plain[name][1]}"
                )
        return None

    def GetValidationModels(
        self, request: pb.ClientState, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        site = self._run(context, self._authenticate, request, context)
        with self._cond:
            delivered, owners, models, more = self.cross_site.due(
                site.name, self.finished, self.global_model, self.sites
            )
        for owner in owners:
            yield from serde.encode_model_stream(
                pb.CurrentModel(meta=self._meta(), owner=owner), models[owner], batch=True
            )
        yield serde.encode_done_frame(more)
        # Only a stream that went through counts: after a broken one the site gets them again.
        self.cross_site.delivered(delivered, owners)

    def SubmitCrossSiteValidationResults(
        self, request: pb.CrossValidationResults, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        return self._run(context, self._submit_results, request, context)

    def _submit_results(
        self, request: pb.CrossValidationResults, context: grpc.ServicerContext
    ) -> pb.FederatedSummary:
        site = self._authenticate(request.client, context)
        self.cross_site.add_results(
            site.name,
            {r.model_owner: json_format.MessageToDict(r.metrics) for r in request.results},
        )
        return pb.FederatedSummary(
            comment=f"Received Cross Validation results from {site.name}.", meta=self._meta()
        )

    def reset_cross_site_delivery(self, sites: list[str]) -> None:
        """An admin's ``validate``: these sites get every model again."""
        self.cross_site.reset(sites)

    def cross_val_results_snapshot(self) -> dict[str, dict[str, Any]]:
        """``{data_site: {model_owner: metrics}}`` as received so far."""
        return self.cross_site.snapshot()

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def load_saved_model(workspace: Path) -> dict[str, np.ndarray] | None:
        """The last saved global model of a server workspace, if any."""
        return persistence.load_saved_model(workspace)


def load_server_he_context(workspace: Path) -> Any:
    """The public HE context of a server workspace (``startup/server_context.tenseal``), or None.

    Raises:
        ConfigError: the workspace holds a secret key (a site's ``client_context.tenseal``, or
            a server context with one), or a context that cannot be read.
    """
    startup = Path(workspace) / "startup"
    secret = startup / he.CLIENT_CONTEXT
    if secret.exists():
        raise ConfigError(
            secret,
            "",
            "a site's HE context with the federation's secret key is in the server's workspace; "
            "the server must never hold it: remove it (the server needs only "
            f"{he.SERVER_CONTEXT})",
        )
    path = startup / he.SERVER_CONTEXT
    if not path.exists():
        return None
    try:
        return he.load_context(path, "server")
    except he.HEError as exc:
        raise ConfigError(path, "", str(exc).removeprefix(f"{path}: ")) from None


def _held(value: Any) -> np.ndarray:
    """The server's read-only view of a caller's model array, without a copy of the model.

    The server never writes a global model's arrays (each round's model is new memory), and a
    view is never recycled by the buffer pool (``BufferPool.give`` keeps no views), so the
    caller's arrays stay as they were. Only an array that is not C-contiguous, or not in native
    byte order, is copied (the wire and the pool want those).
    """
    array = np.asarray(value)
    if not array.flags.c_contiguous or not array.dtype.isnative:
        array = np.array(array, order="C", dtype=array.dtype.newbyteorder("="))
    view = array.view()
    view.flags.writeable = False
    return view


def metrics_struct(metrics: Mapping[str, float]) -> Struct:
    """Metrics as a protobuf Struct."""
    s = Struct()
    s.update({k: float(v) for k, v in metrics.items()})
    return s
