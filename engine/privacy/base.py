"""PrivacyProtocol: the hook the client engine calls on Δ before it leaves the site."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from engine.components import build_component
from engine.config import ComponentSpec

__all__ = ["PRIVACY_PROTOCOLS", "PrivacyProtocol", "build_privacy"]


class PrivacyProtocol(ABC):
    """Turns a model difference into what may be shared."""

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


# Built-in protocols, by the name an MMAR's ``privacy`` block gives; filled in at the end of this
# module, since they subclass PrivacyProtocol.
PRIVACY_PROTOCOLS: dict[str, type[PrivacyProtocol]] = {}


def build_privacy(
    spec: ComponentSpec | None, search_paths: list[Path] | None = None
) -> PrivacyProtocol | None:
    """The protocol an MMAR's ``privacy`` block names; None for ``{}``.

    A protocol written for Clara (``from fed_learn.client.fed_privacy import PrivacyProtocol``)
    loads unchanged: Clara's module paths are made to mean ours first (``engine.clara_compat``).
    """
    if spec is None:
        return None
    from engine import clara_compat

    clara_compat.install()
    return build_component(
        spec, PRIVACY_PROTOCOLS, "privacy protocol", PrivacyProtocol, search_paths
    )


from engine.privacy.laplacian import LaplacianProtocol  # noqa: E402
from engine.privacy.percentile import PercentileProtocol  # noqa: E402
from engine.privacy.svt import SVTProtocol  # noqa: E402

PRIVACY_PROTOCOLS.update(
    {
        "PercentileProtocol": PercentileProtocol,
        "SVTProtocol": SVTProtocol,
        "LaplacianProtocol": LaplacianProtocol,
    }
)
