"""Clara's PyTorch MMAR form through MONAI's own engines, with real MONAI on tiny NIfTI images.

The fixture is the segmentation MMAR the demo ships (engine/training/seg_mmar), shrunk to 2D
32x32 images and rewritten the way Clara's MONAI 0.5-0.6 MMARs were (``dimensions``, a boolean
``to_onehot`` with ``n_classes``, ``output_transform`` lambdas).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import ConfigError, load_server_config
from engine.events import EventBus, RoundCompleted
from engine.server import FederatedServer
from engine.site.site_engine import SiteEngine
from engine.training import TrainingAborted, build_fitter
from engine.training.errors import TrainConfigError
from engine.training.initial_model import initial_weights
from engine.training.segmentation import write_segmentation_data
from fltui.check_config import main as check_config
from tests.conftest import Recorder
from tests.engine.test_clara_federation import FIXTURES, _run, _site, servers  # noqa: F401

SEG_MMAR = Path(__file__).resolve().parents[2] / "engine" / "training" / "seg_mmar"


def clara_mmar(root: Path, *, seed: int = 1, old_monai: bool = True) -> Path:
    """A 2D copy of the segmentation MMAR with its own data (under the MMAR: DATA_ROOT=data)."""
    mmar = Path(shutil.copytree(SEG_MMAR, root))
    file = mmar / "config" / "config_train.json"
    config = json.loads(file.read_text())
    config.update(spatial_dims=2, roi_size=[32, 32], amp=False)
    train, validate = config["train"], config["validate"]
    train["dataloader"]["args"]["batch_size"] = 2
    train["lr_scheduler"] = {"name": "StepLR", "args": {"step_size": 1, "gamma": 0.9}}
    if old_monai:
        # as written for MONAI 0.5: dimensions, AsDiscreted(n_classes, to_onehot=True), lambdas
        train["model"]["args"]["dimensions"] = train["model"]["args"].pop("spatial_dims")
        train["post_transforms"][1]["args"] = {
            "keys": ["pred", "label"],
            "argmax": [True, False],
            "to_onehot": True,
            "n_classes": 2,
        }
        validate["metrics"][0]["args"]["output_transform"] = "lambda x: (x['pred'], x['label'])"
    file.write_text(json.dumps(config, indent=1))
    write_segmentation_data(mmar / "data", seed=seed, n_train=4, n_validation=2, size=32, dims=2)
    return mmar


@pytest.fixture
def mmar(tmp_path: Path) -> Path:
    return clara_mmar(tmp_path / "mmar")


def test_the_clara_form_trains_with_monai_engines(
    mmar: Path, caplog: pytest.LogCaptureFixture
) -> None:
    epochs: list[dict[str, float]] = []
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="engine"):
        fitter = build_fitter(
            mmar,
            site_name="site-1",
            device="cpu",
            on_epoch_end=lambda epoch, metrics: epochs.append(metrics),
            on_progress=lambda step, total, epoch, loss: progress.append((step, total)),
        )
    notices = caplog.text
    # each translation of a MONAI 0.5 argument is one notice in the run's log
    assert "'dimensions' is 'spatial_dims'" in notices
    assert "to_onehot" in notices and "from_engine" in notices
    assert "CheckpointLoader is not used in federated training" not in notices  # disabled
    assert type(fitter.model).__name__ == "UNet"
    assert fitter.metric_name == "val_mean_dice" and fitter.higher_is_better
    before = fitter.validate(after_training=False)
    assert set(before) == {"val_mean_dice"} and fitter.best_metric is None
    weights = fitter.get_weights()
    for _ in range(4):
        assert fitter.train() == 2  # 4 images, batch 2, 1 epoch
    after = fitter.validate()
    assert after["val_mean_dice"] > before["val_mean_dice"]
    assert fitter.best_metric == after["val_mean_dice"] and fitter.best_model_path.is_file()
    assert epochs and {"train_loss", "train_mean_dice"} <= set(epochs[-1])
    assert progress[-1] == (2, 2)
    # validating other weights leaves the trained model as it was
    other = fitter.validate(weights)
    assert other["val_mean_dice"] == pytest.approx(before["val_mean_dice"], abs=1e-6)
    assert fitter.validate(after_training=False) == pytest.approx(after)
    # steps_aggregation: exactly that many iterations, across epochs of the loader
    fitter.steps_aggregation = 5
    assert fitter.train() == 5 and fitter.n_iter == 5


def test_abort_stops_a_round_and_the_next_one_runs(mmar: Path) -> None:
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    fitter.steps_aggregation = 50
    seen: list[int] = []

    def on_progress(step: int, total: int, epoch: int, loss: float) -> None:
        seen.append(step)
        if step >= 3:
            fitter.abort()

    fitter._on_progress = on_progress  # type: ignore[attr-defined]
    fitter._last_report = float("-inf")  # type: ignore[attr-defined]
    with pytest.raises(TrainingAborted, match="after"):
        fitter.train()
    assert fitter.n_iter < 50
    fitter.steps_aggregation = 2
    assert fitter.train() == 2  # the abort was consumed by the round it stopped


def test_the_initial_model_needs_no_data(mmar: Path) -> None:
    shutil.rmtree(mmar / "data")
    weights = initial_weights(mmar)
    assert any(name.startswith("model.") for name in weights)
    # the same seeded initialisation a site's trainer starts from
    write_segmentation_data(mmar / "data", seed=1, n_train=4, n_validation=2, size=32, dims=2)
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    trained = fitter.get_weights()
    assert all(np.array_equal(weights[k], trained[k]) for k in weights)


def test_a_pretrained_checkpoint_is_the_initial_model(mmar: Path) -> None:
    import torch

    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    fitter.train()
    state = {k: torch.from_numpy(v) for k, v in fitter.get_weights().items()}
    torch.save({"model": state}, mmar / "models" / "pretrained.pt")
    env = json.loads((mmar / "config" / "environment.json").read_text())
    env["PRETRAIN_WEIGHTS_FILE"] = "models/pretrained.pt"
    (mmar / "config" / "environment.json").write_text(json.dumps(env))
    weights = initial_weights(mmar)
    assert all(np.array_equal(weights[k], state[k].numpy()) for k in state)
    (mmar / "models" / "pretrained.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainConfigError, match="PRETRAIN_WEIGHTS_FILE"):
        initial_weights(mmar)


def _edit(mmar: Path, change: Any) -> None:
    file = mmar / "config" / "config_train.json"
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config))


def test_an_item_in_the_wrong_form_names_the_datalist(mmar: Path) -> None:
    datalist = mmar / "data" / "datalist.json"
    data = json.loads(datalist.read_text())
    data["training"] = ["imagesTr/case_000.nii.gz"]
    datalist.write_text(json.dumps(data))
    with pytest.raises(TrainConfigError) as caught:
        build_fitter(mmar, site_name="site-1", device="cpu")
    message = str(caught.value)
    assert "config_train.json" in message and "train.dataset" in message
    assert "datalist" in message and '{"image"' in message


def test_a_missing_datalist_says_where_to_set_it(mmar: Path) -> None:
    shutil.rmtree(mmar / "data")
    with pytest.raises(TrainConfigError, match=r"local/environment\.json"):
        build_fitter(mmar, site_name="site-1", device="cpu")


def test_an_unknown_component_names_the_key_and_a_close_match(mmar: Path) -> None:
    _edit(mmar, lambda c: c["train"]["model"].update(name="UNett"))
    with pytest.raises(ConfigError) as caught:
        build_fitter(mmar, site_name="site-1", device="cpu")
    message = str(caught.value)
    assert "train.model.name" in message and "'UNet'" in message


def test_check_config_reports_every_problem_of_the_form(
    mmar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def break_it(config: dict[str, Any]) -> None:
        config["train"]["model"]["name"] = "UNett"
        config["train"]["loss"]["args"]["softmaks"] = True
        config["validate"]["pre_transforms"][0] = {"ref": "LoadImage"}
        config["validate"]["metrics"][0]["is_key_metric"] = "yes"

    assert check_config([str(mmar)]) == 0, capsys.readouterr().out
    _edit(mmar, break_it)
    assert check_config([str(mmar)]) == 1
    out = capsys.readouterr().out
    assert "validate.pre_transforms[0].ref" in out and "LoadImaged" in out
    assert "validate.metrics[0].is_key_metric" in out
    _edit(mmar, lambda c: c["validate"]["metrics"][0].update(is_key_metric=True))
    _edit(mmar, lambda c: c["validate"]["pre_transforms"].__setitem__(0, {"ref": "LoadImaged"}))
    assert check_config([str(mmar)]) == 1
    out = capsys.readouterr().out
    assert "train.model.name" in out and "train.loss.args.softmaks" in out
    assert "softmax" in out  # did you mean


def test_a_site_without_monai_is_told_to_install_the_extra(
    mmar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "monai" else real(name, *a)
    )
    with pytest.raises(TrainConfigError, match=r"pip install 'fltui\[monai\]'"):
        build_fitter(mmar, site_name="site-1", device="cpu")


def test_two_sites_train_the_clara_form_over_loopback(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    """2 sites, 2 rounds, real gRPC: RoundCompleted carries Dice, which climbs."""
    template = clara_mmar(tmp_path / "template")
    for name in ("config_fed_client.json", "config_fed_server.json"):
        shutil.copy(FIXTURES / "mmar" / "config" / name, template / "config" / name)
    client = json.loads((template / "config" / "config_fed_client.json").read_text())
    client["client"]["privacy"] = {}
    (template / "config" / "config_fed_client.json").write_text(json.dumps(client))
    shutil.rmtree(template / "data")
    config = load_server_config(template / "config" / "config_fed_server.json")
    server = FederatedServer(config, tmp_path / "server", initial_weights(template), long_poll=0.5)
    server.start()
    servers.append(server)
    buses: list[Recorder] = []
    engines = []
    for i, name in enumerate(("client1", "client2")):
        root = _site(tmp_path, name, server.port, template)
        # the MMAR's output_transform lambda is an expression: this site's policy allows them
        (root / "startup" / "site_policy.json").write_text(json.dumps({"allow_expressions": True}))
        deployed = root / "run_1" / f"mmar_{name}"
        write_segmentation_data(
            deployed / "data", seed=10 + i, n_train=4, n_validation=2, size=32, dims=2
        )
        bus = EventBus()
        buses.append(Recorder(bus))
        engines.append(SiteEngine(root, bus))
    assert _run(engines) == {"client1": "completed", "client2": "completed"}
    assert server.finished and len(server.history) == 2
    for engine, rec in zip(engines, buses, strict=True):
        rounds = rec.of(RoundCompleted)
        assert [r.round for r in rounds] == [1, 2]
        assert all("val_mean_dice" in r.metrics for r in rounds)
        assert engine.fitter.n_iter == 4  # steps_aggregation of config_fed_client.json
        assert (engine.mmar / "models" / "best_model.pt").is_file()
    assert threading.active_count() < 50


def test_the_worker_gate_refuses_a_lambda_and_allows_trusted_paths(
    mmar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a training worker under a policy without BYOC or expressions (deploy refuses the
    same MMAR earlier; this is the gate behind it)."""
    from engine import components

    monkeypatch.setattr(components, "_code_policy", None)  # restored after the test
    components.set_code_policy(False, "startup/site_policy.json", allow_expressions=False)
    with pytest.raises(ConfigError) as caught:
        build_fitter(mmar, site_name="site-1", device="cpu")
    message = str(caught.value)
    assert "validate.metrics[0].args.output_transform" in message
    assert "allow_expressions" in message and "config_train.json" in message
    # without the lambda, and with the network named by its installed path, it builds
    _edit(mmar, lambda c: c["validate"]["metrics"][0]["args"].pop("output_transform"))
    _edit(mmar, lambda c: c["train"]["model"].update(name=None, path="monai.networks.nets.UNet"))
    _edit(mmar, lambda c: c["train"]["model"].pop("name"))
    assert type(build_fitter(mmar, site_name="site-1", device="cpu").model).__name__ == "UNet"
    # a name that resolves to an entry point that runs code is judged as its path is
    _edit(mmar, lambda c: c["train"]["dataset"].update(name="load_decathlon_datalist"))
    with pytest.raises(ConfigError, match=r"refused by site policy.*load_decathlon_datalist"):
        build_fitter(mmar, site_name="site-1", device="cpu")


