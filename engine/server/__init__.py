"""The reference FL server: the client's real counterpart for the demo, tests and small sites."""

from __future__ import annotations

from engine.server.fed_server import FederatedServer

__all__ = ["FederatedServer"]
