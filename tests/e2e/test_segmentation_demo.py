"""`fltui demo --task segmentation` and `--mmar`: one MMAR deployed unchanged to every site, each
site's synthetic NIfTI data in its own local/ folder, the Dice of the global model per round."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.demo import SEGMENTATION_DATA, prepare_workspace, task_mmar
from engine.fileio import load_npz
from engine.training import build_fitter

ROOT = Path(__file__).resolve().parents[2]


def _fltui(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fltui", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_each_site_gets_its_own_data_once_and_the_same_mmar(tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    prepare_workspace(ws, num_sites=2, num_rounds=2, task="segmentation")
    server = json.loads((ws / "server" / "config_fed_server.json").read_text())
    assert server["servers"][0]["name"] == "demo_federation"
    assert server["servers"][0]["min_num_clients"] == 2 and server["servers"][0]["num_rounds"] == 2
    # the server's start is the MMAR's model alone: the server has no data
    assert not (ws / "server" / "mmar" / "data").exists()
    assert any(k.startswith("model.") for k in load_npz(ws / "server/models/initial_model.npz"))
    lists = {}
    for name in ("site-1", "site-2"):
        site = ws / name
        deployed = site / "run_1" / f"mmar_{name}"
        for mmar in (deployed, site / "transfer" / "seg_mmar"):  # unchanged, without data
            for file in ("config_train.json", "config_fed_client.json", "environment.json"):
                assert (mmar / "config" / file).read_bytes() == (
                    task_mmar("segmentation") / "config" / file
                ).read_bytes()
            assert not (mmar / "data").exists()
        assert (site / "run_1" / "fl_app.txt").read_text() == "seg_mmar\n"
        assert json.loads((site / "local" / "environment.json").read_text()) == {
            "DATA_ROOT": "data",
            "DATASET_JSON": "data/datalist.json",
        }
        datalist = site / "local" / "data" / "datalist.json"
        lists[name] = json.loads(datalist.read_text())
        assert lists[name]["description"].startswith("synthetic")
        assert len(lists[name]["training"]) == SEGMENTATION_DATA["n_train"]
        assert len(lists[name]["validation"]) == SEGMENTATION_DATA["n_validation"]
        first = site / "local" / "data" / lists[name]["training"][0]["image"]
        assert first.is_file() and first.name.endswith(".nii.gz")
    # a different seed per site: the sites' volumes differ
    one, two = (
        (ws / n / "local" / "data" / lists[n]["training"][0]["image"]).read_bytes()
        for n in ("site-1", "site-2")
    )
    assert one != two
    # a second run keeps the data (and a site's own environment file) as they are
    stamp = (ws / "site-1" / "local" / "data" / "datalist.json").stat().st_mtime_ns
    (ws / "site-2" / "local" / "environment.json").write_text('{"DATA_ROOT": "data"}')
    prepare_workspace(ws, num_sites=2, num_rounds=2, task="segmentation")
    assert (ws / "site-1" / "local" / "data" / "datalist.json").stat().st_mtime_ns == stamp
    assert (ws / "site-2" / "local" / "environment.json").read_text() == '{"DATA_ROOT": "data"}'
    # the workspace keeps its MMAR: the classification demo is refused there, saying why
    with pytest.raises(ConfigError, match="runs the MMAR 'seg_mmar', not 'demo_mmar'"):
        prepare_workspace(ws, num_sites=2, num_rounds=2)


def test_any_mmar_is_federated_under_its_own_task_name(tmp_path: Path) -> None:
    mine = Path(shutil.copytree(task_mmar("classification"), tmp_path / "my_mmar"))
    client = json.loads((mine / "config" / "config_fed_client.json").read_text())
    client["servers"][0]["name"] = "liver_seg"
    (mine / "config" / "config_fed_client.json").write_text(json.dumps(client))
    (mine / "config" / "config_fed_server.json").unlink()  # then the demo's server settings
    ws = tmp_path / "demo"
    prepare_workspace(ws, num_sites=2, num_rounds=3, mmar=mine)
    server = json.loads((ws / "server" / "config_fed_server.json").read_text())
    assert server["servers"][0]["name"] == "liver_seg" and server["servers"][0]["num_rounds"] == 3
    for name in ("site-1", "site-2"):
        kit = json.loads((ws / name / "startup" / "fed_client.json").read_text())
        assert [s["name"] for s in kit["servers"]] == ["liver_seg"]
        assert (ws / name / "transfer" / "my_mmar" / "config" / "config_train.json").is_file()
        assert (ws / name / "run_1" / "fl_app.txt").read_text() == "my_mmar\n"
        assert not (ws / name / "local").exists()  # the MMAR's own data settings apply
    assert (ws / "admin" / "transfer" / "my_mmar").is_dir()


def test_an_mmar_that_is_not_one_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = _fltui(
        "demo", "--no-ui", "--workspace", str(tmp_path / "ws"), "--mmar", str(tmp_path / "empty")
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path}/empty/config/config_fed_client.json" in proc.stderr + proc.stdout
    assert "file not found" in proc.stderr + proc.stdout


def test_the_demo_takes_the_task_and_mmar_options() -> None:
    proc = _fltui("demo", "--help", timeout=60)
    assert proc.returncode == 0
    assert "--task {classification,segmentation}" in proc.stdout and "--mmar PATH" in proc.stdout


@pytest.mark.slow
def test_the_dice_of_the_global_model_climbs_in_json_output(tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    proc = _fltui(
        *("demo", "--task", "segmentation", "--no-ui", "--json"),
        *("--sites", "2", "--rounds", "2", "--workspace", str(ws)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1]["event"] == "Notice" and "demo finished" in events[-1]["message"]
    initial = load_npz(ws / "server" / "models" / "initial_model.npz")
    for site in ("site-1", "site-2"):
        rounds = [e for e in events if e["event"] == "RoundCompleted" and e["site"] == site]
        assert [e["round"] for e in rounds] == [1, 2]
        assert all(e["key_metric"] == "val_mean_dice" for e in rounds)
        dice = [e["metrics"]["val_mean_dice"] for e in rounds]
        # The initial model, measured here on the site's own validation volumes (the fitter
        # reads the site's local/environment.json, as the site's worker did).
        fitter = build_fitter(ws / site / "run_1" / f"mmar_{site}", site_name=site, device="cpu")
        start = fitter.validate(initial)["val_mean_dice"]
        # Measured (2 CPU cores): start ~0.13, round 1 ~0.56-0.59, round 2 ~0.63-0.64.
        assert dice[0] > start + 0.2, (start, dice)
        assert dice[1] > dice[0], dice
        assert (ws / site / "run_1" / f"mmar_{site}" / "models" / "best_model.pt").is_file()
    results = json.loads((ws / "server" / "cross_val_results.json").read_text())
    assert all("val_mean_dice" in m for r in results.values() for m in r.values() if m)


def test_the_console_starts_the_demo_service_with_the_task_and_mmar(tmp_path: Path) -> None:
    from fltui.app import create_app  # deferred: textual, for this test only

    app = create_app(
        tmp_path, demo=True, demo_task="segmentation", demo_mmar=tmp_path / "mine", demo_sites=2
    )
    command = app.bridge.launch  # type: ignore[union-attr]
    assert command[command.index("--task") + 1] == "segmentation"
    assert command[command.index("--mmar") + 1] == str(tmp_path / "mine")
    assert command[command.index("--sites") + 1] == "2"


def test_the_runbook_has_a_segmentation_scenario() -> None:
    from fltui.runbook.cli import _only  # deferred: the runbook's modules, for this test only
    from fltui.runbook.scenarios import SCENARIOS  # deferred: as above

    (number,) = _only("segmentation-demo")
    scenario = next(s for s in SCENARIOS if s.number == number)
    assert scenario.task == "segmentation" and scenario.sites == 2


def test_a_demo_of_an_mmar_with_its_own_code_lets_its_sites_run_it(tmp_path: Path) -> None:
    """fltui demo --mmar: a researcher's MMAR with a script under custom/ runs on the demo's
    own sites (their policy says so, and the log says why); other MMARs leave the policy be."""
    from engine.demo import prepare_workspace

    script = Path(__file__).resolve().parents[2] / "docs" / "examples" / "script_mmar"
    prepare_workspace(tmp_path / "script", num_sites=2, num_rounds=1, mmar=script)
    for site in ("site-1", "site-2"):
        policy = tmp_path / "script" / site / "startup" / "site_policy.json"
        assert json.loads(policy.read_text()) == {"allow_byoc": True}
    prepare_workspace(tmp_path / "plain", num_sites=1, num_rounds=1)
    assert not (tmp_path / "plain" / "site-1" / "startup" / "site_policy.json").exists()
