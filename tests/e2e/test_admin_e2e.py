"""The admin drives two real sites through `fltui admin`: deploy → validate → delete."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.demo import _set_admin_port, _set_port, prepare_workspace
from engine.site.paths import SitePaths

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SITES = ["site-1", "site-2"]


def _admin(ws: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fltui", "admin", "--workspace", str(ws / "admin"), *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )


def _until(ws: Path, words: list[str], pattern: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _admin(ws, *words).stdout
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{' '.join(words)}: no {pattern!r} within {timeout} s; last: {text}")


@pytest.mark.slow
def test_admin_deploys_starts_aborts_restarts_validates_and_deletes(tmp_path: Path) -> None:
    ws = tmp_path
    prepare_workspace(ws, num_sites=2, num_rounds=3, heartbeat_interval=1)
    cfg = ws / "admin" / "transfer" / "demo_mmar" / "config" / "config_fed_client.json"
    data = json.loads(cfg.read_text())
    data["client"]["steps_aggregation"] = 1500  # rounds of seconds: long enough to abort one
    cfg.write_text(json.dumps(data))
    server = subprocess.Popen(
        [sys.executable, "-m", "fltui", "server", "--no-ui", "--workspace", str(ws / "server")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    sites: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        port = None
        for line in server.stdout:
            if m := re.search(r"server listening on port (\d+)", line):
                port = int(m.group(1))
                break
        assert port
        threading.Thread(target=server.stdout.read, daemon=True).start()
        _set_admin_port(ws / "admin", port)
        for name in SITES:
            _set_port(SitePaths(ws / name).kit, port)
            sites.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fltui",
                        "--no-ui",
                        "--serve",
                        "--workspace",
                        str(ws / name),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=ENV,
                )
            )
        _until(ws, ["check_status", "server"], r"sites: site-1, site-2")

        assert _admin(ws, "set_run_number", "2").returncode == 0
        deploy = _admin(ws, "deploy", "demo_mmar", "client", "all")
        assert deploy.returncode == 0, deploy.stdout
        for name in SITES:
            assert (ws / name / "run_2" / f"mmar_{name}" / "config" / "config_train.json").is_file()

        start = _admin(ws, "start", "client", "all")
        assert start.returncode == 0 and start.stdout.count("Start the client app") == 2
        status = _until(
            ws, ["check_status", "client", "site-1"], r"status: training started.*worker pid: \d+"
        )
        pid = int(re.search(r"worker pid: (\d+)", status).group(1))
        # once the worker reports steps it is connected: check_status is now answered by the
        # worker itself
        events = ws / "site-1" / "logs" / "events.jsonl"
        deadline = time.monotonic() + 120
        while '"ProgressUpdated"' not in (events.read_text() if events.exists() else ""):
            assert time.monotonic() < deadline, "site-1's worker reported no training step"
            time.sleep(0.2)
        assert "status: training started" in _admin(ws, "check_status", "client", "site-1").stdout

        abort = _admin(ws, "abort", "client", "site-1")
        assert abort.returncode == 0 and "training aborted" in abort.stdout, abort.stdout
        assert "worker stopped after the abort command" in abort.stdout, abort.stdout  # no SIGTERM
        # the worker answered check_status without an error (a broken reply killed its command
        # thread once, with a traceback in its log, and check_status fell back after 2 s)
        worker_log = (ws / "site-1" / "logs" / "worker.log").read_text()
        assert "Traceback" not in worker_log, worker_log[-3000:]
        assert "status: training stopped" in _admin(ws, "check_status", "client", "site-1").stdout
        assert not Path(f"/proc/{pid}").exists(), "the aborted worker is still there"

        again = _admin(ws, "start", "client", "site-1")
        assert again.returncode == 0, again.stdout
        _until(ws, ["check_status", "server"], r"\(finished\)", timeout=240)
        for name in SITES:
            _until(ws, ["check_status", "client", name], r"status: training stopped", timeout=120)

        validate = _admin(ws, "--json", "validate", "all")
        assert validate.returncode == 0, validate.stdout
        matrix = json.loads(validate.stdout)
        assert set(matrix) == set(SITES)
        for name in SITES:
            assert set(matrix[name]) == {"site-1", "site-2", "server"}
            assert all("accuracy" in m for m in matrix[name].values())

        shell = _admin(ws, "tail", "site-2", "-n", "3", "logs/audit.jsonl")
        assert shell.returncode == 0 and '"origin": "admin@demo"' in shell.stdout
        refused = _admin(ws, "cat", "site-2", "../../etc/passwd")
        assert refused.returncode == 1 and "refused" in refused.stdout

        delete = _admin(ws, "delete_run_number", "2")
        assert delete.returncode == 0, delete.stdout
        assert not (ws / "site-1" / "run_2").exists()

        restart = _admin(ws, "restart", "client", "site-2")
        assert restart.returncode == 0 and "Restart the client" in restart.stdout
        _until(ws, ["check_status", "client", "site-2"], r"site-2: client name: site-2")
        assert sites[1].poll() is None  # the same process, a fresh engine and session

        assert _admin(ws, "shutdown", "client", "all").returncode == 0
        for proc in sites:
            assert proc.wait(timeout=60) == 0
        assert server.wait(timeout=60) == 0
        audit = [
            json.loads(line)
            for line in (ws / "site-1" / "logs" / "audit.jsonl").read_text().splitlines()
        ]
        topics = [a["topic"] for a in audit]
        for topic in (
            "train.deploy",
            "train.start",
            "train.check_status",
            "train.abort",
            "validate",
            "train.delete_run",
            "train.shutdown",
        ):
            assert topic in topics, topics
    finally:
        for proc in [*sites, server]:
            if proc.poll() is None:
                proc.kill()
