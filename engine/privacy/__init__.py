"""Differential-privacy protocols applied to a site's model difference before it is shared."""

from __future__ import annotations

from engine.privacy._checks import NonFiniteDiffError, PrivacyArgumentError
from engine.privacy.base import PRIVACY_PROTOCOLS, PrivacyProtocol, build_privacy
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
