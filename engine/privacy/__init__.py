"""Differential-privacy protocols applied to a site's model difference before it is shared."""

from __future__ import annotations

from engine.privacy.base import PRIVACY_PROTOCOLS, PrivacyProtocol, build_privacy

__all__ = ["PRIVACY_PROTOCOLS", "PrivacyProtocol", "build_privacy"]
