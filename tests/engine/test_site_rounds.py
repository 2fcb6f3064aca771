"""Three real sites (fitter + FederatedClient) against the real server over loopback."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import ServerConfig
from engine.demo import _set_port, prepare_workspace
from engine.events import (
    EventBus,
    FederationFinished,
    ModelTransferred,
    PhaseChanged,
    PrivacyApplied,
    RoundCompleted,
    StatusChanged,
)
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.paths import SitePaths
from engine.site.site_engine import SiteEngine
from tests.conftest import Recorder

SITES = ["site-1", "site-2", "site-3"]


def _federation(
    tmp_path: Path, rounds: int, **client_overrides: Any
) -> tuple[FederatedServer, list[SiteEngine], EventBus]:
    prepare_workspace(tmp_path, num_sites=3, num_rounds=rounds, heartbeat_interval=0.5)
    initial = load_npz(tmp_path / "server" / "models" / "initial_model.npz")
    bus = EventBus()
    server = FederatedServer(
        ServerConfig(
            task_name="demo_federation", target="127.0.0.1:0", min_num_clients=3, num_rounds=rounds
        ),
        tmp_path / "server",
        initial,
        bus,
        long_poll=0.5,
    )
    port = server.start()
    engines = []
    for name in SITES:
        paths = SitePaths(tmp_path / name)
        _set_port(paths.kit, port)
        cfg_path = paths.mmar(1, name) / "config" / "config_fed_client.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["client"].update(
            {"steps_aggregation": 20, "cross_site_validate": False, **client_overrides}
        )
        cfg_path.write_text(json.dumps(cfg))
        engine = SiteEngine(tmp_path / name, bus)
        engine.build()
        engines.append(engine)
    return server, engines, bus


def _run_all(engines: list[SiteEngine]) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda e=e: outcomes.__setitem__(e.site, e.run()), daemon=True)
        for e in engines
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


@pytest.mark.slow
def test_three_sites_complete_rounds_and_every_step_is_an_event(tmp_path: Path) -> None:
    server, engines, bus = _federation(tmp_path, rounds=2)
    rec = Recorder(bus)
    try:
        outcomes = _run_all(engines)
    finally:
        server.stop(grace=0)
    assert outcomes == dict.fromkeys(SITES, "completed")
    assert server.finished and server.current_round == 2
    assert [h["contributors"] for h in server.history] == [SITES, SITES]
    for site in SITES:
        done = [e for e in rec.of(RoundCompleted) if e.site == site]
        assert [e.round for e in done] == [1, 2]
        assert all("accuracy" in e.metrics for e in done)
        finished = [e for e in rec.of(FederationFinished) if e.site == site]
        assert len(finished) == 1 and finished[0].outcome == "completed"
        assert finished[0].metrics == done[-1].metrics
        phases = {e.phase for e in rec.of(PhaseChanged) if e.site == site}
        assert {"pulling model", "training", "submitting", "waiting for the others"} <= phases
        statuses = [e.message for e in rec.of(StatusChanged) if e.site == site]
        assert statuses[:2] == ["training starting", "training started"]
        assert statuses[-1] == "training stopped"
        uploads = [
            e for e in rec.of(ModelTransferred) if e.site == site and e.direction == "upload"
        ]
        assert [e.round for e in uploads] == [1, 2]
    # the final global model on disk is the server's
    saved = load_npz(tmp_path / "server" / "models" / "global_model.npz")
    for name, value in server.global_model.items():
        np.testing.assert_array_equal(saved[name], value)


def test_exclude_vars_keeps_matching_variables_local(tmp_path: Path) -> None:
    server, engines, _ = _federation(tmp_path, rounds=2, exclude_vars=r"^net\.4\.")
    initial = {k: v.copy() for k, v in server.global_model.items()}
    try:
        outcomes = _run_all(engines)
    finally:
        server.stop(grace=0)
    assert set(outcomes.values()) == {"completed"}
    # the server never received the excluded variables: they keep their initial value
    for name in ("net.4.weight", "net.4.bias"):
        np.testing.assert_array_equal(server.global_model[name], initial[name])
    assert not np.array_equal(server.global_model["net.0.weight"], initial["net.0.weight"])
    # and each site's own head was trained locally, not overwritten by the global model
    heads = [e.fitter.get_weights()["net.4.weight"] for e in engines]
    assert not np.array_equal(heads[0], initial["net.4.weight"])
    assert not np.array_equal(heads[0], heads[1])
    # the shared variables are the global model's after the last pull
    for e in engines:
        np.testing.assert_array_equal(
            e.fitter.get_weights()["net.0.weight"], server.global_model["net.0.weight"]
        )


def test_bad_mmar_config_names_file_and_key(tmp_path: Path) -> None:
    from engine.config import ConfigError

    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    cfg_path = (
        SitePaths(tmp_path / "site-1").mmar(1, "site-1") / "config" / "config_fed_client.json"
    )
    cfg = json.loads(cfg_path.read_text())
    cfg["client"]["exclude_vars"] = "(unclosed"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"config_fed_client.json: client.exclude_vars: not a valid regular"
    ):
        SiteEngine(tmp_path / "site-1", EventBus())


PRIVACY = '''
import numpy as np
from engine.privacy import PrivacyProtocol


class HalfDelta(PrivacyProtocol):
    """A site's own protocol (BYO, from custom/): shares half of every change."""

    def __init__(self, factor=0.5):
        self.factor = factor

    def apply(self, model_diff, train_ctx):
        assert train_ctx["total_steps"] >= 1
        return {k: (v * self.factor).astype(v.dtype) for k, v in model_diff.items()}
