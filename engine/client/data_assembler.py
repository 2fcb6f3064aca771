"""DataAssembler: builds the messages a site sends (contribution, best local model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.client.data_processors import DataContext
from engine.client.fl_context import FLContext
from engine.client.model_manager import ClientModelManager
from protos import federated_pb2 as pb

__all__ = ["DataAssembler"]


class DataAssembler:
    """Assembles outgoing model messages from the model manager and the processors."""

    @staticmethod
    def get_contribution_data(
        model_manager: ClientModelManager,
        task_name: str,
        client_state: pb.ClientState,
        pre_processors: list[Any],
        fl_ctx: FLContext,
        app_ctx: dict[str, Any],
        *,
        model_data: Mapping[str, Any] | None = None,
        n_iter: int | None = None,
    ) -> tuple[pb.Contribution, dict[str, np.ndarray]]:
        """This round's contribution: Δ (after privacy), then the pre-processors, in order.

        ``n_iter`` is always set (IteratorNumberGenerator sets it too); a contribution with a
        wrong weight would skew the federation's average.

        Args:
            model_manager: reads Δ = local − global and applies exclusion and privacy.
            task_name: the server's task.
            client_state: the ClientState the contribution carries.
            pre_processors: DataProcessors, run in order on the DataContext.
            fl_ctx: the step's context ("n_iter" is set in it).
            app_ctx: what the processors see.
            model_data: a Δ the caller computed (DirectFederatedClient): it goes through the
                same exclusion, checks and privacy instead of the model manager's own Δ.
            n_iter: the local iterations behind ``model_data`` (default: the model
                manager's ``num_local_iterations()``).

        Returns:
            the Contribution header and the tensors to send.
        """
        if model_data is None:
            # Δ, then what may leave (NaN/Inf refused, privacy), then the pre-processors below
            n_iter = model_manager.num_local_iterations()
            # Δ in the received global model's own memory: this round's contribution is the
            # one use of it (no model-sized allocation; privacy then makes what is sent).
            model = model_manager.outgoing(
                model_manager.model_diff(task_name, "delta_w", consume=True), "delta_w", n_iter
            )
        else:
            if n_iter is None:
                n_iter = model_manager.num_local_iterations()
            n_iter = max(1, int(n_iter))
            model = model_manager.prepare_model_data(model_data, "delta_w", total_steps=n_iter)
        header = pb.Contribution(client=client_state, type="delta_w", n_iter=n_iter)
        fl_ctx.set_prop("n_iter", header.n_iter)
        data_ctx = DataContext(model=model, header=header, fl_ctx=fl_ctx)
        for processor in pre_processors:
            processor.process(data_ctx, app_ctx)
        return header, data_ctx.model

    @staticmethod
    def get_best_local_model(
        model_manager: ClientModelManager,
        task_name: str,
        client_state: pb.ClientState,
        disable: bool = False,
    ) -> tuple[pb.Contribution, dict[str, np.ndarray]]:
        """The best local model as a "weights" message (empty when ``disable``)."""
        best = None if disable else model_manager.get_best_model()
        header = pb.Contribution(client=client_state, type="weights", n_iter=1)
        return header, dict(best or {})
