"""A site's own ``local/environment.json`` over the MMAR's variables (issue 17, item 5): one MMAR
goes to every site, and each site points it at its own data."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.config import (
    ConfigError,
    environment_problems,
    load_environment,
    local_environment_file,
)
from engine.demo import prepare_workspace
from engine.events import EventBus
from engine.site.paths import SitePaths
from engine.site.site_engine import SiteEngine, check_mmar
from engine.training.datalist import DatalistDataset
from fltui.check_config import check_path

DEMO_MMAR = Path(__file__).resolve().parents[2] / "engine" / "training" / "demo_mmar"


def _mmar(root: Path, environment: dict[str, object]) -> Path:
    mmar = root / "mmar"
    shutil.copytree(DEMO_MMAR, mmar)
    (mmar / "config" / "environment.json").write_text(json.dumps(environment))
    return mmar


def _local(folder: Path, data: object) -> Path:
    path = folder / "local" / "environment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_the_local_file_wins_and_may_point_outside_the_mmar(tmp_path: Path) -> None:
    mmar = _mmar(
        tmp_path,
        {"DATA_ROOT": ".", "DATASET_JSON": "config/dataset_0.json", "PROCESSING_TASK": "seg"},
    )
    local = _local(
        tmp_path / "ws",
        {
            "DATA_ROOT": "/data/site1",
            "DATASET_JSON": "lists/site1.json",  # relative: under the workspace's local/
            "MMAR_CKPT_DIR": "/scratch/site1/models",  # the site's own choice: anywhere
            "SITE_ONLY": 3,
        },
    )
    env = load_environment(mmar, local)
    assert env.variables["DATA_ROOT"] == "/data/site1"
    assert env.variables["DATASET_JSON"] == str(local.parent.resolve() / "lists" / "site1.json")
    assert env.ckpt_dir == Path("/scratch/site1/models")
    assert env.eval_dir == mmar.resolve() / "eval"  # not set locally: the MMAR's
    assert env.variables["PROCESSING_TASK"] == "seg" and env.variables["SITE_ONLY"] == 3
    assert env.local_path == local
    assert env.local_names == ("DATA_ROOT", "DATASET_JSON", "MMAR_CKPT_DIR", "SITE_ONLY")
    # without the local file, or with none on disk: the MMAR's alone
    alone = load_environment(mmar)
    assert alone.variables["DATA_ROOT"] == str(mmar.resolve())
    assert alone.local_path is None and alone.local_names == ()
    missing = load_environment(mmar, tmp_path / "nowhere" / "environment.json")
    assert missing.variables == alone.variables and missing.local_path is None


def test_the_mmars_written_folders_stay_inside_it_whatever_the_local_file_says(
    tmp_path: Path,
) -> None:
    mmar = _mmar(tmp_path, {"MMAR_CKPT_DIR": "/tmp/fltui-escape"})
    local = _local(tmp_path / "ws", {"MMAR_CKPT_DIR": "/scratch/ckpt"})
    problems = environment_problems(mmar, local)
    assert [(p.path.name, p.key) for p in problems] == [("environment.json", "MMAR_CKPT_DIR")]
    assert problems[0].path == mmar.resolve() / "config" / "environment.json"
    assert "outside the MMAR" in problems[0].problem


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ("{not json", "", "not valid JSON"),
        ([1, 2], "", "expected a JSON object"),
        ({"DATA_ROOT": 5}, "DATA_ROOT", "expected a path (a string)"),
        ({"EPOCHS": [1]}, "EPOCHS", "expected a string or number"),
        ({"MMAR_ROOT": "/x"}, "MMAR_ROOT", "cannot be set"),
        ({"bad-name": 1}, "bad-name", "expected a variable name"),
        ({"MMAR_CKPT_DIR": " "}, "MMAR_CKPT_DIR", "is empty"),
    ],
)
def test_a_malformed_local_file_names_that_file_and_key(
    tmp_path: Path, data: object, key: str, words: str
) -> None:
    mmar = _mmar(tmp_path, {"DATA_ROOT": "."})
    local = _local(tmp_path / "ws", data)
    with pytest.raises(ConfigError) as err:
        load_environment(mmar, local)
    assert err.value.path == local and err.value.key == key, str(err.value)
    assert words in str(err.value)
    # every problem at once, the MMAR's beside the site's
    (mmar / "config" / "environment.json").write_text(json.dumps({"MMAR_ROOT": "x"}))
    problems = environment_problems(mmar, local)
    assert {p.path for p in problems} == {local, mmar.resolve() / "config" / "environment.json"}


def test_only_an_mmar_in_a_site_workspace_has_a_local_file(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    paths = SitePaths(tmp_path / "site-1")
    expected = paths.root / "local" / "environment.json"
    assert local_environment_file(paths.mmar(1, "site-1")) == expected
    (paths.transfer / "offered" / "config").mkdir(parents=True)
    assert local_environment_file(paths.transfer / "offered") == expected
    assert local_environment_file(DEMO_MMAR) is None
    assert local_environment_file(paths.root / "elsewhere" / "mmar") is None


def _site_with_local_data(tmp_path: Path) -> tuple[Path, Path, int]:
    """A real site workspace whose MMAR trains on a datalist; the site's data and the datalist
    itself lie outside the run folder, where only its local/environment.json points."""
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    workspace = tmp_path / "site-1"
    mmar = SitePaths(workspace).mmar(1, "site-1")
    train = json.loads((mmar / "config" / "config_train.json").read_text())
    train["train_data"] = {"name": "DatalistDataset", "args": {"data_list_key": "training"}}
    train["validation_data"] = {"name": "DatalistDataset", "args": {"data_list_key": "validation"}}
    (mmar / "config" / "config_train.json").write_text(json.dumps(train))
    # The MMAR as the federation ships it: a datalist this site does not have.
    (mmar / "config" / "environment.json").write_text(
        json.dumps({"DATA_ROOT": "data", "DATASET_JSON": "config/dataset_0.json"})
    )
    data = tmp_path / "hospital-data"
    data.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        np.save(data / f"case{i}.npy", rng.normal(size=32).astype(np.float32))
        items.append({"image": f"case{i}.npy", "label": i % 10})
    (data / "lists").mkdir()
    (data / "lists" / "site1.json").write_text(
        json.dumps({"training": items[:9], "validation": items[9:]})
    )
    _local(
        workspace,
        # absolute DATA_ROOT; a datalist relative to the workspace's local/ folder
        {"DATA_ROOT": str(data), "DATASET_JSON": "../../hospital-data/lists/site1.json"},
    )
    return workspace, data, 9


def test_a_site_trains_on_the_data_its_local_file_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workspace, data, n_train = _site_with_local_data(tmp_path)
    mmar = SitePaths(workspace).mmar(1, "site-1")
    check_mmar(mmar)  # the start check reads the same variables
    with caplog.at_level(logging.INFO, logger="engine.site"):
        engine = SiteEngine(workspace, EventBus())
    lines = [r.getMessage() for r in caplog.records if "local" in r.getMessage()]
    assert len(lines) == 1 and "DATA_ROOT, DATASET_JSON" in lines[0], lines
    assert str(workspace / "local" / "environment.json") in lines[0]
    assert engine.environment.variables["DATA_ROOT"] == str(data)

    engine.build()
    dataset = engine.fitter._train_loader.dataset
    assert isinstance(dataset, DatalistDataset)
    assert len(dataset) == n_train
    assert dataset.path.resolve() == (data / "lists" / "site1.json").resolve()
    assert dataset.base == data  # the images are read from outside the run folder
    assert not (mmar / "config" / "dataset_0.json").exists()
    engine.fitter.train()  # one round reads every item from there

    report = check_path(workspace)
    assert not report.problems, [str(p) for p in report.problems]
    assert workspace / "local" / "environment.json" in report.checked


def test_a_broken_local_file_stops_the_site_and_check_config_names_it(tmp_path: Path) -> None:
    workspace, _, _ = _site_with_local_data(tmp_path)
    local = _local(workspace, {"DATA_ROOT": ["not", "a", "path"]})
    with pytest.raises(ConfigError) as err:
        SiteEngine(workspace, EventBus())
    assert err.value.path == local and err.value.key == "DATA_ROOT"
    with pytest.raises(ConfigError, match="DATA_ROOT"):
        check_mmar(SitePaths(workspace).mmar(1, "site-1"))
    problems = check_path(workspace).problems
    assert any(p.path == local and p.key == "DATA_ROOT" for p in problems), problems
