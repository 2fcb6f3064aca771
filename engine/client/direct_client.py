"""DirectFederatedClient: connect, pull and push driven by the caller's own training loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.client.communicator import RemoteModel
from engine.client.fed_client_base import FederatedClientBase
from engine.client.fl_context import FLContext
from protos import federated_pb2 as pb

__all__ = ["DirectFederatedClient"]


class DirectFederatedClient(FederatedClientBase):
    """A client whose caller owns the training loop (multi-GPU rank 0, tests, scripts).

    Accepts FederatedClientBase's arguments plus ``train_context`` and ``train_options``.
    """

    def __init__(
        self, *args: Any, train_context: Any = None, train_options: Any = None, **kwargs: Any
    ) -> None:
        kwargs.pop("cross_site_validate", None)
        super().__init__(*args, **kwargs)
        self.train_context = train_context
        self.train_options = dict(train_options or {})
        self.last_model: RemoteModel | None = None

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
            variable name to array; ``self.last_model`` keeps the meta (round, finished).
        """
        remote = self.fetch_remote_model(self.task_name)
        self.last_model = remote
        self.check_progress({self.task_name: remote})
        return remote.params

    def push_models_to_server(
        self, model_data: Mapping[str, np.ndarray], options: Mapping[str, Any] | None = None
    ) -> str:
        """Submits ``model_data`` as this round's Δ.

        Args:
            model_data: variable name to Δ (already local − global).
            options: ``n_iter`` (default 1), ``contribution_id`` (default: a fresh one; pass the
                same id to retry an upload), ``round`` (default: the last pulled model's).

        Returns:
            the server's comment.
        """
        options = dict(options or {})
        rnd = int(options.get("round", self.current_round))

        def submit(token: str) -> str:
            state = self.communicator.get_client_state(
                self.task_name, token, {"current_round": rnd}
            )
            header = pb.Contribution(
                client=state,
                type="delta_w",
                n_iter=int(options.get("n_iter", 1)),
                contribution_id=str(options.get("contribution_id", "")),
            )
            fl_ctx = FLContext(contribution=header, model_data=dict(model_data))
            reply = self.communicator.submitUpdate(
                self.servers, self.task_name, token, fl_ctx, self.app_context, self.client_name
            )
            return reply.comment

        return str(self._with_token(submit))

    def close_connect(self) -> None:
        """Quits the server and stops the heartbeat."""
        self.close()
