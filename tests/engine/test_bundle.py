"""Tests of engine.training.bundle: a real (tiny) MONAI bundle trained through MonaiAlgo."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("ignite")

import engine.components
from engine.training.bundle import BundleTrainer, build_bundle_trainer, is_bundle
from engine.training.errors import TrainConfigError, TrainingAborted
from tests.engine.bundle_fixtures import make_bundle, train_config

# MONAI warns, on every bundle it initialises for FL, that configs are code; the site policy's
# expression gate is the answer to that here (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:executing the bundle config:UserWarning")


def build(root: Path, **kwargs: Any) -> BundleTrainer:
    kwargs.setdefault("site_name", "site-1")
    return build_bundle_trainer(root, **kwargs)


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> bool:
    return any(not np.array_equal(before[name], after[name]) for name in before)


def test_is_bundle_looks_for_configs_train(tmp_path: Path) -> None:
    (tmp_path / "clara" / "config").mkdir(parents=True)
    (tmp_path / "clara" / "config" / "config_train.json").write_text("{}")
    assert not is_bundle(tmp_path / "clara")
    for name in ("train.json", "train.yaml"):
        root = tmp_path / name
        (root / "configs").mkdir(parents=True)
        (root / "configs" / name).write_text("{}")
        assert is_bundle(root)


def test_a_round_trains_the_bundle_through_monai_algo(tmp_path: Path) -> None:
    from monai.fl.client import MonaiAlgo  # deferred: monai is an optional extra

    progress: list[tuple[int, int, int, float]] = []
    epochs: list[tuple[int, dict[str, float]]] = []
    trainer = build(
        make_bundle(tmp_path / "mmar"),
        on_progress=lambda *a: progress.append(a),
        on_epoch_end=lambda *a: epochs.append(a),
    )
    assert isinstance(trainer.algo, MonaiAlgo)
    assert trainer.metric_name == "val_mean_dice"
    assert trainer.higher_is_better is True
    assert trainer.device.type == "cpu"
    assert trainer.steps_per_round == 2  # 4 training pairs, batches of 2, 1 local epoch
    before = trainer.get_weights()
    assert trainer.num_parameters == sum(a.size for a in before.values() if a.dtype.kind == "f")

    assert trainer.train() == 2
    assert trainer.n_iter == 2
    assert changed(before, trainer.get_weights())
    assert progress[-1][:3] == (2, 2, 1)
    assert np.isfinite(progress[-1][3])
    assert [e for e, _ in epochs] == [1]
    assert set(epochs[0][1]) == {"train_loss"}
    # A second round goes on from where the first stopped (MonaiAlgo counts epochs on).
    assert trainer.train() == 2
    assert [e for e, _ in epochs] == [1, 1]


def test_weights_round_trip_and_bad_weights_change_nothing(tmp_path: Path) -> None:
    trainer = build(make_bundle(tmp_path / "mmar"), device="cpu")
    weights = trainer.get_weights()
    assert list(weights) == list(trainer.model.state_dict())
    shifted = {name: a + 1 if a.dtype.kind == "f" else a for name, a in weights.items()}
    trainer.set_weights(shifted)
    for name, array in trainer.get_weights().items():
        np.testing.assert_array_equal(array, shifted[name])
    first = next(iter(weights))
    trainer.set_weights({first: weights[first]})  # partial: only that one changes back
    got = trainer.get_weights()
    np.testing.assert_array_equal(got[first], weights[first])
    second = list(weights)[1]
    np.testing.assert_array_equal(got[second], shifted[second])

    kept = trainer.get_weights()
    with pytest.raises(ValueError, match="unknown variable"):
        trainer.set_weights({first: weights[first] * 0, "no.such.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        trainer.set_weights({second: np.zeros((3, 3), dtype=np.float32)})
    assert not changed(kept, trainer.get_weights())


def test_validate_reports_the_key_metric_and_keeps_best_only_after_training(
    tmp_path: Path,
) -> None:
    root = make_bundle(tmp_path / "mmar")
    trainer = build(root)
    received = trainer.validate(after_training=False)  # a global model just received
    assert set(received) >= {"val_mean_dice"}
    assert 0.0 <= received["val_mean_dice"] <= 1.0
    assert trainer.best_metric is None
    assert trainer.best_weights() is None
    assert not trainer.best_model_path.exists()

    trainer.train()
    trained = trainer.get_weights()
    metrics = trainer.validate()
    assert trainer.best_metric == metrics["val_mean_dice"]
    assert trainer.best_model_path == root / "models" / "best_model.pt"
    assert trainer.best_model_path.is_file()
    best = trainer.best_weights()
    assert best is not None and not changed(trained, best)
    saved = json.loads((root / "eval" / "validation_metrics.json").read_text())
    assert saved["metric"] == "val_mean_dice" and saved["metrics"] == metrics

    # Other weights (another site's model): measured, the trained network and best untouched.
    other = {name: np.zeros_like(a) for name, a in trained.items()}
    theirs = trainer.validate(other)
    assert theirs["val_mean_dice"] != metrics["val_mean_dice"]
    assert not changed(trained, trainer.get_weights())
    assert trainer.best_metric == metrics["val_mean_dice"]
    assert trainer.validate(after_training=False) == metrics
    with pytest.raises(ValueError, match="unknown variable"):
        trainer.validate({"nope": np.zeros(1)})


def test_steps_aggregation_runs_exactly_that_many_iterations(tmp_path: Path) -> None:
    progress: list[tuple[int, int, int, float]] = []
    epochs: list[int] = []
    trainer = build(
        make_bundle(tmp_path / "mmar"),
        steps_aggregation=3,
        on_progress=lambda *a: progress.append(a),
        on_epoch_end=lambda epoch, _: epochs.append(epoch),
    )
    assert trainer.steps_per_round == 3
    for _ in range(2):  # the second round starts after a round that ended mid-epoch
        epochs.clear()
        start = trainer.algo.trainer.state.iteration
        assert trainer.train() == 3
        assert trainer.algo.trainer.state.iteration - start == 3
        assert progress[-1][:3] == (3, 3, 2)
        assert epochs == [1, 2]  # a whole epoch of 2, then 1 step of the next


def test_abort_stops_a_running_round_and_an_idle_abort_the_next(tmp_path: Path) -> None:
    trainer: BundleTrainer | None = None
    seen: list[int] = []

    def on_progress(step: int, total: int, epoch: int, loss: float) -> None:
        seen.append(step)
        assert trainer is not None
        trainer.abort()  # from the training thread: the round stops before its next step

    trainer = build(make_bundle(tmp_path / "mmar"), local_epochs=3, on_progress=on_progress)
    with pytest.raises(TrainingAborted, match="after 1 of 6 steps"):
        trainer.train()
    assert trainer.n_iter == 1 and seen == [1]

    idle = trainer.get_weights()
    trainer.abort()
    with pytest.raises(TrainingAborted, match="after 0 of 6 steps"):
        trainer.train()
    assert not changed(idle, trainer.get_weights())

    trainer._on_progress = None
    assert trainer.train() == 6  # the abort was consumed


def test_abort_from_another_thread_stops_the_round(tmp_path: Path) -> None:
    started = threading.Event()
    trainer = build(
        make_bundle(tmp_path / "mmar"),
        local_epochs=200,
        on_progress=lambda *a: started.set(),
    )
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(trainer.train())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30)
    trainer.abort()
    worker.join(30)
    assert not worker.is_alive()
    assert isinstance(outcome[0], TrainingAborted)
    assert 0 < trainer.n_iter < 400


def test_checkpoint_loaders_are_disabled_in_train_handlers_too(tmp_path: Path) -> None:
    config = train_config()
    config["train"]["handlers"].append(
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@ckpt_dir + '/no_such_model.pt'",
            "load_dict": {"model": "@network"},
        }
    )
    trainer = build(make_bundle(tmp_path / "mmar", config=config))
    assert trainer.train() == 2  # would fail at the round's start, had the loader run


def test_multi_gpu_is_refused_with_a_reason(tmp_path: Path) -> None:
    trainer = build(make_bundle(tmp_path / "mmar"))
    with pytest.raises(NotImplementedError, match="multi-GPU training of a MONAI bundle"):
        trainer.enable_distributed(0, 2)
    with pytest.raises(NotImplementedError, match="one device"):
        trainer.broadcast_weights()


def test_a_broken_bundle_names_the_file_and_key(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "json")
    train_json = root / "configs" / "train.json"
    train_json.write_text('{"network_def": ', encoding="utf-8")
    with pytest.raises(TrainConfigError) as err:
        build(root)
    assert err.value.file == train_json
    assert "cannot be read" in str(err.value)

    config = train_config()
    del config["train"]["trainer"]
    root = make_bundle(tmp_path / "no_trainer", config=config)
    with pytest.raises(TrainConfigError) as err:
        build(root)
    assert err.value.file == root / "configs" / "train.json"
    assert err.value.key == "train#trainer"

    config = train_config()
    config["network_def"]["_target_"] = "NoSuchNetwork"
    root = make_bundle(tmp_path / "unknown", config=config)
    with pytest.raises(TrainConfigError, match="NoSuchNetwork") as err:
        build(root)
    assert err.value.file == root / "configs" / "train.json"
    assert err.value.key == "network_def"
    assert "could not be built" in str(err.value)

    config = train_config(device="$torch.devic('cpu')")
    root = make_bundle(tmp_path / "expression", config=config)
    with pytest.raises(TrainConfigError, match="has no attribute 'devic'") as err:
        build(root)
    assert err.value.key == "device"


def test_a_site_without_monai_is_told_to_install_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mmar"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "train.json").write_text("{}")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "monai" else real(name, *a),
    )
    with pytest.raises(TrainConfigError, match=r"pip install 'fltui\[monai\]'") as err:
        build(root)
    assert err.value.file == root / "configs" / "train.json"


def test_every_expression_meets_the_site_policy_gate_before_monai_reads_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_bundle(tmp_path / "mmar")
    shown: list[tuple[str, str, Path]] = []

    def gate(key: str, text: str, file: Path) -> None:
        shown.append((key, text, file))
        if key == "network":
            raise TrainConfigError(file, key, "refused by site policy: config expressions")

    monkeypatch.setattr(engine.components, "check_expression", gate, raising=False)
    with pytest.raises(TrainConfigError, match="refused by site policy"):
        build(root)
    train_json = root / "configs" / "train.json"
    assert ("device", "$torch.device('cpu')", train_json) in shown
    assert all(text.startswith("$") for _, text, _ in shown)
    assert not (root / "models").exists()  # nothing was built

    shown.clear()
    monkeypatch.setattr(
        engine.components, "check_expression", lambda *a: shown.append(a), raising=False
    )
    build(root)
    keys = {key for key, _, _ in shown}
    assert {"network", "train#handlers#1#output_transform", "initialize#0"} <= keys


def test_two_sites_train_a_bundle_over_loopback_one_of_them_bare(tmp_path: Path) -> None:
    """2 sites, 2 rounds through MonaiAlgo over a real server: site1's MMAR carries the bundle
    beside config/config_fed_client.json, site2's is the bundle deployed as it is (defaults,
    the kit's task). Bundles are $-expressions: these sites' policy allows them."""
    import shutil

    from engine.config import load_server_config
    from engine.events import EventBus, RoundCompleted
    from engine.server import FederatedServer
    from engine.site.site_engine import SiteEngine
    from engine.training.initial_model import initial_weights
    from tests.conftest import Recorder
    from tests.engine.test_clara_federation import FIXTURES, _run, _site

    template = make_bundle(tmp_path / "template")
    (template / "config").mkdir()
    for name in ("config_fed_client.json", "config_fed_server.json"):
        shutil.copy(FIXTURES / "mmar" / "config" / name, template / "config" / name)
    config = load_server_config(template / "config" / "config_fed_server.json")
    server = FederatedServer(config, tmp_path / "server", initial_weights(template), long_poll=0.5)
    server.start()
    try:
        recorders, engines = [], []
        for name in ("client1", "client2"):
            root = _site(tmp_path, name, server.port, template)
            (root / "startup" / "site_policy.json").write_text(
                json.dumps({"allow_expressions": True})
            )
            if name == "client2":
                shutil.rmtree(root / "run_1" / f"mmar_{name}" / "config")
            bus = EventBus()
            recorders.append(Recorder(bus))
            engines.append(SiteEngine(root, bus))
        assert _run(engines) == {"client1": "completed", "client2": "completed"}
        assert server.finished and len(server.history) == 2
        assert [type(e.fitter).__name__ for e in engines] == ["BundleTrainer", "BundleTrainer"]
        assert engines[0].fitter.n_iter == 4  # steps_aggregation of config_fed_client.json
        assert engines[1].fitter.n_iter == 2  # a bare bundle: one epoch of 2 batches
        for rec in recorders:
            rounds = rec.of(RoundCompleted)
            assert [r.round for r in rounds] == [1, 2]
            assert all(r.key_metric and r.key_metric in r.metrics for r in rounds)
    finally:
        server.stop(grace=0)


def test_a_bundle_without_its_trainer_is_refused_at_deploy_and_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.config import ConfigError
    from engine.site.site_engine import check_mmar
    from fltui.check_config import main as check_config

    config = train_config()
    del config["train"]["trainer"]
    root = make_bundle(tmp_path / "b", config=config)
    with pytest.raises(ConfigError, match=r"train#trainer"):
        check_mmar(root)
    assert check_config([str(root)]) == 1
    assert "train#trainer" in capsys.readouterr().out
