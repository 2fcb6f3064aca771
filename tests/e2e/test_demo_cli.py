"""`fltui demo --no-ui` as an operator runs it: real processes, real server, real training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2", "site-3"]


def _fltui(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
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


@pytest.mark.slow
def test_demo_json_runs_the_federation_and_keeps_every_file(tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    proc = _fltui("demo", "--no-ui", "--json", "--workspace", str(ws), "--rounds", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all("event" in e for e in events)
    names = {e["event"] for e in events}
    assert {
        "StatusChanged",
        "RoundStarted",
        "PhaseChanged",
        "ProgressUpdated",
        "MetricsReported",
        "RoundCompleted",
        "ModelTransferred",
        "ConnectionChanged",
        "FederationFinished",
        "ServerRoundAggregated",
        "LogRecord",
    } <= names
    for site in SITES:
        rounds = [e for e in events if e["event"] == "RoundCompleted" and e["site"] == site]
        assert [e["round"] for e in rounds] == [1, 2, 3]
        assert rounds[-1]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"] + 0.1
        finished = [e for e in events if e["event"] == "FederationFinished" and e["site"] == site]
        assert [e["outcome"] for e in finished] == ["completed"]
    assert events[-1]["event"] == "Notice" and "demo finished" in events[-1]["message"]
    # everything the federation wrote is under the workspace
    server = ws / "server"
    for path in (
        "config_fed_server.json",
        "state.json",
        "models/global_model.npz",
        "models/initial_model.npz",
        "cross_val_results.json",
        "logs/fltui.log",
        "logs/events.jsonl",
    ):
        assert (server / path).is_file(), path
    state = json.loads((server / "state.json").read_text())
    assert state["finished"] and state["current_round"] == 3
    results = json.loads((server / "cross_val_results.json").read_text())
    assert set(results) == set(SITES)
    assert all(set(results[s]) == {*SITES, "server"} for s in SITES)
    for site in SITES:
        root = ws / site
        assert (root / "startup" / "fed_client.json").is_file()
        assert (root / "transfer" / "demo_mmar" / "config" / "config_train.json").is_file()
        assert (root / "run_1" / f"mmar_{site}" / "models" / "best_model.pt").is_file()
        lines = (root / "logs" / "events.jsonl").read_text().splitlines()
        assert any(json.loads(line)["event"] == "FederationFinished" for line in lines)
        assert "registered" in (root / "logs" / "fltui.log").read_text()


@pytest.mark.slow
def test_demo_human_output_without_workspace_says_where_it_went() -> None:
    proc = _fltui("demo", "--no-ui", "--rounds", "1", "--sites", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("demo workspace: ")
    ws = Path(first.split(": ", 1)[1])
    assert (ws / "server" / "state.json").is_file() and (
        ws / "site-2" / "logs" / "events.jsonl"
    ).is_file()
    assert "round 1/1 completed: global accuracy=" in proc.stdout
    assert "federation completed after 1 rounds" in proc.stdout
    assert not proc.stdout.lstrip().startswith("{")


def test_site_without_a_startup_kit_is_a_clear_config_error(tmp_path: Path) -> None:
    proc = _fltui("--no-ui", "--workspace", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert f"{tmp_path}/startup/fed_client.json: file not found" in proc.stderr


def test_site_without_a_deployed_mmar_says_deploy_first(tmp_path: Path) -> None:
    (tmp_path / "startup").mkdir()
    (tmp_path / "startup" / "fed_client.json").write_text(
        json.dumps(
            {
                "servers": [{"name": "t", "service": {"target": "127.0.0.1:9"}}],
                "client": {"client_name": "site-9"},
            }
        )
    )
    proc = _fltui("--no-ui", "--workspace", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "no deployed MMAR" in proc.stderr and "deploy one first" in proc.stderr


def test_server_unreachable_exits_1_with_the_reason(tmp_path: Path) -> None:
    import shutil
    import socket

    from engine.training import demo_mmar_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "startup").mkdir()
    (tmp_path / "startup" / "fed_client.json").write_text(
        json.dumps(
            {
                "servers": [
                    {"name": "demo_federation", "service": {"target": f"127.0.0.1:{port}"}}
                ],
                "client": {"client_name": "site-9", "retry_timeout": 1},
            }
        )
    )
    shutil.copytree(demo_mmar_path(), tmp_path / "run_1" / "mmar_site-9")
    cfg = tmp_path / "run_1" / "mmar_site-9" / "config" / "config_fed_client.json"
    data = json.loads(cfg.read_text())
    data["client"]["retry_timeout"] = 1
    cfg.write_text(json.dumps(data))
    proc = _fltui("--no-ui", "--workspace", str(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "status: training exception (gave up after" in proc.stdout
    assert "federation failed" in proc.stdout


@pytest.mark.slow
def test_fltui_server_and_a_site_as_separate_commands(tmp_path: Path) -> None:
    """An operator's own small federation: `fltui server` and `fltui --no-ui` for one site."""
    import re
    import threading

    from engine.demo import _set_port, prepare_workspace

    prepare_workspace(tmp_path, num_sites=1, num_rounds=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fltui",
            "server",
            "--no-ui",
            "--workspace",
            str(tmp_path / "server"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        lines: list[str] = []
        port = None
        for line in server.stdout:
            lines.append(line)
            if m := re.search(r"server listening on port (\d+)", line):
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.extend(server.stdout), daemon=True)
        reader.start()
        _set_port(tmp_path / "site-1" / "startup" / "fed_client.json", port)
        site = _fltui("--no-ui", "--workspace", str(tmp_path / "site-1"))
        assert site.returncode == 0, site.stdout[-3000:] + site.stderr[-2000:]
        assert "round 2/2 completed" in site.stdout
        assert server.wait(timeout=60) == 0
        reader.join(timeout=5)
        assert "round 2/2 aggregated from site-1" in "".join(rest)
    finally:
        if server.poll() is None:
            server.kill()
