"""Tests of engine.training: config errors, weights, rounds, abort, validation, the demo MMAR."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.training import TrainConfigError, TrainingAborted, build_fitter, demo_mmar_path

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-1", "site-2", "site-3")


def small_config(**overrides: Any) -> dict[str, Any]:
    """A tiny version of the demo config: 200 samples, 7 steps an epoch."""
    data = {
        "num_classes": 4,
        "num_features": 8,
        "samples": 200,
        "alpha": 0.5,
        "world_seed": 3,
    }
    config: dict[str, Any] = {
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "model": {"name": "MLP", "args": {"in_features": 8, "hidden": [16], "num_classes": 4}},
        "train_data": {"name": "SyntheticClassification", "args": dict(data)},
        "validation_data": {
            "name": "SyntheticClassification",
            "args": {**data, "samples": 100, "split": "validation"},
        },
        "loss": {"name": "CrossEntropyLoss", "args": {}},
        "optimizer": {"name": "SGD", "args": {"lr": 0.05, "momentum": 0.9}},
        "validation": {"metric": "accuracy"},
    }
    config.update(overrides)
    return config


def make_mmar(root: Path, config: dict[str, Any], custom: dict[str, str] | None = None) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "config" / "config_train.json").write_text(json.dumps(config), encoding="utf-8")
    if custom:
        (root / "custom").mkdir()
        for name, text in custom.items():
            (root / "custom" / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def mmar(tmp_path: Path) -> Path:
    return make_mmar(tmp_path / "mmar", small_config())


def weights_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# -- packaging and import hygiene ------------------------------------------------------------


def test_import_does_not_load_torch() -> None:
    code = "import engine.training, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_demo_mmar_layout() -> None:
    root = demo_mmar_path()
    for rel in ("config/config_train.json", "config/config_fed_client.json", "docs/README.md"):
        assert (root / rel).is_file(), rel
    assert (root / "custom").is_dir()
    assert (root / "models").is_dir()
    fed = json.loads((root / "config" / "config_fed_client.json").read_text())
    assert fed["client"]["local_epochs"] == 1
    assert fed["client"]["steps_aggregation"] == 0
    assert fed["servers"][0]["name"] == "demo_federation"


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"epochs": "2"}, "epochs", "positive integer"),
        ({"epochs": 0}, "epochs", "positive integer"),
        ({"batch_size": True}, "batch_size", "positive integer"),
        ({"epoch": 1}, "epoch", "did you mean 'epochs'"),
        ({"model": None}, "model", '"name"'),
        ({"model": {"args": {}}}, "model", 'exactly one of "name" and "path"'),
        ({"loss": {"name": "CrossEntropyLoss", "arg": {}}}, "loss.arg", "did you mean 'args'"),
        ({"optimizer": {"name": "SGD", "args": [1]}}, "optimizer.args", "keyword arguments"),
        ({"validation": {"metric": "f1"}}, "validation.metric", "'accuracy'"),
        (
            {"optimizer": {"name": "SGD", "args": {"lrr": 0.1}}},
            "optimizer.args.lrr",
            "did you mean 'lr'",
        ),
        (
            {"optimizer": {"name": "SGD", "args": {"lr": -1.0}}},
            "optimizer.args",
            "learning rate",
        ),
        ({"model": {"name": "MLP", "args": {"in_features": 8}}}, "model.args", "num_classes"),
    ],
)
def test_config_errors_name_file_and_key(
    tmp_path: Path, change: dict[str, Any], key: str, words: str
) -> None:
    root = make_mmar(tmp_path / "m", small_config(**change))
    with pytest.raises(TrainConfigError) as info:
        build_fitter(root, site_name="site-1", device="cpu")
    message = str(info.value)
    assert str(root / "config" / "config_train.json") in message
    assert info.value.key == key
    assert f": {key}: " in message
    assert words in message


def test_missing_key_and_bad_json(tmp_path: Path) -> None:
    config = small_config()
    del config["optimizer"]
    with pytest.raises(TrainConfigError, match=r"config_train\.json: optimizer: missing"):
        build_fitter(make_mmar(tmp_path / "a", config), site_name="s")
    root = make_mmar(tmp_path / "b", {})
    (root / "config" / "config_train.json").write_text('{"epochs": 1,}')
    with pytest.raises(TrainConfigError, match=r"not valid JSON.*line 1"):
        build_fitter(root, site_name="s")
    with pytest.raises(TrainConfigError, match="file not found"):
        build_fitter(tmp_path / "nowhere", site_name="s")


def test_unknown_component_names_it(tmp_path: Path) -> None:
    root = make_mmar(tmp_path / "m", small_config(model={"name": "MPL", "args": {}}))
    with pytest.raises(TrainConfigError) as info:
        build_fitter(root, site_name="s")
    assert info.value.key == "model.name"
    assert "'MPL'" in str(info.value) and "did you mean 'MLP'" in str(info.value)

    root = make_mmar(tmp_path / "n", small_config(optimizer={"name": "Adamm", "args": {}}))
    with pytest.raises(TrainConfigError, match=r"optimizer\.name: unknown component 'Adamm'"):
        build_fitter(root, site_name="s")


def test_non_importable_path(tmp_path: Path) -> None:
    custom = {"broken.py": "raise RuntimeError('no GPU licence')\n", "fine.py": "X = 1\n"}
    config = small_config(model={"path": "broken.Net", "args": {}})
    root = make_mmar(tmp_path / "m", config, custom)
    with pytest.raises(TrainConfigError, match=r"model\.path: cannot import module 'broken'"):
        build_fitter(root, site_name="s")

    config = small_config(model={"path": "no_such_module_here.Net", "args": {}})
    with pytest.raises(TrainConfigError, match="no_such_module_here"):
        build_fitter(make_mmar(tmp_path / "n", config, custom), site_name="s")

    config = small_config(model={"path": "fine.Net", "args": {}})
    with pytest.raises(TrainConfigError, match="has no attribute 'Net'"):
        build_fitter(make_mmar(tmp_path / "o", config, custom), site_name="s")


CUSTOM_NET = """
import torch

