"""One round copies no whole model it does not have to: Δ in the received model, views of the
fitter's weights, the server keeping its caller's model as it is, a sent contribution let go as
soon as the next model's header says it was aggregated (bench/round.py measures the memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import serde
from engine.client.communicator import RemoteModel
from engine.client.fed_client import FederatedClient
from engine.client.model_manager import ClientModelManager
from engine.training import build_fitter
from protos import federated_pb2 as pb
from tests.conftest import DictModel, direct_client, endpoint
from tests.engine.test_training import make_mmar, small_config


def _remote(rnd: int = 1, **params: np.ndarray) -> dict[str, RemoteModel]:
    return {"t": RemoteModel(meta=pb.ModelMetaData(task="t", current_round=rnd), params=params)}


def test_the_contribution_computes_delta_in_the_received_model_which_is_still_recognised() -> None:
    rw = DictModel({"w": np.zeros(4, np.float32), "n": np.array([5], np.int64)})
    mm = ClientModelManager(["t"], model_reader_writer=rw)
    received = {"w": np.ones(4, np.float32), "n": np.array([5], np.int64)}
    kept = {k: v.copy() for k, v in received.items()}
    assert mm.assign_current_model(_remote(**received))
    rw.weights["w"] = np.array([2, 3, 4, 5], np.float32)
    rw.weights["n"] = np.array([7], np.int64)
    # the lineage's read is repeatable and leaves the received model as it was
    for _ in range(2):
        np.testing.assert_array_equal(mm.read_current_model("t")["w"], [1, 2, 3, 4])
    np.testing.assert_array_equal(received["w"], 1)
    delta = mm.model_diff("t", "delta_w", consume=True)
    assert delta["w"] is received["w"]  # no model-sized allocation: Δ is in the received arrays
    np.testing.assert_array_equal(delta["w"], [1, 2, 3, 4])
    np.testing.assert_array_equal(delta["n"], [2])
    # the server handing the same model out again (after a restart) is still recognised
    assert mm.is_current_global("t", kept)
    assert not mm.is_current_global("t", {**kept, "w": kept["w"] + 1})
    assert not mm.is_current_global("t", {**kept, "w": kept["w"].astype(np.float64)})
    assert mm.model_vars("t") == ["w", "n"]
    with pytest.raises(RuntimeError, match="already computed in it"):
        mm.model_diff("t", "delta_w", consume=True)
    with pytest.raises(RuntimeError, match="already computed in it"):
        mm.read_current_model("t")
    np.testing.assert_array_equal(mm.model_diff("t", "weights")["w"], [2, 3, 4, 5])
    mm.assign_current_model(_remote(2, **kept))  # the next global model: Δ from it again
    rw.weights["w"] = np.array([1, 1, 1, 3], np.float32)
    np.testing.assert_array_equal(mm.read_current_model("t")["w"], [0, 0, 0, 2])


def test_the_fitter_lends_views_of_its_weights_only_when_asked(tmp_path: Path) -> None:
    fitter = build_fitter(make_mmar(tmp_path / "m", small_config()), site_name="s", device="cpu")
    state = fitter.model.state_dict()
    views = fitter.get_weights(copy=False)
    copies = fitter.get_weights()
    assert list(views) == list(copies) == list(state)
    for name, tensor in state.items():
        assert np.shares_memory(views[name], tensor.numpy())
        assert not np.shares_memory(copies[name], tensor.numpy())
        np.testing.assert_array_equal(views[name], copies[name])

    # Through the model manager: the baseline is the received model itself, Δ is in it, and the
    # model was loaded by copy (training it leaves the received arrays alone).
    mm = ClientModelManager(["t"])
    mm.set_fitter(fitter)
    received = {k: v + np.float32(0.5) for k, v in copies.items()}
    mm.assign_current_model(_remote(**received))
    before = {k: v.copy() for k, v in received.items()}
    fitter.train()
    for name, value in received.items():
        np.testing.assert_array_equal(value, before[name])
    local = fitter.get_weights()
    delta = mm.model_diff("t", "delta_w", consume=True)
    for name in received:
        assert delta[name] is received[name]
        np.testing.assert_allclose(delta[name], local[name] - before[name], atol=1e-6)


def test_a_model_header_is_seen_before_its_payload() -> None:
    model = {"w": np.arange(600_000, dtype=np.float32)}
    header = pb.CurrentModel(meta=pb.ModelMetaData(task="t", current_round=3))
    frames = list(serde.encode_model_stream(header, model))
    assert len(frames) > 3
    taken: list[int] = []
    seen: list[tuple[int, int]] = []

    def feed() -> object:
        for frame in frames:
            taken.append(1)
            yield frame

    def on_header(h: pb.CurrentModel) -> None:
        seen.append((h.meta.current_round, len(taken)))

    _, params = serde.decode_model_stream(feed(), pb.CurrentModel, on_header=on_header)
    assert seen == [(3, 1)]  # called once, when only the header frame had been read
    np.testing.assert_array_equal(params["w"], model["w"])


def test_a_sent_contribution_is_let_go_when_the_next_models_header_arrives(start_server) -> None:
    initial = {"w": np.zeros(1000, np.float32)}
    server = start_server(initial, min_num_clients=1, num_rounds=2)
    rw = DictModel({"w": np.zeros(1000, np.float32)})
    client = FederatedClient("site-a", {}, False, [endpoint(server)], model_reader_writer=rw)
    settled: list[tuple[int, bool]] = []
    settle = client._settle_pending

    def spy(task_name: str, meta: pb.ModelMetaData) -> None:
        settle(task_name, meta)
        settled.append((int(meta.current_round), task_name in client._pending))

    client._settle_pending = spy  # type: ignore[method-assign]
    try:
        client.register()
        client.pull_models()
        assert client.remote_models[client.task_name].params == {}  # held once, by the manager
        rw.weights["w"] = np.full(1000, 2, np.float32)
        client.push_models()
        assert client.task_name in client._pending
        settled.clear()
        client.pull_models()  # round 2's model: round 1 was aggregated
        # the first call is the header's, before any payload: the contribution went there
        assert settled[0] == (1, False)
        np.testing.assert_array_equal(rw.weights["w"], 2)
    finally:
        client.close()


def test_the_server_keeps_the_callers_initial_model_without_a_copy_and_never_writes_it(
    start_server,
) -> None:
    initial = {"w": np.ones(300_000, np.float32), "b": np.zeros(3, np.float32)}
    kept = {k: v.copy() for k, v in initial.items()}
    server = start_server(initial, min_num_clients=1, num_rounds=3)
    for name, value in initial.items():
        assert np.shares_memory(server.global_model[name], value)
    client = direct_client(server, "site-a")
    try:
        for _ in range(3):  # buffers of earlier rounds are recycled: never the caller's
            model = client.pull_models_from_server()
            client.push_models_to_server({k: np.full_like(v, 0.5) for k, v in model.items()})
        assert server.wait_finished(5)
        for name, value in initial.items():
            np.testing.assert_array_equal(value, kept[name])
            np.testing.assert_allclose(server.global_model[name], kept[name] + 1.5)
    finally:
        client.close()
