"""One site must not poison the federation: NaN, Inf, overflow and lying n_iter, over loopback.

Each federation test runs the real server, one honest site (the demo MMAR's fitter in a
SiteEngine, training for real) and a malicious site: registered as any site is, it sends its
upload as raw frames on the wire, past the checks an honest client makes before sending.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from engine import serde
from engine.client import DirectFederatedClient
from engine.config import (
    DEFAULT_MAX_N_ITER,
    ConfigError,
    ServerConfig,
    ServerEndpoint,
    load_server_config,
)
from engine.demo import _set_port, prepare_workspace
from engine.events import ContributionRefused, ContributionResent, EventBus, ServerRoundRetaken
from engine.fileio import load_npz
from engine.rpc import FederatedStub
from engine.server import FederatedServer
from engine.server.aggregator import FedAvgAccumulator
from engine.site.paths import SitePaths
from engine.site.site_engine import SiteEngine
from protos import federated_pb2 as pb
from tests.conftest import Recorder, direct_client

TASK = "demo_federation"
HONEST, BAD = "site-1", "site-2"
F32_MAX = float(np.finfo(np.float32).max)


def send_raw(
    server: FederatedServer,
    site: DirectFederatedClient,
    delta: dict[str, np.ndarray],
    n_iter: int,
    cid: str,
) -> str:
    """Uploads ``delta`` as a hostile site would: the wire format only, nothing checked.

    Raises:
        grpc.RpcError: the server's refusal.
    """
    header = pb.Contribution(
        client=pb.ClientState(
            client_name=site.client_name,
            token=site.token or "",
            meta=pb.ModelMetaData(task=server.config.task_name, current_round=server.current_round),
        ),
        n_iter=n_iter,
        type="delta_w",
        contribution_id=cid,
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = FederatedStub(channel).SubmitUpdate(serde.encode_model_stream(header, delta))
    return str(reply.comment)


class Federation:
    """A real server, an honest SiteEngine and the means to add malicious sites."""

    def __init__(self, root: Path, rounds: int = 2, **config: Any) -> None:
        prepare_workspace(root, num_sites=1, num_rounds=rounds, heartbeat_interval=0.5)
        self.initial = load_npz(root / "server" / "models" / "initial_model.npz")
        self.bus = EventBus()
        self.events = Recorder(self.bus)
        self.config = ServerConfig(
            task_name=TASK,
            target="127.0.0.1:0",
            min_num_clients=1,
            num_rounds=rounds,
            wait_after_min_clients=5,
            **config,
        )
        self.root = root
        self.server: FederatedServer | None = None
        self.outcome = ""
        self.engine: SiteEngine | None = None
        self._thread: threading.Thread | None = None

    def start(self, initial: dict[str, np.ndarray] | None = None, **site: Any) -> None:
        self.server = FederatedServer(
            self.config, self.root / "server", initial or self.initial, self.bus, long_poll=0.5
        )
        port = self.server.start()
        paths = SitePaths(self.root / HONEST)
        _set_port(paths.kit, port)
        cfg_path = paths.mmar(1, HONEST) / "config" / "config_fed_client.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["client"].update({"steps_aggregation": 5, "cross_site_validate": False, **site})
        cfg_path.write_text(json.dumps(cfg))

    def malicious(self, name: str = BAD) -> DirectFederatedClient:
        assert self.server is not None
        client = DirectFederatedClient(
            name,
            {},
            False,
            [ServerEndpoint(name=TASK, target=f"127.0.0.1:{self.server.port}")],
            retry_timeout=5,
        )
        client.connect_to_server({"heart_beat": False})
        return client

    def run_honest(self) -> None:
        """Starts the honest site and returns once the server knows it (it is training)."""
        assert self.server is not None
        engine = self.engine = SiteEngine(self.root / HONEST, self.bus)

        def run() -> None:
            self.outcome = engine.run()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while HONEST not in self.server.sites and time.monotonic() < deadline:
            time.sleep(0.01)
        assert HONEST in self.server.sites

    def join(self, timeout: float = 60) -> None:
        assert self._thread is not None
        self._thread.join(timeout=timeout)

    def close(self) -> None:
        """Stops the honest site (a test that failed may leave it waiting), then the server."""
        if self.engine is not None and self._thread is not None and self._thread.is_alive():
            self.engine.abort()
            self.join(timeout=10)
            if self.engine.client is not None:
                self.engine.client.close()
        if self.server is not None:
            self.server.stop(grace=0)

    def saved_model(self) -> dict[str, np.ndarray]:
        return load_npz(self.root / "server" / "models" / "global_model.npz")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(**config: Any) -> Federation:
        made.append(Federation(tmp_path, **config))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def _poisoned(initial: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """A Δ for the demo model: small honest-looking changes, and the poison in one variable."""
    delta = {k: np.full(v.shape, 1e-3, v.dtype) for k, v in initial.items()}
    w = delta["net.0.weight"]
    if how == "nan":
        w.flat[7] = np.nan
    elif how == "inf":
        w.flat[7] = -np.inf
    elif how == "overflow":
        w[...] = np.float32(3e38)  # finite; 3e38 · n_iter is Inf in float32
    return delta


@pytest.mark.parametrize(
    ("how", "n_iter", "refusal"),
    [
        ("nan", 10, r"site-2 to round 1: variable 'net\.0\.weight' holds NaN \(1 of 4096 values\)"),
        ("inf", 10, r"site-2 to round 1: variable 'net\.0\.weight' holds Inf \(1 of 4096 values\)"),
        ("overflow", 10**12, r"site-2 to round 1: n_iter 1000000000000 is above max_n_iter"),
        ("huge_n_iter", DEFAULT_MAX_N_ITER + 1, r"n_iter 1000001 is above max_n_iter 1000000"),
    ],
)
def test_a_poisoned_contribution_is_refused_and_the_honest_site_finishes(
    federation: Callable[..., Federation], how: str, n_iter: int, refusal: str
) -> None:
    fed = federation(rounds=2)
    fed.start()
    bad = fed.malicious()
    bad.pull_models_from_server()
    fed.run_honest()
    assert fed.server is not None
    # sent while the honest site trains round 1: before this change it went into the average
    with pytest.raises(grpc.RpcError) as refused:
        send_raw(fed.server, bad, _poisoned(fed.initial, how), n_iter, "bad-1")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert re.search(refusal, details), details
    bad.close_connect()  # a site refused stops (as a SiteEngine does); the rounds go on
    fed.join()
    assert fed.server is not None
    assert fed.outcome == "completed"  # not "training loss is nan" in round 2
    assert fed.server.finished
    assert [h["contributors"] for h in fed.server.history] == [[HONEST], [HONEST]]
    assert list(fed.server.history[0]["refused"]) == [BAD]
    # the server says it in its events (and its log) too, with the same words
    [event] = fed.events.of(ContributionRefused)
    assert (event.site_name, event.round) == (BAD, 1)
    assert event.reason in details
    saved = fed.saved_model()
    assert all(np.isfinite(v).all() for v in saved.values())
    for name, value in fed.server.global_model.items():
        np.testing.assert_array_equal(saved[name], value)


def test_an_average_that_overflows_is_never_saved_and_the_round_is_taken_again(
    federation: Callable[..., Federation],
) -> None:
    """Two sites whose models sit at float32's edge: each is finite, their average is Inf.

    The round's average is neither saved nor sent; the round is taken again without them. The
    honest site (which keeps that variable local) sends its contribution again by itself; a
    fourth site, sending raw frames, does it by hand, and holds the round open meanwhile.
    """
    fed = federation(rounds=2)
    var = "net.4.bias"
    initial = dict(fed.initial)
    # values found by search: (c + Δ) is finite in float32 for each site, their mean + c is not
    initial[var] = np.full(initial[var].shape, 2.0526198e37, np.float32)
    edge = np.full(initial[var].shape, 3.1975614e38, np.float32)
    fed.start(initial, exclude_vars=r"^net\.4\.bias$")  # the honest site never sees that var
    a, b, d = fed.malicious("site-2"), fed.malicious("site-3"), fed.malicious("site-4")
    for site in (a, b, d):
        site.pull_models_from_server()
    fed.run_honest()
    assert fed.server is not None
    send_raw(fed.server, a, {var: edge}, 61, "a-1")
    send_raw(fed.server, b, {var: edge}, 35, "b-1")
    small = {"net.0.bias": np.full(initial["net.0.bias"].shape, 1e-3, np.float32)}
    send_raw(fed.server, d, small, 1, "d-1")
    deadline = time.monotonic() + 30
    while not fed.events.of(ServerRoundRetaken) and time.monotonic() < deadline:
        time.sleep(0.02)
    [retaken] = fed.events.of(ServerRoundRetaken)
    assert (retaken.round, retaken.variables, retaken.excluded) == (1, [var], ["site-2", "site-3"])
    # nothing was saved: no model of round 1 on disk, and round 1 is open again
    assert fed.server.current_round == 0 and not fed.server.history
    assert not (fed.root / "server" / "models" / "global_model.npz").exists()
    # a contribution left out stays out when it comes again (the round waits for site-4)
    with pytest.raises(grpc.RpcError, match=r"site-2 to round 1: its model reaches"):
        send_raw(fed.server, a, {var: edge}, 61, "a-1")
    assert "Received" in send_raw(fed.server, d, small, 1, "d-1")  # counted this time
    for site in (a, b, d):
        site.close_connect()
    fed.join()
    assert fed.outcome == "completed"
    # the honest site's contribution was counted once, after it sent it again by itself
    assert [(e.site, e.round) for e in fed.events.of(ContributionResent)] == [(HONEST, 1)]
    assert [h["contributors"] for h in fed.server.history] == [[HONEST, "site-4"], [HONEST]]
    assert sorted(fed.server.history[0]["refused"]) == ["site-2", "site-3"]
    saved = fed.saved_model()
    assert all(np.isfinite(v).all() for v in saved.values())
    np.testing.assert_array_equal(saved[var], initial[var])  # nobody else sent it


# ---------------------------------------------------------------- the server alone, direct clients


def test_a_huge_weight_cannot_overflow_the_average(start_server: Callable[..., Any]) -> None:
    """Where the config allows n_iter 1e12, 3e38 · 1e12 must not reach the model as Inf."""
    server = start_server({"w": np.zeros(4, np.float32)}, min_num_clients=2, max_n_iter=10**12)
    big, small = direct_client(server, "site-a"), direct_client(server, "site-b")
    big.pull_models_from_server(), small.pull_models_from_server()
    big.push_models_to_server({"w": np.full(4, 3e38, np.float32)}, {"n_iter": 10**12})
    small.push_models_to_server({"w": np.ones(4, np.float32)}, {"n_iter": 1})
    assert server.current_round == 1
    np.testing.assert_allclose(server.global_model["w"], 3e38, rtol=1e-6)


def test_a_finite_delta_that_overflows_the_model_is_refused(
    start_server: Callable[..., Any],
) -> None:
    server = start_server({"w": np.full(3, 2e38, np.float32)}, min_num_clients=1)
    a = direct_client(server, "site-a")
    a.pull_models_from_server()
    with pytest.raises(
        grpc.RpcError, match=r"'w' holds Inf in the site's model: finite, but global \+ Δ"
    ):
        send_raw(server, a, {"w": np.full(3, 3e38, np.float32)}, 1, "a-1")
    assert server.current_round == 0 and list(server._round.refused) == ["site-a"]


@pytest.mark.parametrize("n_iter", [0, -5])
def test_a_non_positive_n_iter_is_refused(start_server: Callable[..., Any], n_iter: int) -> None:
    server = start_server({"w": np.zeros(2, np.float32)})
    a = direct_client(server, "site-a")
    a.pull_models_from_server()
    with pytest.raises(grpc.RpcError, match=f"n_iter must be >= 1, got {n_iter}"):
        send_raw(server, a, {"w": np.ones(2, np.float32)}, n_iter, "a-1")


def test_a_site_refused_may_still_send_a_good_contribution(
    start_server: Callable[..., Any],
) -> None:
    server = start_server({"w": np.zeros(2, np.float32)}, min_num_clients=1)
    a = direct_client(server, "site-a")
    a.pull_models_from_server()
    with pytest.raises(grpc.RpcError, match="NaN"):
        send_raw(server, a, {"w": np.array([np.nan, 1], np.float32)}, 1, "a-1")
    a.push_models_to_server({"w": np.ones(2, np.float32)})
    assert server.history[0]["contributors"] == ["site-a"] and "refused" not in server.history[0]
    np.testing.assert_array_equal(server.global_model["w"], 1)


def test_equal_weights_ignore_n_iter(start_server: Callable[..., Any]) -> None:
    server = start_server(
        {"w": np.zeros(1, np.float64)},
        min_num_clients=2,
        weigh_by_local_iter=False,
        aggregation_weights={"site-b": 3.0},
    )
    a, b = direct_client(server, "site-a"), direct_client(server, "site-b")
    a.pull_models_from_server(), b.pull_models_from_server()
    a.push_models_to_server({"w": np.array([4.0])}, {"n_iter": 1000})
    b.push_models_to_server({"w": np.array([8.0])}, {"n_iter": 1})
    # (4·1 + 8·3) / 4: n_iter plays no part, aggregation_weights still do
    np.testing.assert_allclose(server.global_model["w"], [7.0])


# ---------------------------------------------------------------- config


def _server_config(folder: Path, **agg_args: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config_fed_server.json"
    data = {
        "servers": [{"name": TASK, "service": {"target": "127.0.0.1:0"}, "secure_train": False}],
        "aggregator": {"name": "ModelAggregator", "args": agg_args},
    }
    path.write_text(json.dumps(data))
    return path


def test_config_chooses_equal_weights_and_max_n_iter(tmp_path: Path) -> None:
    c = load_server_config(_server_config(tmp_path, weigh_by_local_iter=False, max_n_iter=50))
    assert (c.weigh_by_local_iter, c.max_n_iter) == (False, 50)
    assert "aggregator.args.max_n_iter" in c.max_n_iter_source
    c = load_server_config(_server_config(tmp_path / "plain"))
    assert (c.weigh_by_local_iter, c.max_n_iter) == (True, DEFAULT_MAX_N_ITER)
    assert "local_epochs" in c.max_n_iter_source


def test_max_n_iter_defaults_to_twice_the_mmars_steps_aggregation(tmp_path: Path) -> None:
    path = _server_config(tmp_path / "config")
    client = {"client": {"local_epochs": 5, "steps_aggregation": 4}}
    (tmp_path / "config" / "config_fed_client.json").write_text(json.dumps(client))
    c = load_server_config(path)
    assert c.max_n_iter == 8 and "steps_aggregation (4)" in c.max_n_iter_source


@pytest.mark.parametrize(
    ("args", "key", "problem"),
    [
        ({"weigh_by_local_iter": "equal"}, "weigh_by_local_iter", 'or false.*got "equal"'),
        ({"weigh_by_local_iter": 1}, "weigh_by_local_iter", "got 1"),
        ({"max_n_iter": 0}, "max_n_iter", "expected a number >= 1, got 0"),
        ({"max_n_iter": "many"}, "max_n_iter", 'expected int, got "many"'),
        ({"weights_by": "n_iter"}, "weights_by", "unknown key"),
    ],
)
def test_a_bad_aggregator_value_names_file_and_key(
    tmp_path: Path, args: dict[str, Any], key: str, problem: str
) -> None:
    path = _server_config(tmp_path, **args)
    with pytest.raises(ConfigError, match=rf"config_fed_server\.json: aggregator\.args\.{key}: "):
        load_server_config(path)
    with pytest.raises(ConfigError, match=problem):
        load_server_config(path)


# ---------------------------------------------------------------- the screen itself


def test_the_screen_finds_a_nan_in_the_last_block_and_leaves_the_mean_untouched() -> None:
    from engine.server.aggregator import SCREEN_BLOCK

    base = {"w": np.zeros(3 * SCREEN_BLOCK + 5, np.float32)}
    acc = FedAvgAccumulator()
    good = {"w": np.ones_like(base["w"])}
    assert acc.screen(good, base).variable is None
    acc.add("site-a", good, 1.0)
    bad = {"w": np.ones_like(base["w"])}
    bad["w"][-1] = np.nan
    screening = acc.screen(bad, base)
    assert (screening.variable, screening.problem) == ("w", f"NaN (1 of {bad['w'].size} values)")
    new = acc.apply(base)  # the refused one was never added
    np.testing.assert_array_equal(new["w"], 1.0)


def test_a_non_finite_initial_or_saved_model_is_refused_at_start(tmp_path: Path) -> None:
    from engine.fileio import save_json_atomic, save_npz_atomic

    config = ServerConfig(task_name=TASK, target="127.0.0.1:0", num_rounds=3)
    with pytest.raises(ValueError, match="initial model holds NaN or Inf in w"):
        FederatedServer(config, tmp_path, {"w": np.array([0.0, np.inf], np.float32)})
    # a model saved by a server that did not check: resumed, it would be sent to every site
    state = {"task": TASK, "current_round": 1, "num_rounds": 3, "sites": [], "history": []}
    save_json_atomic(tmp_path / "state.json", state)
    nan = {"w": np.array([np.nan, 1], np.float32)}
    save_npz_atomic(tmp_path / "models" / "global_model.npz", nan, meta={"task": TASK, "round": 1})
    with pytest.raises(ConfigError, match=r"global_model\.npz: the saved global model holds NaN"):
        FederatedServer(config, tmp_path, {"w": np.zeros(2, np.float32)})
