"""Multi-GPU training on CPU: two gloo ranks in one process group finish a round."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.config import ServerConfig
from engine.demo import _set_port, prepare_workspace
from engine.events import EventBus, FederationFinished
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.paths import SitePaths
from engine.site.site_service import SiteService
from tests.conftest import Recorder


@pytest.mark.slow
def test_two_gloo_ranks_finish_a_round_with_the_one_rank_shapes(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    initial = load_npz(tmp_path / "server" / "models" / "initial_model.npz")
    server = FederatedServer(
        ServerConfig(task_name="demo_federation", target="127.0.0.1:0", num_rounds=1),
        tmp_path / "server",
        initial,
        long_poll=0.5,
    )
    port = server.start()
    paths = SitePaths(tmp_path / "site-1")
    _set_port(paths.kit, port)
    cfg_path = paths.mmar(1, "site-1") / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["client"].update({"steps_aggregation": 10, "cross_site_validate": False})
    cfg_path.write_text(json.dumps(cfg))
    bus = EventBus()
    rec = Recorder(bus)
    service = SiteService(tmp_path / "site-1", bus)
    service.executor.extra_env["OMP_NUM_THREADS"] = "1"
    try:
        service.session.register()
        reply = service.interface.start_mgpu_client(1, 2)
        assert "2 GPU rank(s)" in reply
        pids = [p.pid for p in service.executor._procs]
        assert len(pids) == 2
        assert service.executor.wait_process_complete(service.session, timeout=180)
        assert service.executor.outcome == "completed"
    finally:
        service.stop()
        server.stop(grace=0)
    assert server.finished and server.history[0]["contributors"] == ["site-1"]
    for name, value in initial.items():
        got = server.global_model[name]
        assert got.shape == value.shape and got.dtype == value.dtype
    assert not np.array_equal(server.global_model["net.0.weight"], initial["net.0.weight"])
    assert [e.outcome for e in rec.of(FederationFinished)] == ["completed"]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
