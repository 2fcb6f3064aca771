"""A connection cut in the middle of a model download or upload: retried, byte-identical.

A real server on loopback; the site reaches it only through the fault proxy, which breaks the
connection after a given number of model bytes (FIN or RST).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from engine.client import DirectFederatedClient
from engine.config import ServerEndpoint
from engine.events import ConnectionChanged, ModelTransferred
from engine.server import FederatedServer
from tests.conftest import TASK, Recorder
from tests.faults.proxy import FaultProxy

MODEL_BYTES = 3 << 20  # three 1 MiB chunks and more: the cut falls inside the stream


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal(MODEL_BYTES // 4).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float64),
        "steps": np.array(10 + seed, dtype=np.int64),
    }


def _same_bytes(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), f"{name} differs after the retry"


Setup = tuple[FederatedServer, FaultProxy, DirectFederatedClient, Recorder]


@pytest.fixture
def proxied(start_server: Callable[..., FederatedServer]) -> Iterator[Callable[..., Setup]]:
    made: list[tuple[FaultProxy, DirectFederatedClient]] = []

    def make(**config: object) -> Setup:
        server = start_server(_model(0), **config)
        proxy = FaultProxy(server.port)
        client = DirectFederatedClient(
            "site-a",
            {},
            False,
            [ServerEndpoint(name=TASK, target=f"127.0.0.1:{proxy.port}")],
            retry_timeout=20,
        )
        recorder = Recorder(client.bus)
        client.connect_to_server({"heart_beat": False})
        made.append((proxy, client))
        return server, proxy, client, recorder

    yield make
    for proxy, client in made:
        client.communicator.close()
        proxy.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_download_cut_midway_is_retried_and_arrives_byte_identical(proxied, how: str) -> None:
    server, proxy, client, recorder = proxied(min_num_clients=1, num_rounds=2)
    cut = proxy.cut_after("down", MODEL_BYTES // 2, how=how)
    got = client.pull_models_from_server()
    assert cut.is_set(), "the proxy never cut the download: the test did not test anything"
    _same_bytes(got, server.global_model)
    retrying = [e for e in recorder.of(ConnectionChanged) if e.state == "retrying"]
    assert retrying and "GetModel" in retrying[0].detail, recorder.of(ConnectionChanged)
    assert proxy.accepted >= 2, "the retry should have needed a new connection"
    # only the complete download is reported
    downloads = [e for e in recorder.of(ModelTransferred) if e.direction == "download"]
    assert len(downloads) == 1 and downloads[0].nbytes >= MODEL_BYTES


@pytest.mark.parametrize("how", ["close", "reset"])
def test_upload_cut_midway_is_retried_counted_once_and_arrives_byte_identical(
    proxied, how: str
) -> None:
    server, proxy, client, recorder = proxied(min_num_clients=1, num_rounds=1)
    init = {k: v.copy() for k, v in client.pull_models_from_server().items()}
    delta = _model(1)
    delta["steps"] = np.array(3, dtype=np.int64)
    cut = proxy.cut_after("up", MODEL_BYTES // 2, how=how)
    comment = client.push_models_to_server(delta, {"n_iter": 1, "contribution_id": "a-round-1"})
    assert cut.is_set(), "the proxy never cut the upload: the test did not test anything"
    assert "Received contribution" in comment, comment
    retrying = [e for e in recorder.of(ConnectionChanged) if e.state == "retrying"]
    assert retrying and "SubmitUpdate" in retrying[0].detail, recorder.of(ConnectionChanged)
    # Counted once: one site, weight 1, so the new global model is exactly init + Δ; an upload
    # that arrived altered (or twice) would show in every byte.
    assert server.finished
    assert server.history[-1]["contributions"] == {"site-a": "a-round-1"}
    _same_bytes(server.global_model, {k: init[k] + delta[k] for k in init})