SEEN = {}

class Net(torch.nn.Module):
    def __init__(self, width, context):
        super().__init__()
        SEEN.update(context)
        self.body = torch.nn.Linear(8, WIDTH_FACTOR * width)
        self.head = torch.nn.Linear(WIDTH_FACTOR * width, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))
"""


def test_custom_path_component_loads_with_context(tmp_path: Path) -> None:
    # Two MMARs with a custom module of the same name: each fitter must get its own code.
    fitters = []
    for factor in (1, 2):
        code = f"WIDTH_FACTOR = {factor}\n{CUSTOM_NET}"
        config = small_config(model={"path": "site_net.Net", "args": {"width": 5}})
        root = make_mmar(tmp_path / f"m{factor}", config, {"site_net.py": code})
        fitter = build_fitter(root, site_name=f"site-{factor}", device="cpu")
        fitters.append(fitter)
        seen = sys.modules["site_net"].SEEN
        assert seen == {
            "site_name": f"site-{factor}",
            "mmar_root": root.resolve(),
            # environment.json's variables (here only the defaults: no such file)
            "environment": {
                "MMAR_ROOT": str(root.resolve()),
                "MMAR_CKPT_DIR": str(root.resolve() / "models"),
                "MMAR_EVAL_OUTPUT_PATH": str(root.resolve() / "eval"),
            },
        }
    assert fitters[0].get_weights()["body.weight"].shape == (5, 8)
    assert fitters[1].get_weights()["body.weight"].shape == (10, 8)
    assert fitters[1].train() == 7


# -- weights ---------------------------------------------------------------------------------


def test_get_set_roundtrip_and_partial_update(mmar: Path) -> None:
    a = build_fitter(mmar, site_name="site-1", device="cpu")
    b = build_fitter(mmar, site_name="site-1", device="cpu")
    weights = a.get_weights()
    assert list(weights) == list(a.model.state_dict())
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in weights.values())
    shifted = {k: v + 1.0 for k, v in weights.items()}
    b.set_weights(shifted)
    assert weights_equal(b.get_weights(), shifted)

    # A subset changes only that variable; float64 input is cast to the model's float32.
    name = next(iter(weights))
    b.set_weights({name: np.zeros(weights[name].shape, dtype=np.float64)})
    after = b.get_weights()
    assert after[name].dtype == np.float32 and not after[name].any()
    assert all(np.array_equal(after[k], shifted[k]) for k in after if k != name)

    # get_weights hands out copies.
    after[name][...] = 7.0
    assert not b.get_weights()[name].any()


def test_set_weights_is_all_or_nothing(mmar: Path) -> None:
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    before = fitter.get_weights()
    names = list(before)
    good = {k: v + 1.0 for k, v in before.items()}

    with pytest.raises(ValueError, match=r"unknown variable 'net\.9\.weight'"):
        fitter.set_weights({**good, "net.9.weight": np.zeros(3, dtype=np.float32)})
    assert weights_equal(fitter.get_weights(), before)

    bad = dict(good)
    bad[names[-1]] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError) as info:
        fitter.set_weights(bad)
    message = str(info.value)
    shape = before[names[-1]].shape
    assert repr(names[-1]) in message and "(3, 3)" in message and str(tuple(shape)) in message
    assert weights_equal(fitter.get_weights(), before)


# -- training --------------------------------------------------------------------------------


def test_train_returns_n_iter_and_reports(mmar: Path) -> None:
    progress: list[tuple[int, int, int, float]] = []
    epochs: list[tuple[int, dict[str, float]]] = []
    fitter = build_fitter(
        mmar,
        site_name="site-2",
        local_epochs=2,
        on_progress=lambda *args: progress.append(args),
        on_epoch_end=lambda e, m: epochs.append((e, m)),
        device="cpu",
    )
    before = fitter.get_weights()
    assert fitter.steps_per_round == 14
    assert fitter.train() == 14
    assert fitter.n_iter == 14
    assert progress[0][:3] == (1, 14, 1)
    assert progress[-1][:3] == (14, 14, 2)
    assert all(math.isfinite(p[3]) for p in progress)
    assert [e for e, _ in epochs] == [1, 2]
    assert set(epochs[0][1]) == {"train_loss", "train_accuracy"}
    assert not weights_equal(fitter.get_weights(), before)


def test_steps_aggregation_is_exact(mmar: Path) -> None:
    progress: list[tuple[int, int, int, float]] = []
    epochs: list[int] = []
    fitter = build_fitter(
        mmar,
        site_name="site-1",
        local_epochs=5,  # ignored: steps win
        steps_aggregation=10,
        on_progress=lambda *args: progress.append(args),
        on_epoch_end=lambda e, m: epochs.append(e),
        device="cpu",
    )
    assert fitter.train() == 10
    assert progress[-1][:3] == (10, 10, 2)  # 7 steps make an epoch; the round ends in the 2nd
    assert epochs == [1, 2]
    with pytest.raises(ValueError, match="steps_aggregation"):
        build_fitter(mmar, site_name="site-1", steps_aggregation=-1)
    with pytest.raises(ValueError, match="local_epochs"):
        build_fitter(mmar, site_name="site-1", local_epochs=0)


def test_abort_raises_and_fitter_recovers(mmar: Path) -> None:
    holder: dict[str, Any] = {}

    def on_progress(step: int, total: int, epoch: int, loss: float) -> None:
        if step == 1 and not holder.get("done"):
            holder["done"] = True
            # As the admin's abort would: from another thread, while the round runs.
            thread = threading.Thread(target=holder["fitter"].abort)
            thread.start()
            thread.join()

    fitter = build_fitter(
        mmar, site_name="site-1", local_epochs=3, on_progress=on_progress, device="cpu"
    )
    holder["fitter"] = fitter
    with pytest.raises(TrainingAborted, match="after 1 of 21 steps"):
        fitter.train()
    assert fitter.n_iter == 1
    # The abort was consumed: the next round runs in full.
    assert fitter.train() == 21

    # An abort requested between rounds stops the next one before its first step.
    fitter.abort()
    with pytest.raises(TrainingAborted):
        fitter.train()
    assert fitter.n_iter == 0


def test_same_seed_same_weights(mmar: Path) -> None:
    runs = []
    for _ in range(2):
        fitter = build_fitter(mmar, site_name="site-3", device="cpu")
        fitter.train()
        fitter.train()
        runs.append(fitter.get_weights())
    assert weights_equal(runs[0], runs[1])
    other = make_mmar(mmar.parent / "other", small_config(seed=1))
    fitter = build_fitter(other, site_name="site-3", device="cpu")
    fitter.train()
    fitter.train()
    assert not weights_equal(runs[0], fitter.get_weights())


# -- validation ------------------------------------------------------------------------------


def test_validate_and_best_model(mmar: Path) -> None:
    import torch

    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    assert fitter.metric_name == "accuracy"
    assert fitter.best_weights() is None and fitter.best_metric is None
    first = fitter.validate()
    assert set(first) == {"accuracy", "loss"} and 0.0 <= first["accuracy"] <= 1.0
    assert fitter.best_metric == first["accuracy"]
    saved = torch.load(fitter.best_model_path)
    assert list(saved) == list(fitter.get_weights())

    for _ in range(3):
        fitter.train()
    trained = fitter.validate()
    assert trained["accuracy"] > first["accuracy"]
    best = fitter.best_weights()
    assert best is not None and fitter.best_metric == trained["accuracy"]
    assert weights_equal(best, fitter.get_weights())
    saved = torch.load(fitter.best_model_path)
    assert all(np.array_equal(saved[k].numpy(), best[k]) for k in best)
    assert not list(fitter.best_model_path.parent.glob(".best_model.*"))  # no temp files left


def test_a_received_global_model_is_never_the_best_local_model(mmar: Path) -> None:
    """Best local model = the best after local training; a global model just loaded (which may
    score higher: e.g. the untrained global of a later run) is measured, never kept."""
    from engine.client.model_manager import ClientModelManager

    trained = build_fitter(mmar, site_name="site-1", device="cpu")
    for _ in range(3):
        trained.train()
    good = trained.get_weights()
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    manager = ClientModelManager()
    manager.set_fitter(fitter)
    untrained = manager.validate_model(None, None, after_training=True)
    fitter.set_weights(good)  # a better global model arrives
    global_metrics = manager.validate_model(None, None)
    assert global_metrics["accuracy"] > untrained["accuracy"]
    assert fitter.best_metric == untrained["accuracy"]
    best = fitter.best_weights()
    assert best is not None and not weights_equal(best, good)


def test_validate_with_weights_leaves_own_model(mmar: Path) -> None:
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    untrained = fitter.get_weights()
    for _ in range(3):
        fitter.train()
    own = fitter.get_weights()
    own_metrics = fitter.validate()
    best = fitter.best_metric

    other = fitter.validate(untrained)
    assert other["accuracy"] != own_metrics["accuracy"]
    assert weights_equal(fitter.get_weights(), own)
    assert fitter.best_metric == best
    assert fitter.validate() == own_metrics

    with pytest.raises(ValueError, match="shape"):
        fitter.validate({next(iter(own)): np.zeros(1, dtype=np.float32)})
    assert weights_equal(fitter.get_weights(), own)


# -- the demo federation ---------------------------------------------------------------------


def test_demo_federation_learns(tmp_path: Path) -> None:
    """Three non-IID sites, FedAvg of deltas weighted by n_iter: the global model improves."""
    fitters = []
    for site in SITES:
        root = tmp_path / site
        shutil.copytree(demo_mmar_path(), root)
        fitters.append(build_fitter(root, site_name=site, local_epochs=1, device="cpu"))
    global_weights = fitters[0].get_weights()
    history = []
    for _ in range(3):
        deltas, steps = [], []
        for fitter in fitters:
            fitter.set_weights(global_weights)
            steps.append(fitter.train())
            local = fitter.get_weights()
            deltas.append({k: local[k] - global_weights[k] for k in global_weights})
        total = sum(steps)
        global_weights = {
            k: v + sum(d[k] * n for d, n in zip(deltas, steps, strict=True)) / total
            for k, v in global_weights.items()
        }
        history.append(np.mean([f.validate(global_weights)["accuracy"] for f in fitters]))
    assert history[2] > history[0] + 0.15, history


_DICT_DATA = """
import torch
from torch.utils.data import Dataset


class DictItems(Dataset):
    def __init__(self, n=64, keys=("image", "label")):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.keys = keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}
"""


def test_dictionary_items_train_as_monai_writes_them(tmp_path: Path) -> None:
    config = small_config()
    config["model"]["args"].update(in_features=8, num_classes=2)
    for key in ("train_data", "validation_data"):
        config[key] = {"path": "dict_data.DictItems", "args": {}}
    root = make_mmar(tmp_path / "m", config, {"dict_data.py": _DICT_DATA})
    fitter = build_fitter(root, site_name="s", device="cpu")
    assert fitter.train() > 0 and "accuracy" in fitter.validate()
    config["train_data"]["args"] = {"keys": ["img", "seg"]}
    other = make_mmar(tmp_path / "n", config, {"dict_data.py": _DICT_DATA})
    with pytest.raises(TypeError, match=r"keys \['img', 'seg'\].*Clara's PyTorch form"):
        build_fitter(other, site_name="s", device="cpu").train()
