"""Shared fixtures: a real reference server on a loopback port, and clients that talk to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.client import DirectFederatedClient
from engine.config import ServerConfig, ServerEndpoint
from engine.events import Event, EventBus
from engine.server import FederatedServer

TASK = "test_federation"


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., FederatedServer]]:
    """Starts FederatedServers on 127.0.0.1:<free port>; all are stopped after the test."""
    servers: list[FederatedServer] = []

    def start(initial_model: dict[str, np.ndarray], **config: Any) -> FederatedServer:
        long_poll = config.pop("long_poll", 0.5)
        cfg = ServerConfig(task_name=TASK, target="127.0.0.1:0", **config)
        server = FederatedServer(
            cfg, tmp_path / f"server{len(servers)}", initial_model, long_poll=long_poll
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def endpoint(server: FederatedServer) -> ServerEndpoint:
    return ServerEndpoint(name=TASK, target=f"127.0.0.1:{server.port}")


def direct_client(server: FederatedServer, name: str, **kwargs: Any) -> DirectFederatedClient:
    """A DirectFederatedClient registered with ``server`` (no heartbeat thread)."""
    kwargs.setdefault("retry_timeout", 5)
    client = DirectFederatedClient(
        name, kwargs.pop("client_args", {}), False, [endpoint(server)], **kwargs
    )
    client.connect_to_server({"heart_beat": False})
    return client


class DictModel:
    """A model reader/writer over a dict of arrays (what a fitter does for the model manager)."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, new: dict[str, np.ndarray]) -> None:
        self.weights.update({k: np.array(v) for k, v in new.items()})


class Recorder:
    """Collects the events of a bus."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.subscribe(self.events.append)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
