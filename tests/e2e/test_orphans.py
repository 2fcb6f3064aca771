"""A worker whose site service is killed (even by SIGKILL) stops: no orphan keeps training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import load_server_config
from engine.demo import _set_port, prepare_workspace
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.paths import SitePaths

ROOT = Path(__file__).resolve().parents[2]


def _workers(workspace: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if b"engine.site.worker" in cmd and str(workspace).encode() in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_killing_the_site_service_stops_its_worker(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=500)
    server = FederatedServer(
        load_server_config(tmp_path / "server" / "config_fed_server.json"),
        tmp_path / "server",
        load_npz(tmp_path / "server" / "models" / "initial_model.npz"),
        long_poll=0.5,
    )
    port = server.start("127.0.0.1:0")
    site = tmp_path / "site-1"
    _set_port(SitePaths(site).kit, port)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fltui", "--no-ui", "--workspace", str(site)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _workers(site) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers(site)
        assert workers, "the worker never started"
        deadline = time.monotonic() + 60
        while server.current_round < 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # it is training for real
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _workers(site) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _workers(site), f"worker {workers} outlived its site service"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _workers(site):
            os.kill(pid, signal.SIGKILL)
        server.stop(grace=0)