def test_a_site_without_monai_refuses_a_monai_mmar_at_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told at deploy, by name, what to install; nothing is left deployed."""
    import importlib.util

    from engine.demo import prepare_workspace
    from engine.site.site_service import SiteService
    from tests.security.test_trusted_packages import _deploy

    prepare_workspace(tmp_path / "ws", num_sites=1, num_rounds=1)
    svc = SiteService(tmp_path / "ws" / "site-1", EventBus(), executor="thread")
    try:
        mmar = Path(shutil.copytree(SEG_MMAR, tmp_path / "seg"))
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "monai" else real(name, *a),
        )
        ok, text = _deploy(svc, mmar, "2")
        assert not ok and "pip install 'fltui[monai]'" in text and "config_train.json" in text
        assert not (tmp_path / "ws" / "site-1" / "run_2" / "mmar_site-1").exists()
        monkeypatch.undo()
        ok, text = _deploy(svc, mmar, "2")
        assert ok, text
    finally:
        svc.interface.close()


def test_handlers_write_only_inside_the_mmar(mmar: Path, tmp_path: Path) -> None:
    saver = {
        "name": "CheckpointSaver",
        "rank": 0,
        "args": {"save_dir": "{MMAR_CKPT_DIR}", "save_dict": ["model"], "save_final": True},
    }
    board = {"name": "TensorBoardStatsHandler", "args": {}}
    _edit(mmar, lambda c: c["train"]["handlers"].extend([saver, board]))
    fitter = build_fitter(mmar, site_name="site-1", device="cpu")
    fitter.train()
    assert list((mmar / "models").glob("*final*.pt")), list((mmar / "models").iterdir())
    assert list((mmar / "eval" / "tensorboard").iterdir())  # not ./runs of the working folder
    for outside in (str(tmp_path / "elsewhere"), "../../elsewhere"):
        _edit(mmar, lambda c, o=outside: c["train"]["handlers"][-2]["args"].update(save_dir=o))
        where = r"train\.handlers\[3\]\.args\.save_dir.*outside"
        with pytest.raises(TrainConfigError, match=where):
            build_fitter(mmar, site_name="site-1", device="cpu")
    assert not (tmp_path / "elsewhere").exists()
