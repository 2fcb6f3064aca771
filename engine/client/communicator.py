"""Communicator: every call a site makes to the FL server, with retries and clear reasons."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.struct_pb2 import Struct

from engine import serde
from engine.client.data_assembler import DataAssembler
from engine.client.data_processors import DataContext, he_processors
from engine.client.fl_context import FLContext, RemoteModel
from engine.config import COMPRESSIONS, ServerEndpoint
from engine.events import ConnectionChanged, EventBus, ModelTransferred
from engine.rpc import TOKEN_HEADER, FederatedStub
from engine.tls import (
    KitError,
    SecurityFailure,
    preflight_certificate,
    read_tls_files,
    security_failure,
)
from protos import federated_pb2 as pb

__all__ = ["Communicator", "FLCommunicationError", "RemoteModel"]

log = logging.getLogger("engine.client.communicator")

T = TypeVar("T")

# Codes worth another try: the network or the server may come back.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}

CALL_TIMEOUT = 30.0  # seconds for one unary call; streams rely on keepalive instead
# Streams have no deadline (a model may take minutes): HTTP/2 keepalive notices a dead peer.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]
# gRPC waits up to 2 minutes between reconnection attempts after a few failures: a server back
# within the retry budget would then be found only after it. Our own backoff paces the retries.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def channel_options(configured: Any, defaults: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``defaults`` with a config's ``[[name, value], ...]`` replacing those it names.

    gRPC takes the first of two equal option names, so the config's options (Clara's
    ``servers[].service.options``) must replace our defaults rather than follow them.
    """
    return list({**dict(defaults), **{str(o[0]): o[1] for o in configured or []}}.items())


