"""The site's federated-learning client, after Clara Train 3.1's ``fed_learn.client``.

Names load on first use: a console that only needs ``ClientStatus`` does not pay for gRPC,
protobuf and numpy before its first frame.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClientModelManager",
    "ClientStatus",
    "Communicator",
    "DataAssembler",
    "DirectFederatedClient",
    "FLCommunicationError",
    "FederatedClient",
    "FederatedClientBase",
    "RemoteModel",
    "TestFederatedClient",
    "get_status_message",
]

_WHERE = {
    "ClientModelManager": "model_manager",
    "ClientStatus": "engine.status",
    "Communicator": "communicator",
    "DataAssembler": "data_assembler",
    "DirectFederatedClient": "direct_client",
    "FLCommunicationError": "communicator",
    "FederatedClient": "fed_client",
    "FederatedClientBase": "fed_client_base",
    "RemoteModel": "fl_context",
    "TestFederatedClient": "fed_client",
    "get_status_message": "engine.status",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    full = module if module.startswith("engine.") else f"engine.client.{module}"
    return getattr(importlib.import_module(full), name)
