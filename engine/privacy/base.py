"""PrivacyProtocol: the hook the client engine calls on Δ before it leaves the site."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["PrivacyProtocol"]


class PrivacyProtocol(ABC):
    """Turns a model difference into what may be shared.

    The lineage's call is ``apply(model_diff, train_ctx)``, and a protocol written for it (a
    BYO protocol under ``custom/``) is called just so. A protocol whose ``apply`` also takes a
    keyword ``in_place`` (the built-ins: ``apply(model_diff, train_ctx, *, in_place=False)``)
    may be asked to write its result into ``model_diff``'s arrays: the model manager does so
    when Δ is memory of its own, so that no second model-sized Δ is allocated. In place, the
    result must be the one the protocol gives out of place (for the same random state).
    """

    @abstractmethod
    def apply(self, model_diff: dict[str, Any], train_ctx: Any = None) -> dict[str, Any]:
        """Computes the model data to be uploaded to the server.

        Args:
            model_diff: Δ = local − global, variable name to array.
            train_ctx: the training context (``total_steps`` is read from it where needed);
                None, as the lineage allows, means one local step.

        Returns:
            variable name to array, the same names as ``model_diff``.
        """
