"""The site's federated-learning client, after Clara Train 3.1's ``fed_learn.client``."""

from __future__ import annotations

from engine.client.communicator import Communicator, FLCommunicationError, RemoteModel
from engine.client.data_assembler import DataAssembler
from engine.client.direct_client import DirectFederatedClient
from engine.client.fed_client import FederatedClient, TestFederatedClient
from engine.client.fed_client_base import FederatedClientBase
from engine.client.model_manager import ClientModelManager
from engine.client.status import ClientStatus

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
]
