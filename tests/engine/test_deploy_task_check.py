"""Deploy checks what start would find: the MMAR's task must be the kit's federation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.config import ConfigError, load_client_kit
from engine.site.deploy import DeployError, deploy_mmar, make_mmar_zip
from engine.site.paths import SitePaths
from engine.site.site_engine import check_mmar
from engine.training import demo_mmar_path
from fltui.check_config import main as check_config


def _site(tmp_path: Path, task: str) -> tuple[Path, Path]:
    """A site workspace (its kit's federation ``demo_federation``) and an MMAR for ``task``."""
    ws = tmp_path / "site-1"
    (ws / "startup").mkdir(parents=True)
    (ws / "startup" / "fed_client.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "servers": [{"name": "demo_federation", "service": {"target": "127.0.0.1:1"}}],
                "client": {"client_name": "site-1", "secure_train": False},
            }
        )
    )
    mmar = tmp_path / "mmar"
    shutil.copytree(demo_mmar_path(), mmar)
    cfg = mmar / "config" / "config_fed_client.json"
    data = json.loads(cfg.read_text())
    data["servers"][0]["name"] = task
    cfg.write_text(json.dumps(data))
    return ws, mmar


def test_deploy_refuses_an_mmar_of_another_federation(tmp_path: Path) -> None:
    ws, mmar = _site(tmp_path, "other_federation")
    kit = load_client_kit(SitePaths(ws).kit)
    with pytest.raises(ConfigError, match="'other_federation' is not served"):
        check_mmar(mmar, kit)
    with pytest.raises(DeployError, match=r"cannot run on this site.*servers\[0\].name"):
        deploy_mmar(
            make_mmar_zip(mmar),
            ws,
            1,
            "site-1",
            max_bytes=1 << 30,
            allow_byoc=False,
            check=lambda tree: check_mmar(tree, kit),
        )
    assert not SitePaths(ws).run_dir(1).exists()  # nothing was written


def test_check_config_checks_the_kit_and_mmar_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, mmar = _site(tmp_path, "other_federation")
    assert check_config([str(ws / "startup"), str(mmar)]) == 1
    out = capsys.readouterr().out
    assert "servers[0].name" in out and "other_federation" in out
    ws2, good = _site(tmp_path / "good", "demo_federation")
    assert check_config([str(ws2), str(good)]) == 0, capsys.readouterr().out
    assert check_config([str(ws2), str(tmp_path / "nothing")]) == 2