'''


def test_privacy_protocol_from_the_mmar_is_applied_to_the_delta(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    mmar = SitePaths(tmp_path / "site-1").mmar(1, "site-1")
    (mmar / "custom" / "half_privacy.py").write_text(PRIVACY)
    initial = load_npz(tmp_path / "server" / "models" / "initial_model.npz")
    server = FederatedServer(
        ServerConfig(task_name="demo_federation", target="127.0.0.1:0", num_rounds=1),
        tmp_path / "server",
        initial,
        long_poll=0.5,
    )
    port = server.start()
    _set_port(SitePaths(tmp_path / "site-1").kit, port)
    cfg_path = mmar / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["client"].update(
        {
            "steps_aggregation": 5,
            "cross_site_validate": False,
            "privacy": {"path": "half_privacy.HalfDelta", "args": {"factor": 0.5}},
        }
    )
    cfg_path.write_text(json.dumps(cfg))
    # the MMAR's own code: only where the site's policy allows it (the default does not)
    (SitePaths(tmp_path / "site-1").startup / "site_policy.json").write_text('{"allow_byoc": true}')
    bus = EventBus()
    rec = Recorder(bus)
    engine = SiteEngine(tmp_path / "site-1", bus)
    engine.build()
    manager = engine.client.model_manager
    # what the site trained, seen through the manager just before the upload
    seen: dict[str, np.ndarray] = {}
    original = manager.model_diff

    phase_at_read: list[str] = []

    def spy(task_name: str, type_str: str = "delta_w", **kwargs: Any) -> dict[str, np.ndarray]:
        seen.update(manager.get_current_model_data())
        phase_at_read.append(rec.of(PhaseChanged)[-1].phase)
        return original(task_name, type_str, **kwargs)

    manager.model_diff = spy  # type: ignore[method-assign]
    try:
        assert engine.run() == "completed"
    finally:
        server.stop(grace=0)
    assert manager.last_privacy["protocol"] == "HalfDelta"
    # the phases say what happens when it happens: Δ and privacy run in "privacy", the upload
    # in "submitting" (the privacy phase was once announced, then "submitting", then privacy ran)
    assert phase_at_read == ["privacy"]
    phases = [e.phase for e in rec.of(PhaseChanged) if e.round == 1]
    assert phases[phases.index("training") :][:3] == ["training", "privacy", "submitting"]
    [applied] = rec.of(PrivacyApplied)
    assert (applied.round, applied.protocol) == (1, "HalfDelta")
    assert applied.total_values == sum(v.size for v in initial.values())
    assert 0 < applied.shared_values <= applied.total_values
    for name, start in initial.items():
        np.testing.assert_allclose(
            server.global_model[name], start + 0.5 * (seen[name] - start), atol=1e-6
        )


def test_unknown_privacy_protocol_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    from engine.config import ConfigError

    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    cfg_path = (
        SitePaths(tmp_path / "site-1").mmar(1, "site-1") / "config" / "config_fed_client.json"
    )
    cfg = json.loads(cfg_path.read_text())
    cfg["client"]["privacy"] = {"name": "NoSuchProtocol", "args": {}}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"client.privacy.name: unknown privacy protocol 'NoSuchProtocol'"
    ):
        SiteEngine(tmp_path / "site-1", EventBus())


class _GatedFitter:
    """A training double whose first round waits for a gate (to make a site late on purpose)."""

    def __init__(self, gate) -> None:
        self.weights = {"w": np.zeros(3, np.float32)}
        self.gate = gate
        self.n_iter = 0
        self.best_metric = None
        self.rounds = 0

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, new):
        self.weights.update({k: np.array(v) for k, v in new.items()})

    def train(self) -> int:
        self.rounds += 1
        if self.rounds == 1:
            assert self.gate(), "the gate never opened"
        self.weights["w"] = self.weights["w"] + 1
        self.n_iter = 1
        return 1

    def validate(self, weights=None, *, after_training=True):
        return {"accuracy": 0.5}

    def best_weights(self):
        return None

    def abort(self) -> None:
        pass


def test_a_late_update_is_dropped_and_the_site_goes_on(start_server, caplog) -> None:
    from engine.client import FederatedClient
    from engine.events import Event, ServerRoundAggregated
    from tests.conftest import direct_client, endpoint

    server = start_server(
        {"w": np.zeros(3, np.float32)}, min_num_clients=1, num_rounds=2, wait_after_min_clients=0
    )
    fast = direct_client(server, "site-fast")
    round_1_closed = threading.Event()

    def on_server_event(event: Event) -> None:
        if isinstance(event, ServerRoundAggregated) and event.round == 1:
            round_1_closed.set()

    server.bus.subscribe(on_server_event)

    def round_closed_without_me() -> bool:
        return round_1_closed.wait(60) and server.current_round == 1

    bus = EventBus()
    rec = Recorder(bus)
    training = threading.Event()  # site-slow has pulled round 0 and is "training" it

    def on_site_event(event: Event) -> None:
        if isinstance(event, PhaseChanged) and (event.phase, event.round) == ("training", 1):
            training.set()

    bus.subscribe(on_site_event)
    slow = FederatedClient("site-slow", {}, False, [endpoint(server)], retry_timeout=5, bus=bus)
    thread = slow.run(_GatedFitter(round_closed_without_me))
    assert training.wait(60), "site-slow never started training round 1"
    assert server.current_round == 0
    fast.pull_models_from_server()
    fast.push_models_to_server({"w": np.ones(3, np.float32)})
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert slow.outcome == "completed"
    assert [h["contributors"] for h in server.history] == [["site-fast"], ["site-slow"]]
    assert "site-slow: round 1 update not counted: Contrib: round 0 is not the current round 1" in (
        caplog.text
    )
    assert [e.outcome for e in rec.of(FederationFinished)] == ["completed"]


def test_a_built_in_protocol_named_in_the_mmar_runs_on_every_upload(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=2)
    mmar = SitePaths(tmp_path / "site-1").mmar(1, "site-1")
    initial = load_npz(tmp_path / "server" / "models" / "initial_model.npz")
    server = FederatedServer(
        ServerConfig(task_name="demo_federation", target="127.0.0.1:0", num_rounds=2),
        tmp_path / "server",
        initial,
        long_poll=0.5,
    )
    _set_port(SitePaths(tmp_path / "site-1").kit, server.start())
    cfg_path = mmar / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["client"].update(
        {
            "steps_aggregation": 5,
            "cross_site_validate": False,
            "privacy": {"name": "PercentileProtocol", "args": {"percentile": 90, "gamma": 1.0}},
        }
    )
    cfg_path.write_text(json.dumps(cfg))
    bus = EventBus()
    rec = Recorder(bus)
    engine = SiteEngine(tmp_path / "site-1", bus)
    try:
        assert engine.run() == "completed"
    finally:
        server.stop(grace=0)
    applied = rec.of(PrivacyApplied)
    assert [(e.round, e.protocol) for e in applied] == [
        (1, "PercentileProtocol"),
        (2, "PercentileProtocol"),
    ]
    for e in applied:
        assert 0.05 < e.shared_values / e.total_values < 0.15  # about (100 - 90) % shared
