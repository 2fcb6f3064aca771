"""Differential-privacy protocols applied to a site's model difference before it is shared."""

from __future__ import annotations

from pathlib import Path

from engine import clara_compat
from engine.components import build_component
from engine.config import ComponentSpec
from engine.privacy._checks import NonFiniteDiffError, PrivacyArgumentError
from engine.privacy.base import PrivacyProtocol
from engine.privacy.laplacian import LaplacianProtocol
from engine.privacy.percentile import PercentileProtocol
from engine.privacy.svt import SVTProtocol

__all__ = [
    "PRIVACY_PROTOCOLS",
    "LaplacianProtocol",
    "NonFiniteDiffError",
    "PercentileProtocol",
    "PrivacyArgumentError",
    "PrivacyProtocol",
    "SVTProtocol",
    "build_privacy",
]

#: Built-in protocols, by the name an MMAR's ``privacy`` block gives.
PRIVACY_PROTOCOLS: dict[str, type[PrivacyProtocol]] = {
    "PercentileProtocol": PercentileProtocol,
    "SVTProtocol": SVTProtocol,
    "LaplacianProtocol": LaplacianProtocol,
}


def build_privacy(
    spec: ComponentSpec | None, search_paths: list[Path] | None = None
) -> PrivacyProtocol | None:
    """The protocol an MMAR's ``privacy`` block names; None for ``{}``.

    A protocol written for Clara (``from fed_learn.client.fed_privacy import PrivacyProtocol``)
    loads unchanged: Clara's module paths are made to mean ours first (``engine.clara_compat``).
    """
    if spec is None:
        return None
    clara_compat.install()
    return build_component(
        spec, PRIVACY_PROTOCOLS, "privacy protocol", PrivacyProtocol, search_paths
    )
