"""DataAssembler: builds the messages a site sends (contribution, best local model)."""

from __future__ import annotations

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
    ) -> tuple[pb.Contribution, dict[str, np.ndarray]]:
        """This round's contribution: Δ (after privacy), then the pre-processors, in order.

        ``n_iter`` is always set from the model manager (IteratorNumberGenerator sets it too);
        a contribution with a wrong weight would skew the federation's average.
        """
        model = model_manager.read_current_model(task_name, type_str="delta_w")
        header = pb.Contribution(
            client=client_state, type="delta_w", n_iter=model_manager.num_local_iterations()
        )
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
