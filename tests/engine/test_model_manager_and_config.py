"""Model manager (Δ, exclude_vars, NaN refusal), config errors, events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.client.communicator import RemoteModel
from engine.client.model_manager import ClientModelManager, ModelDiffError
from engine.config import ConfigError, load_client_kit, load_server_config
from engine.events import EventBus, RoundCompleted, event_from_dict
from protos import federated_pb2 as pb
from tests.conftest import DictModel


def _manager(exclude: str | None = None) -> tuple[ClientModelManager, DictModel]:
    rw = DictModel({"w": np.zeros(3, np.float32), "head": np.full(2, 9, np.float32)})
    return ClientModelManager(["t"], exclude_vars=exclude, model_reader_writer=rw), rw


def _remote(**params: np.ndarray) -> dict[str, RemoteModel]:
    return {"t": RemoteModel(meta=pb.ModelMetaData(task="t", current_round=1), params=params)}


def test_delta_is_local_minus_global_over_shared_variables() -> None:
    mm, rw = _manager(exclude="^head$")
    changed = mm.assign_current_model(
        _remote(w=np.ones(3, np.float32), head=np.zeros(2, np.float32))
    )
    assert changed
    np.testing.assert_array_equal(rw.weights["head"], 9)  # excluded: stays local
    assert mm.model_vars("t") == ["w"] and mm.model_meta("t").current_round == 1
    rw.weights["w"] = np.array([2, 3, 4], np.float32)
    delta = mm.read_current_model("t")
    assert list(delta) == ["w"]
    np.testing.assert_array_equal(delta["w"], [1, 2, 3])
    assert delta["w"].dtype == np.float32


def test_a_global_variable_with_another_shape_is_refused_and_nothing_changes() -> None:
    mm, rw = _manager()
    with pytest.raises(ValueError, match=r"'w': global shape \(4,\) differs from local \(3,\)"):
        mm.assign_current_model(_remote(w=np.ones(4, np.float32), head=np.ones(2, np.float32)))
    np.testing.assert_array_equal(rw.weights["head"], 9)


def test_nan_in_the_update_is_refused_by_name() -> None:
    mm, rw = _manager()
    mm.assign_current_model(_remote(w=np.ones(3, np.float32), head=np.ones(2, np.float32)))
    rw.weights["head"] = np.array([1, np.inf], np.float32)
    with pytest.raises(ModelDiffError, match=r"'head'.*NaN or Inf"):
        mm.read_current_model("t")


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({}, r"client.client_name: is required"),
        ({"client_name": "a b"}, r"client.client_name: expected letters"),
        (
            {"client_name": "s", "retry_timeout": "30"},
            r"client.retry_timeout: expected int or float",
        ),
        (
            {"client_name": "s", "retry_timeout": True},
            r"client.retry_timeout: expected int or float",
        ),
        ({"client_name": "s", "compression": "zip"}, r"client.compression: expected one of Gzip"),
    ],
)
def test_startup_kit_errors_name_file_and_key(tmp_path: Path, client: dict, message: str) -> None:
    path = _write(
        tmp_path / "fed_client.json",
        {"servers": [{"name": "t", "service": {"target": "h:1"}}], "client": client},
    )
    with pytest.raises(ConfigError, match=f"fed_client.json: {message}"):
        load_client_kit(path)


def test_startup_kit_target_and_json_errors(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "k.json",
        {
            "servers": [{"name": "t", "service": {"target": "nohost"}}],
            "client": {"client_name": "s"},
        },
    )
    with pytest.raises(ConfigError, match=r"servers\[0\].service.target: expected \"host:port\""):
        load_client_kit(path)
    with pytest.raises(ConfigError, match=r"k.json: not valid JSON \(line 1"):
        load_client_kit(_write(path, "{oops"))


def test_server_config_reads_clara_keys_and_checks_ranges(tmp_path: Path) -> None:
    cfg = {
        "servers": [
            {
                "name": "t",
                "service": {"target": "0.0.0.0:8002"},
                "min_num_clients": 2,
                "max_num_clients": 5,
                "num_rounds": 7,
                "start_round": 1,
                "heart_beat_timeout": 300,
                "wait_after_min_clients": 10,
            }
        ],
        "aggregator": {
            "name": "ModelAggregator",
            "args": {"exclude_vars": "bn", "aggregation_weights": {"a": 2}},
        },
    }
    c = load_server_config(_write(tmp_path / "s.json", cfg))
    assert (c.min_num_clients, c.max_num_clients, c.num_rounds, c.start_round) == (2, 5, 7, 1)
    assert c.exclude_vars == "bn" and c.aggregation_weights == {"a": 2.0}
    cfg["servers"][0]["max_num_clients"] = 1
    with pytest.raises(
        ConfigError, match=r"servers\[0\].max_num_clients: expected >= min_num_clients"
    ):
        load_server_config(_write(tmp_path / "s.json", cfg))
    cfg["servers"][0]["max_num_clients"] = 5
    cfg["aggregator"]["args"]["aggregation_weights"] = {"a": -1}
    with pytest.raises(
        ConfigError, match=r"aggregator.args.aggregation_weights.a: expected a number >= 0"
    ):
        load_server_config(_write(tmp_path / "s.json", cfg))


def test_events_round_trip_through_json_and_a_broken_subscriber_does_not_stop_others() -> None:
    event = RoundCompleted(site="site-1", round=2, num_rounds=5, metrics={"accuracy": 0.5})
    again = event_from_dict(json.loads(json.dumps(event.to_dict())))
    assert again == event
    with pytest.raises(ValueError, match="unknown event"):
        event_from_dict({"event": "Nope"})
    bus = EventBus()
    got = []

    def broken(e: object) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(got.append)
    bus.publish(event)
    assert got == [event]
    unsubscribe()
    bus.publish(event)
    assert got == [event]


def test_integer_delta_wraps_in_its_dtype_and_bool_stays_local() -> None:
    rw = DictModel({"count": np.array([5], np.uint8), "mask": np.array([True])})
    mm = ClientModelManager(["t"], model_reader_writer=rw)
    mm.assign_current_model(_remote(count=np.array([5], np.uint8), mask=np.array([True])))
    rw.weights["count"] = np.array([3], np.uint8)
    delta = mm.read_current_model("t")
    assert list(delta) == ["count"]
    assert delta["count"].dtype == np.uint8 and delta["count"].view(np.int8)[0] == -2


def test_nan_and_infinity_in_config_are_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "fed_client.json",
        '{"servers": [{"name": "t", "service": {"target": "h:1"}}],'
        ' "client": {"client_name": "s", "retry_timeout": Infinity}}',
    )
    with pytest.raises(ConfigError, match="Infinity is not a number JSON allows"):
        load_client_kit(path)
