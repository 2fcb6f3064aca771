"""DirectFederatedClient: connect, pull and push driven by the caller's own training loop."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from numbers import Real
from typing import Any

import numpy as np

from engine.client.communicator import RemoteModel
from engine.client.data_assembler import DataAssembler
from engine.client.fed_client_base import FederatedClientBase, _Pending
from engine.client.fl_context import FLContext
from engine.events import EventBus

__all__ = ["DirectFederatedClient"]


class DirectFederatedClient(FederatedClientBase):
    """A client whose caller owns the training loop (multi-GPU rank 0, tests, scripts).

    The positional arguments follow the lineage's ``DirectFederatedClient``; what reaches or
    leaves the site goes through the same steps as FederatedClient's: a pulled model through
    the post-processors (the communicator runs them) with ``exclude_vars`` left out, a pushed
    Δ through ``exclude_vars``, the NaN/Inf check, ``privacy`` and the pre-processors
    (``DataAssembler.get_contribution_data``).

    Args:
        client_id: this site's name.
        client_args: see FederatedClientBase.
        secure_train: TLS on the channel.
        server_args: the servers, as ServerEndpoints or ``{task_name: ServerEndpoint}``.
        exclude_vars: regex of variables kept local: not returned by a pull, not pushed.
        privacy: PrivacyProtocol applied to every pushed Δ, or None.
        retry_timeout: seconds within which transient failures are retried.
        train_context: the caller's training context; its ``total_steps`` (a mapping key or
            an attribute) is a push's ``n_iter`` when the push's options give none.
        model_reader_writer: object with ``get_weights()`` / ``set_weights()`` (used by
            ``pull_models``, FederatedClientBase's loading pull).
        pre_processors: DataProcessors run on each pushed contribution.
        post_processors: DataProcessors run on each pulled model.
        client_state_processors: processors adding metadata to every ClientState.
        req_processors: admin request processors.
        handlers: event handlers (called with every event).
        train_options: the caller's options, kept as ``self.train_options``.
        model_validator: see ClientModelManager (keyword only; not in the lineage's list).
        cross_site_validate: see FederatedClientBase (keyword only).
        compression: "Gzip", "Deflate" or None (keyword only).
        bus: where this client's events go (keyword only).
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
        train_context: Any = None,
        model_reader_writer: Any = None,
        pre_processors: list[Any] | None = None,
        post_processors: list[Any] | None = None,
        client_state_processors: list[Any] | None = None,
        req_processors: list[Any] | None = None,
        handlers: list[Any] | None = None,
        train_options: Any = None,
        *,
        model_validator: Any = None,
        cross_site_validate: bool = False,
        compression: str | None = None,
        bus: EventBus | None = None,
    ) -> None:
        super().__init__(
            client_id,
            client_args,
            secure_train,
            server_args,
            exclude_vars=exclude_vars,
            privacy=privacy,
            retry_timeout=retry_timeout,
            cross_site_validate=cross_site_validate,
            model_reader_writer=model_reader_writer,
            model_validator=model_validator,
            pre_processors=pre_processors,
            post_processors=post_processors,
            client_state_processors=client_state_processors,
            req_processors=req_processors,
            handlers=handlers,
            compression=compression,
            bus=bus,
        )
        self.train_context = train_context
        self.train_options = dict(train_options or {})
        self.last_model: RemoteModel | None = None
        self._last_push: _Pending | None = None

    def connect_to_server(self, options: Mapping[str, Any] | None = None) -> None:
        """Registers, and starts the heartbeat unless ``{"heart_beat": False}``."""
        options = {"heart_beat": True, **(options or {})}
        self.register()
        if options["heart_beat"]:
            self.start_heartbeat()

    def in_training_progress(self) -> bool:
        """True until the server has sent its final model."""
        return not self.train_end

    def pull_models_from_server(
        self, options: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """The current global model (waits for the next round when this site already contributed).

        Returns:
            variable name to array, after the post-processors, without the variables
            ``exclude_vars`` keeps local (loading the result leaves them as they are);
            ``self.last_model`` keeps the whole model and its meta (round, finished).
        """
        remote = self._receive(self.task_name)
        self.last_model = remote
        self.check_progress({self.task_name: remote})
        return {k: v for k, v in remote.params.items() if not self.model_manager.is_excluded(k)}

    def push_models_to_server(
        self, model_data: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> str:
        """Submits ``model_data`` as this round's Δ, after exclusion, privacy and pre-processors.

        Args:
            model_data: variable name to Δ (already local − global).
            options: ``n_iter`` (the local steps; default: ``train_context``'s
                ``total_steps``, else 1), ``contribution_id`` (default: a fresh one; the id of
                the last push sends that push's bytes again, privacy noise and all, so a
                retried upload is counted once), ``round`` (default: the last pulled model's),
                ``best_validation_metric`` (for BestMetricGenerator).

        Returns:
            the server's comment.

        Raises:
            ModelDiffError: a value is NaN or Inf (nothing is sent).
            FLCommunicationError: the upload failed for good.
        """
        options = dict(options or {})
        task_name = self.task_name
        given_id = str(options.get("contribution_id") or "")
        last = self._last_push
        if given_id and last is not None and last.header.contribution_id == given_id:
            return self.send_contribution(task_name, last)
        if self.token is None:
            self.register()
        rnd = int(options.get("round", self.current_round))
        app_ctx = {**self.app_context, "current_round": rnd}
        fl_ctx = FLContext(best_validation_metric=options.get("best_validation_metric"))
        state = self.communicator.get_client_state(task_name, self.token or "", app_ctx)
        header, data = DataAssembler.get_contribution_data(
            self.model_manager,
            task_name,
            state,
            self.pre_processors,
            fl_ctx,
            app_ctx,
            model_data=model_data,
            n_iter=self._n_iter(options),
        )
        header.contribution_id = given_id or f"{self.client_name}-{uuid.uuid4()}"
        pending = _Pending(round=rnd, header=header, data=data)
        self._last_push = pending
        return self.send_contribution(task_name, pending)

    def _n_iter(self, options: Mapping[str, Any]) -> int:
        given = options.get("n_iter")
        if given is None:
            ctx = self.train_context
            given = ctx.get("total_steps") if isinstance(ctx, Mapping) else None
            if given is None and ctx is not None and not isinstance(ctx, Mapping):
                given = getattr(ctx, "total_steps", None)
        if isinstance(given, bool) or not isinstance(given, Real):
            return 1
        return max(1, int(float(given)))

    def close_connect(self) -> None:
        """Quits the server and stops the heartbeat."""
        self.close()