def grpc_compression(value: Any) -> grpc.Compression:
    """The ``grpc.Compression`` that a ``compression`` setting means.

    Raises:
        ValueError: anything but None, "Gzip", "Deflate" or a ``grpc.Compression`` (Clara read
            any other string as "no compression"; a typo should not silently do so).
    """
    if value is None:
        return grpc.Compression.NoCompression
    if isinstance(value, grpc.Compression):
        return value
    if isinstance(value, str) and value in COMPRESSIONS:
        return getattr(grpc.Compression, value)  # type: ignore[no-any-return]
    raise ValueError(
        f"compression must be one of {', '.join(map(repr, COMPRESSIONS))}, None or a "
        f"grpc.Compression; got {value!r}"
    )


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the session token header to every call on a channel (``set_up_channel(..., token)``,
    the lineage's call credentials; here it works on plaintext channels too)."""

    def __init__(self, token: str) -> None:
        self._header = (TOKEN_HEADER, token)

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != TOKEN_HEADER]
        return details._replace(metadata=[*metadata, self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 5.0
# "No token yet": poll again after this pause, unless the server held the call that long
# already (a long-poll): then at once, or a site would learn of a new round up to this late.
_NO_TOKEN_POLL = 0.2


class FLCommunicationError(RuntimeError):
    """A call to the server failed for good.

    Attributes:
        action: what was attempted ("GetModel", ...).
        code: the gRPC status code, or None.
        reason: the reason in words, for the operator.
        token_expired: the server no longer knows this site's token (register again).
        kind: for TLS and authentication failures, what refused the site (``wrong_ca``,
            ``expired``, ``host_name``, ``not_in_federation``, ``plaintext_to_tls``, ...; see
            ``engine.tls.SecurityFailure``); None for other failures.
    """

    def __init__(
        self,
        action: str,
        code: grpc.StatusCode | None,
        reason: str,
        kind: str | None = None,
    ) -> None:
        self.action, self.code, self.reason, self.kind = action, code, reason, kind
        self.token_expired = code == grpc.StatusCode.UNAUTHENTICATED and "Unknown client" in reason
        name = code.name if code is not None else "ERROR"
        super().__init__(f"{action} failed ({name}): {reason}")

    @property
    def security(self) -> bool:
        """TLS or authentication refused the site: retrying cannot help (exit code 3)."""
        return self.kind is not None


class _Wait(Exception):
    """The server has no work for us yet; poll again without spending the retry budget."""


class Communicator:
    """Talks to the FL server over gRPC.

    Args:
        model_manager: the site's ClientModelManager: ``submitUpdate`` reads this round's
            contribution from it (Δ, privacy) when the caller has not packed one, and
            ``submit_best_local_model`` the best local model when given no ``params``.
        ssl_args: ``{"ssl_root_cert", "ssl_cert", "ssl_private_key"}`` file paths, for TLS.
        secure_train: use TLS (mutual, with ``ssl_args``).
        retry_timeout: seconds within which transient failures are retried.
        pre_processors: DataProcessors run, in order, on a contribution that ``submitUpdate``
            assembles.
        post_processors: DataProcessors run, in order, on every model ``getModel`` receives.
        client_state_processors: processors that add metadata to every ClientState
            (``process(client_state, app_ctx)``; see ``ClientStateProcessor``).
        compression: "Gzip", "Deflate", a ``grpc.Compression`` or None.
        bus: where connection and transfer events go.
        site: this site's name (for events).
        stop: when set, waiting and retrying end at once (abort).

    Raises:
        ValueError: an unknown ``compression`` (named, with the allowed ones).
    """

    def __init__(
        self,
        model_manager: Any = None,
        ssl_args: Mapping[str, Any] | None = None,
        secure_train: bool = False,
        retry_timeout: float = 30,
        pre_processors: list[Any] | None = None,
        post_processors: list[Any] | None = None,
        client_state_processors: list[Any] | None = None,
        compression: str | None = None,
        *,
        bus: EventBus | None = None,
        site: str = "",
        stop: threading.Event | None = None,
    ) -> None:
        self.model_manager = model_manager
        self.ssl_args = dict(ssl_args or {})
        self.secure_train = secure_train
        self.retry_timeout = float(retry_timeout)
        self.pre_processors = list(pre_processors or [])
        # Whether registration says if this site encrypts (HE). A site service registers its
        # session before any MMAR is deployed and cannot say: it leaves the field out, and the
        # server checks each upload instead.
        self.declares_he = True
        self.post_processors = list(post_processors or [])
        self.client_state_processors = list(client_state_processors or [])
        self.compression = compression
        self._grpc_compression = grpc_compression(compression)  # refused here, not at a call
        self.bus = bus or EventBus()
        self.site = site
        self.stop = stop or threading.Event()
        self.heartbeat_done = False
        self.should_stop = False
        self._channels: dict[str, tuple[grpc.Channel, FederatedStub]] = {}
        self._lock = threading.Lock()
        self._connected: bool | None = None
        # Calls in flight that an abort cancels, and the one thread that watches for it.
        self._in_flight: set[Any] = set()
        self._flight_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()

    # ------------------------------------------------------------------ channel

    def set_up_channel(self, channel_dict: Any, token: str | None = None) -> grpc.Channel:
        """Connects to the server: a new channel, the caller's to use and close.

        The lineage opens one per call (``with set_up_channel(servers[task]) as channel:``);
        closing it leaves this communicator's own calls alone (they keep their channel per
        server, with its keepalive and reconnection state).

        Args:
            channel_dict: ``{"target": "host:port", "options": [[name, value], ...]}`` (Clara's
                ``servers[].service``), or a ServerEndpoint.
            token: when given, every call on the channel carries it (the ``x-custom-token``
                header the server identifies the session by).

        Returns:
            an initialised grpc channel (TLS when ``secure_train``; with ``compression``).
        """
        channel = self._new_channel(_channel_dict(channel_dict))
        if token:
            return grpc.intercept_channel(channel, _TokenMetadata(token))
        return channel

    def _new_channel(self, channel_dict: Mapping[str, Any]) -> grpc.Channel:
        target = str(channel_dict["target"])
        options = channel_options(
            channel_dict.get("options", []),
            [
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20),
                *KEEPALIVE_OPTIONS,
                *RECONNECT_OPTIONS,
            ],
        )
        if self.secure_train:
            root, cert, key = self._tls_files(target)
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=cert
            )
            return grpc.secure_channel(target, creds, options, self._grpc_compression)
        return grpc.insecure_channel(target, options, self._grpc_compression)

    def _stub_for(self, channel_dict: Mapping[str, Any]) -> tuple[grpc.Channel, FederatedStub]:
        """This communicator's own channel to a target (made once, reused by every call)."""
        target = str(channel_dict["target"])
        with self._lock:
            if target not in self._channels:
                channel = self._new_channel(channel_dict)
                self._channels[target] = (channel, FederatedStub(channel))
            return self._channels[target]

    def _tls_files(self, target: str) -> tuple[bytes, bytes, bytes]:
        """The kit's TLS files, checked before they are shown to the server.

        Raises:
            FLCommunicationError: a file is missing or its key readable by others, or this
                site's certificate is expired or not from the kit's authority (``kind`` set).
        """
        paths = (
            self.ssl_args.get("ssl_root_cert"),
            self.ssl_args.get("ssl_cert"),
            self.ssl_args.get("ssl_private_key"),
        )
        try:
            files = read_tls_files(*paths)
            preflight_certificate(*paths)  # type: ignore[arg-type]
        except KitError as exc:
            failure = SecurityFailure("kit", str(exc))
        except SecurityFailure as exc:
            failure = exc
        else:
            return files
        self._set_connected(False, target, "failed", failure.reason)
        raise FLCommunicationError("Connect", None, failure.reason, kind=failure.kind)

    def _security_failure(
        self, service: str, code: grpc.StatusCode | None, details: str
    ) -> SecurityFailure | None:
        """What TLS or authentication refused, in the operator's words; None if neither did."""
        return security_failure(
            code,
            details,
            service,
            secure=self.secure_train,
            cert=self.ssl_args.get("ssl_cert"),
            private_key=self.ssl_args.get("ssl_private_key"),
        )

    def _stub(self, servers: Mapping[str, ServerEndpoint], task_name: str) -> FederatedStub:
        endpoint = servers[task_name]
        return self._stub_for({"target": endpoint.target, "options": endpoint.options})[1]

    def close(self) -> None:
        """Closes every channel."""
        self._closed.set()  # the abort watcher ends
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    # ------------------------------------------------------------------ errors and retries

    def grpc_error_handler(
        self,
        service: str,
        grpc_error: grpc.RpcError,
        action: str,
        start_time: float,
        retry: int,
        verbose: bool = False,
    ) -> float:
        """Decides what a failed call leads to.

        Args:
            service: the server's target.
            grpc_error: the error.
            action: the call ("GetModel").
            start_time: monotonic time of the first attempt.
            retry: attempts made so far.
            verbose: log every failure, not only the first.

        Returns:
            seconds to sleep before the next attempt.

        Raises:
            _Wait: the server has nothing for us yet (no retry budget spent).
            FLCommunicationError: not worth retrying, or the retry budget is spent.
        """
        code = grpc_error.code() if hasattr(grpc_error, "code") else None
        details = (grpc_error.details() if hasattr(grpc_error, "details") else "") or str(code)
        self.should_stop = False
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("No token"):
            raise _Wait()
        if code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("Unknown client"):
            # The server forgot the session (it restarted, or dropped the site): the caller
            # registers again. The link is fine; this is no failure to show the operator.
            raise FLCommunicationError(action, code, details)
        # TLS and authentication failures are not retried: the reason goes to the operator.
        failure = self._security_failure(service, code, details)
        if failure is not None:
            self._set_connected(False, service, "failed", failure.reason)
            raise FLCommunicationError(action, code, failure.reason, kind=failure.kind)
        if code not in _RETRYABLE:
            self._set_connected(False, service, "failed", details)
            raise FLCommunicationError(action, code, details)
        if code == grpc.StatusCode.UNAVAILABLE:
            self.should_stop = True
        elapsed = time.monotonic() - start_time
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * (2**retry)) * random.uniform(0.5, 1.0)
        if elapsed + delay > self.retry_timeout:
            reason = (
                f"gave up after {retry + 1} attempts in {elapsed:.1f} s "
                f"(retry_timeout {self.retry_timeout:g} s): {details}"
            )
            self._set_connected(False, service, "failed", reason)
            raise FLCommunicationError(action, code, reason)
        if verbose or retry == 0:
            log.warning("%s to %s failed (%s: %s); retrying", action, service, code, details)
        self._set_connected(False, service, "retrying", f"{action}: {details}")
        return delay

    def _call(
        self,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        action: str,
        fn: Callable[[], T],
    ) -> T:
        service = servers[task_name].target
        start = time.monotonic()
        retry = 0
        while True:
            if self.stop.is_set():
                raise FLCommunicationError(action, None, "aborted")
            attempt = time.monotonic()
            try:
                result = fn()
                self._set_connected(True, service, "connected")
                return result
            except grpc.RpcError as exc:
                try:
                    delay = self.grpc_error_handler(service, exc, action, start, retry)
                except _Wait:
                    self._set_connected(True, service, "connected")
                    start, retry = time.monotonic(), 0
                    held = start - attempt
                    delay = 0.0 if held >= _NO_TOKEN_POLL else _NO_TOKEN_POLL
                else:
                    retry += 1
                if delay > 0 and self.stop.wait(delay):
                    raise FLCommunicationError(action, None, "aborted") from None

    @contextlib.contextmanager
    def _abortable(self, call: Any, action: str) -> Iterator[None]:
        """Cancels ``call`` (a model stream: it may take minutes) as soon as ``stop`` is set.

        Raises:
            FLCommunicationError: "aborted", when the call ended because of ``stop``.
        """
        with self._flight_lock:
            self._in_flight.add(call)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._cancel_on_stop, name=f"abort-watch-{self.site}", daemon=True
                )
                self._watcher.start()
        if self.stop.is_set():  # set before the watcher took its list: it may not see this call
            call.cancel()
        try:
            yield
        except (grpc.RpcError, grpc.FutureCancelledError):
            if self.stop.is_set():
                raise FLCommunicationError(action, None, "aborted") from None
            raise
        finally:
            with self._flight_lock:
                self._in_flight.discard(call)

    def _cancel_on_stop(self) -> None:
        """One thread per communicator (not one per call): cancels the calls in flight at once
        when ``stop`` is set; ends after ``close`` once nothing is in flight."""
        while True:
            if self.stop.wait(1.0):
                with self._flight_lock:
                    calls = list(self._in_flight)
                    # Gone before the lock is let go: a call from now on starts a new watcher,
                    # which matters once the site clears ``stop`` for its next run.
                    self._watcher = None
                for call in calls:
                    call.cancel()
                return  # a call made while stop is still set cancels itself
            with self._flight_lock:
                if self._closed.is_set() and not self._in_flight:
                    self._watcher = None
                    return

    def _set_connected(self, ok: bool, service: str, state: str, detail: str = "") -> None:
        if ok and self._connected:
            return
        self._connected = ok
        self.bus.publish(
            ConnectionChanged(site=self.site, state=state, server=service, detail=detail)
        )

    def _metadata(self, token: str | None) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_HEADER, token),) if token else ()

    # ------------------------------------------------------------------ messages

    def client_registration(
        self, uid: str, servers: Mapping[str, ServerEndpoint], task_name: str
    ) -> str:
        """Registers this site; returns its token.

        Raises:
            FLCommunicationError: refused (wrong task, too many sites, ...) or unreachable.
        """
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = ""
        login = pb.ClientLogin(client_name=uid, client_ip=ip, meta=pb.ModelMetaData(task=task_name))
        # Whether this site encrypts (homomorphic encryption): a server of the other kind
        # refuses it here, with the reason, rather than at its first upload.
        if self.declares_he:
            encryptor, decryptor = he_processors(self.pre_processors, self.post_processors)
            login.meta_data.update(
                {"he": serde.CKKS if encryptor else "none", "he_decrypt": decryptor is not None}
            )
        stub = self._stub(servers, task_name)
        self.bus.publish(
            ConnectionChanged(site=self.site, state="connecting", server=servers[task_name].target)
        )
        reply = self._call(
            servers, task_name, "Register", lambda: stub.Register(login, timeout=CALL_TIMEOUT)
        )
        self.bus.publish(
            ConnectionChanged(
                site=self.site,
                state="registered",
                server=servers[task_name].target,
                detail=reply.comment,
            )
        )
        return reply.token

    def get_client_state(
        self, task_name: str, token: str, app_ctx: Mapping[str, Any] | None = None
    ) -> pb.ClientState:
        """This site's ClientState for a call (task, round, token, processor metadata).

        Every client-state processor runs on it, in order, with ``app_ctx``: it adds to the
        state's ``meta_data`` in place, or returns the state to use (the lineage's form).
        """
        ctx = app_ctx or {}
        state = pb.ClientState(
            client_name=self.site,
            token=token,
            meta=pb.ModelMetaData(task=task_name, current_round=int(ctx.get("current_round", 0))),
        )
        for processor in self.client_state_processors:
            result = processor.process(state, ctx)
            if isinstance(result, pb.ClientState):
                state = result
        return state

    def getModel(
        self,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        app_ctx: Mapping[str, Any] | None = None,
        *,
        on_header: Callable[[pb.CurrentModel], None] | None = None,
    ) -> RemoteModel:
        """The current global model (waits while the server has none for this site).

        Args:
            servers: task name to ServerEndpoint.
            task_name: the server's task.
            token: this site's session token.
            app_ctx: what the client-state and post-processors see (round, site, ...).
            on_header: called with the model's header (its meta: round, finished) as soon as
                it arrives, before the payload (once per attempt).

        Returns:
            the model, already through the post-processors (each sees a DataContext whose
            ``model`` is the received tensors and ``header`` the CurrentModel).
        """
        stub = self._stub(servers, task_name)
        state = self.get_client_state(task_name, token, app_ctx)

        def fetch() -> tuple[Any, dict[str, np.ndarray], float]:
            frames = stub.GetModel(state, metadata=self._metadata(token))
            timed = _Timed(frames)
            try:
                with self._abortable(frames, "GetModel"):
                    header, params = serde.decode_model_stream(
                        timed, pb.CurrentModel, on_header=on_header
                    )
            except serde.SerdeError as exc:
                frames.cancel()
                raise FLCommunicationError(
                    "GetModel", None, f"model stream refused: {exc}"
                ) from exc
            return header, params, timed.seconds

        header, params, seconds = self._call(servers, task_name, "GetModel", fetch)
        model = RemoteModel(
            meta=header.meta,
            params=self._post_process(params, header, app_ctx),
            owner=header.owner or "server",
        )
        self.bus.publish(
            ModelTransferred(
                site=self.site,
                direction="download",
                round=int(header.meta.current_round) + (0 if header.meta.finished else 1),
                nbytes=model.nbytes,
                seconds=seconds,
                what="global model",
            )
        )
        return model

    def _post_process(
        self,
        params: dict[str, np.ndarray],
        header: Any,
        app_ctx: Mapping[str, Any] | None,
    ) -> dict[str, np.ndarray]:
        if not self.post_processors:
            return params
        data_ctx = DataContext(model=params, header=header, fl_ctx=FLContext())
        ctx = dict(app_ctx or {})
        for processor in self.post_processors:
            processor.process(data_ctx, ctx)
        return data_ctx.model

    def submitUpdate(
        self,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        fl_ctx: FLContext | None,
        app_ctx: Mapping[str, Any] | None,
        uid: str,
    ) -> pb.FederatedSummary:
        """Uploads this round's contribution.

        The contribution is the one ``fl_ctx`` carries ("contribution": the Contribution
        header, "model_data": the tensors) when the caller packed it; otherwise it is assembled
        here as the lineage does: Δ from ``model_manager`` (privacy applied), then the
        ``pre_processors``, and packed into ``fl_ctx``, so that sending the same ``fl_ctx``
        again sends the same bytes (privacy noise is drawn once). Either way a retried upload
        carries the same contribution id, so the server counts it once.

        Args:
            servers: task name to ServerEndpoint.
            task_name: the server's task.
            token: this site's session token.
            fl_ctx: the step's context (None: a fresh one).
            app_ctx: what the processors see (round, site, ...).
            uid: this site's name (the contribution id starts with it).

        Returns:
            the server's reply.

        Raises:
            ValueError: nothing to send: ``fl_ctx`` carries no contribution and this
                communicator has no model manager to read one from.
            FLCommunicationError: the upload failed for good.
        """
        fl_ctx = fl_ctx if fl_ctx is not None else FLContext()
        header: pb.Contribution | None = fl_ctx.get_prop("contribution")
        params: dict[str, np.ndarray] | None = fl_ctx.get_prop("model_data")
        if header is None or params is None:
            if self.model_manager is None:
                raise ValueError(
                    "submitUpdate: fl_ctx carries no 'contribution' and 'model_data', and this "
                    "Communicator has no model_manager to read this round's update from"
                )

            state = self.get_client_state(task_name, token, app_ctx)
            header, params = DataAssembler.get_contribution_data(
                self.model_manager,
                task_name,
                state,
                self.pre_processors,
                fl_ctx,
                dict(app_ctx or {}),
            )
            fl_ctx.set_prop("contribution", header)
            fl_ctx.set_prop("model_data", params)
        if not header.client.client_name:
            header.client.client_name = uid
        if not header.contribution_id:
            header.contribution_id = f"{uid}-{uuid.uuid4()}"
        return self.submit_contribution(servers, task_name, token, header, params)

    def submit_contribution(
        self,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        header: pb.Contribution,
        params: Mapping[str, np.ndarray],
    ) -> pb.FederatedSummary:
        """Uploads an assembled contribution (its header names the site and the id); retried
        within ``retry_timeout``, the same bytes under the same id each time.

        ``submitUpdate`` is the lineage's door to this, taking the contribution packed in an
        FLContext; a caller that holds the header and the tensors calls this directly.
        """
        return self._upload(servers, task_name, token, "SubmitUpdate", header, params)

    def _upload(
        self,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        action: str,
        header: pb.Contribution,
        params: Mapping[str, np.ndarray],
    ) -> pb.FederatedSummary:
        stub = self._stub(servers, task_name)
        method = getattr(stub, action)
        seconds = 0.0

        def send() -> pb.FederatedSummary:
            nonlocal seconds
            t0 = time.perf_counter()
            sent: list[float] = []
            count = 0

            def messages() -> Iterator[bytes]:
                nonlocal count
                for message in _with_header(header, params):
                    count += 1
                    yield message
                # gRPC took the last one: flow control held the rest until the server read
                # them. The reply may come much later (the upload that completes a round is
                # answered once the round is saved), and that is not transfer.
                sent.append(time.perf_counter())

            call = method.future(messages(), metadata=self._metadata(token))
            with self._abortable(call, action):
                reply = call.result()
            # One message (a model under ~1 MiB) is taken at once: too small to time.
            seconds = sent[0] - t0 if sent and count > 1 else 0.0
            return reply

        reply = self._call(servers, task_name, action, send)
        self.bus.publish(
            ModelTransferred(
                site=self.site,
                direction="upload",
                round=int(header.client.meta.current_round) + 1 if action == "SubmitUpdate" else 0,
                nbytes=serde.model_nbytes(params),
                seconds=seconds,
                what="contribution" if action == "SubmitUpdate" else "best local model",
            )
        )
        return reply

    def send_heartbeat(
        self, servers: Mapping[str, ServerEndpoint], task_name: str, token: str
    ) -> pb.FederatedSummary:
        """One heartbeat (a single attempt: the heartbeat thread is the retry loop)."""
        stub = self._stub(servers, task_name)
        state = self.get_client_state(task_name, token)
        return stub.Heartbeat(state, metadata=self._metadata(token), timeout=CALL_TIMEOUT)

    def quit_remote(self, servers: Mapping[str, ServerEndpoint], task_name: str, token: str) -> str:
        """Tells the server this site leaves; returns the server's comment."""
        stub = self._stub(servers, task_name)
        state = self.get_client_state(task_name, token)
        reply = self._call(
            servers,
            task_name,
            "Quit",
            lambda: stub.Quit(state, metadata=self._metadata(token), timeout=CALL_TIMEOUT),
        )
        self.bus.publish(
            ConnectionChanged(
                site=self.site,
                state="disconnected",
                server=servers[task_name].target,
                detail="quit",
            )
        )
        return reply.comment

    def submit_best_local_model(
        self,
        uid: str,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        disable: bool = False,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Sends this site's best local model for cross-site validation.

        Args:
            uid: this site's name.
            servers: task name to ServerEndpoint.
            task_name: the server's task.
            token: this site's session token.
            disable: send an empty model (this site does not take part).
            params: the model to send; None reads the best local model from
                ``model_manager`` (as the lineage does), or sends an empty one without it.

        Returns:
            the server's comment.
        """
        if params is None and not disable and self.model_manager is not None:
            _, params = DataAssembler.get_best_local_model(
                self.model_manager, task_name, self.get_client_state(task_name, token)
            )
        header = pb.Contribution(
            client=self.get_client_state(task_name, token),
            type="weights",
            n_iter=1,
            contribution_id=f"{uid}-best-{uuid.uuid4()}",
        )
        reply = self._upload(
            servers,
            task_name,
            token,
            "SubmitBestLocalModel",
            header,
            {} if disable else dict(params or {}),
        )
        return reply.comment

    def get_validation_models(
        self, uid: str, servers: Mapping[str, ServerEndpoint], task_name: str, token: str
    ) -> tuple[list[RemoteModel], bool]:
        """Models of other sites (and the server) to validate, and whether more will come."""
        stub = self._stub(servers, task_name)
        state = self.get_client_state(task_name, token)

        def fetch() -> tuple[list[RemoteModel], bool]:
            models: list[RemoteModel] = []
            more = False
            frames = stub.GetValidationModels(state, metadata=self._metadata(token))
            try:
                for item in serde.decode_model_streams(frames, pb.CurrentModel):
                    if isinstance(item, bool):
                        more = item
                    else:
                        header, params = item
                        models.append(
                            RemoteModel(meta=header.meta, params=params, owner=header.owner)
                        )
            except serde.SerdeError as exc:
                frames.cancel()
                raise FLCommunicationError(
                    "GetValidationModels", None, f"model stream refused: {exc}"
                ) from exc
            return models, more

        return self._call(servers, task_name, "GetValidationModels", fetch)

    def submit_cross_site_validation_results(
        self,
        uid: str,
        servers: Mapping[str, ServerEndpoint],
        task_name: str,
        token: str,
        client_names: list[str],
        client_metrics: list[Mapping[str, float]],
    ) -> str:
        """Sends the metrics of validating each owner's model on this site's data."""
        results = []
        for owner, metrics in zip(client_names, client_metrics, strict=True):
            s = Struct()
            s.update({k: float(v) for k, v in metrics.items()})
            results.append(pb.ValidationResult(model_owner=owner, metrics=s))
        request = pb.CrossValidationResults(
            client=self.get_client_state(task_name, token), results=results
        )
        stub = self._stub(servers, task_name)
        reply = self._call(
            servers,
            task_name,
            "SubmitCrossSiteValidationResults",
            lambda: stub.SubmitCrossSiteValidationResults(
                request, metadata=self._metadata(token), timeout=CALL_TIMEOUT
            ),
        )
        return reply.comment


class _Timed:
    """Wraps a stream of response messages and times the transfer in it.

    The clock cannot start at the call (a long-poll may hold it for a whole round). It starts
    when the consumer, done with the first message, asks for the second, and stops when it is
    done with the last: that span carries every byte but the first message's, so ``seconds``
    scales it by ``total / rest`` to estimate the whole transfer. Where the rest is under a
    quarter of the total (a model in one message, or one big message and a small tail) that
    estimate means little: ``seconds`` is 0.0, "not measured".
    """

    def __init__(self, messages: Iterator[bytes]) -> None:
        self._messages = messages
        self._t0: float | None = None
        self._t1: float | None = None
        self._first = 0
        self._total = 0

    def __iter__(self) -> Iterator[bytes]:
        for index, message in enumerate(self._messages):
            if index == 0:
                self._first = len(message)
            self._total += len(message)
            yield message
            if index == 0:
                self._t0 = time.perf_counter()
            else:
                self._t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        rest = self._total - self._first
        if self._t0 is None or self._t1 is None or rest * 4 < self._total:
            return 0.0
        return (self._t1 - self._t0) * self._total / rest


def _channel_dict(value: Any) -> Mapping[str, Any]:
    """A ``{"target", "options"}`` mapping from one, or from a ServerEndpoint."""
    if isinstance(value, Mapping):
        if "target" not in value:
            raise ValueError(f"a channel needs a 'target' (host:port); got {dict(value)!r}")
        return value
    target = getattr(value, "target", None)
    if not target:
        raise ValueError(
            f"expected {{'target': 'host:port', 'options': [...]}} or a ServerEndpoint, "
            f"got {value!r}"
        )
    return {"target": target, "options": list(getattr(value, "options", None) or [])}


def _with_header(header: pb.Contribution, params: Mapping[str, np.ndarray]) -> Iterator[bytes]:
    # A fresh generator per attempt: a retry re-sends the whole stream, same contribution id.
    yield from serde.encode_model_stream(header, params, batch=True)
