"""Federations run from Clara 3.1-style MMARs and kits: a real server on a loopback port.

Each privacy protocol, a site's own (BYO) components under custom/, the MMAR's gRPC options, a
two-site federation from the fixture MMAR, and the demo federation from its Clara-style MMAR.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import ConfigError, ServerConfig, load_server_config
from engine.events import EventBus, FederationFinished, PrivacyApplied
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.paths import SitePaths
from engine.site.site_engine import SiteEngine
from engine.training import build_fitter
from fltui.check_config import main as check_config
from tests.conftest import Recorder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clara31"


@pytest.fixture
def servers() -> Iterator[list[FederatedServer]]:
    started: list[FederatedServer] = []
    yield started
    for server in started:
        server.stop(grace=0)


def _start(
    servers: list[FederatedServer], tmp_path: Path, config: ServerConfig, mmar: Path
) -> FederatedServer:
    initial = build_fitter(mmar, site_name="server", device="cpu").get_weights()
    server = FederatedServer(config, tmp_path / "server", initial, long_poll=0.5)
    server.start()
    servers.append(server)
    return server


def _site(
    tmp_path: Path,
    name: str,
    port: int,
    mmar: Path,
    variant: str | None = None,
    client: dict[str, Any] | None = None,
    kit_options: list[Any] | None = None,
    mmar_options: list[Any] | None = None,
) -> Path:
    """A site workspace: the Clara kit (this site's name and the server's port) and the MMAR
    deployed as run 1, with ``config_fed_client_w_<variant>.json`` as its client config."""
    root = tmp_path / name
    kit = json.loads((FIXTURES / "startup" / "fed_client.json").read_text())
    kit["client"]["client_name"] = name
    kit["client"]["heartbeat_interval"] = 0.5
    kit["servers"][0]["service"]["target"] = f"127.0.0.1:{port}"
    if kit_options is not None:
        kit["servers"][0]["service"]["options"] = kit_options
    paths = SitePaths(root)
    paths.startup.mkdir(parents=True)
    paths.kit.write_text(json.dumps(kit))
    deployed = Path(shutil.copytree(mmar, paths.mmar(1, name)))
    config_path = deployed / "config" / "config_fed_client.json"
    if variant:
        shutil.copy(deployed / "config" / f"config_fed_client_w_{variant}.json", config_path)
    config = json.loads(config_path.read_text())
    config["client"].update(client or {})
    if mmar_options is not None:
        config["servers"][0]["service"]["options"] = mmar_options
    config_path.write_text(json.dumps(config))
    return root


def _run(engines: list[SiteEngine]) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda e=e: outcomes.__setitem__(e.site, e.run()), daemon=True)
        for e in engines
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


@pytest.mark.parametrize(
    ("variant", "protocol", "low", "high"),
    [
        ("percentile", "PercentileProtocol", 0.15, 0.35),  # about 25 % (percentile 75)
        # at most ceil(0.1 · N) of each tensor: with this small model's few tensors of a few
        # dozen values, rounding up per tensor allows a little over 10 % (22 of 212 was seen)
        ("SVT", "SVTProtocol", 0.0, 0.15),
        ("laplacian", "LaplacianProtocol", 0.0, 0.5),  # fraction 50 = 50 %
    ],
)
def test_each_clara_privacy_config_runs_on_every_upload(
    tmp_path: Path,
    servers: list[FederatedServer],
    variant: str,
    protocol: str,
    low: float,
    high: float,
) -> None:
    mmar = FIXTURES / "mmar"
    config = load_server_config(mmar / "config" / "config_fed_server.json")
    server = _start(
        servers, tmp_path, dataclasses.replace(config, min_num_clients=1, num_rounds=1), mmar
    )
    root = _site(tmp_path, "client1", server.port, mmar, variant)
    bus = EventBus()
    rec = Recorder(bus)
    engine = SiteEngine(root, bus)
    assert engine.run() == "completed"
    assert engine.client is not None and engine.client.communicator.compression == "Gzip"
    [applied] = rec.of(PrivacyApplied)
    assert applied.protocol == protocol and applied.round == 1
    assert low < applied.shared_values / applied.total_values <= high
    assert [h["contributors"] for h in server.history] == [["client1"]]


def test_byo_components_under_custom_run_in_a_federation(
    tmp_path: Path, servers: list[FederatedServer]
) -> None:
    mmar = FIXTURES / "mmar_byo"
    server = _start(
        servers,
        tmp_path,
        ServerConfig(task_name="clara_federation", target="127.0.0.1:0", num_rounds=1),
        mmar,
    )
    root = _site(tmp_path, "client1", server.port, mmar)
    # the site's own code runs only where its policy allows it: refused before any import
    with pytest.raises(ConfigError, match=r"custom code \(custom/BYO_Privacy\.py\)"):
        SiteEngine(root, EventBus())
    assert "BYO_Privacy" not in sys.modules
    (root / "startup" / "site_policy.json").write_text('{"allow_byoc": true}')
    bus = EventBus()
    rec = Recorder(bus)
    engine = SiteEngine(root, bus)
    assert engine.run() == "completed"
    # the site's own privacy protocol (custom/BYO_Privacy.py), with T = steps_aggregation
    assert sys.modules["BYO_Privacy"].CALLS == [3]
    assert [e.protocol for e in rec.of(PrivacyApplied)] == ["MyPrivacyProtocol"]
    # its own pre-processor saw the update going out
    [(field, value, names)] = sys.modules["byo_processors"].SEEN
    assert (field, value) == ("site_tag", 42)
    # its own network: the server aggregated TwoLayerNet's variables
    assert (
        names
        == sorted(server.global_model)
        == [
            "hidden.bias",
            "hidden.weight",
            "out.bias",
            "out.weight",
        ]
    )


def test_the_mmar_grpc_options_reach_the_channel_and_the_kit_wins(
    tmp_path: Path, servers: list[FederatedServer]
) -> None:
    mmar = FIXTURES / "mmar"
    config = load_server_config(mmar / "config" / "config_fed_server.json")
    config = dataclasses.replace(config, min_num_clients=1, num_rounds=1)
    server = _start(servers, tmp_path / "a", config, mmar)
    tiny = [["grpc.max_send_message_length", 300]]
    # the MMAR limits what the site may send: its update (about 1 KB) is refused by gRPC itself
    root = _site(tmp_path / "a", "client1", server.port, mmar, kit_options=[], mmar_options=tiny)
    bus = EventBus()
    rec = Recorder(bus)
    assert SiteEngine(root, bus).run() == "failed"
    [finished] = rec.of(FederationFinished)
    assert "larger than max" in finished.detail and "300" in finished.detail
    # the same option in the startup kit wins over the MMAR's
    server = _start(servers, tmp_path / "b", config, mmar)
    root = _site(
        tmp_path / "b",
        "client1",
        server.port,
        mmar,
        kit_options=[["grpc.max_send_message_length", 10_000_000]],
        mmar_options=tiny,
    )
    assert SiteEngine(root, EventBus()).run() == "completed"


def test_a_two_site_federation_from_the_clara_mmar(
    tmp_path: Path, servers: list[FederatedServer]
) -> None:
    mmar = FIXTURES / "mmar"
    config = load_server_config(mmar / "config" / "config_fed_server.json")
    server = _start(servers, tmp_path, config, mmar)
    initial = {k: v.copy() for k, v in server.global_model.items()}
    engines = [
        SiteEngine(_site(tmp_path, name, server.port, mmar, "percentile"), EventBus())
        for name in ("client1", "client2")
    ]
    assert _run(engines) == {"client1": "completed", "client2": "completed"}
    assert server.finished and len(server.history) == 2
    assert all(sorted(h["contributors"]) == ["client1", "client2"] for h in server.history)
    # the aggregator's exclude_vars (from config_fed_server.json): never updated by the server
    np.testing.assert_array_equal(server.global_model["net.2.bias"], initial["net.2.bias"])
    assert not np.array_equal(server.global_model["net.0.weight"], initial["net.0.weight"])
    for engine in engines:
        # environment.json: the datalist under DATA_ROOT, checkpoints and eval output
        assert len(engine.fitter._train_loader.dataset) == 32
        assert (engine.mmar / "models" / "best_model.pt").is_file()
        metrics = json.loads((engine.mmar / "eval" / "validation_metrics.json").read_text())
        assert metrics["site"] == engine.site and "accuracy" in metrics["metrics"]
        assert engine.fitter.n_iter == 4  # steps_aggregation


def test_the_demo_federation_runs_from_its_clara_style_mmar(
    tmp_path: Path, servers: list[FederatedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.demo import _set_port, prepare_workspace

    prepare_workspace(tmp_path, num_sites=2, num_rounds=2, heartbeat_interval=0.5)
    config = load_server_config(tmp_path / "server" / "config_fed_server.json")
    # the server's settings come from the demo MMAR's Clara 3.1 config_fed_server.json
    assert config.num_server_workers == 64 and config.exclude_vars == "dummy"
    server = FederatedServer(
        config,
        tmp_path / "server",
        load_npz(tmp_path / "server" / "models" / "initial_model.npz"),
        long_poll=0.5,
    )
    servers.append(server)
    port = server.start()
    engines = []
    for name in ("site-1", "site-2"):
        paths = SitePaths(tmp_path / name)
        _set_port(paths.kit, port)
        # the deployed MMAR is Clara-style, and check-config says so
        assert check_config([str(paths.root)]) == 0, capsys.readouterr().out
        cfg_path = paths.mmar(1, name) / "config" / "config_fed_client.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["client"].update({"steps_aggregation": 10, "cross_site_validate": False})
        cfg_path.write_text(json.dumps(cfg))
        engines.append(SiteEngine(paths.root, EventBus()))
    assert _run(engines) == {"site-1": "completed", "site-2": "completed"}
    assert server.finished and len(server.history) == 2
    for engine in engines:
        assert (engine.mmar / "eval" / "validation_metrics.json").is_file()
        assert (engine.mmar / "models" / "best_model.pt").is_file()


def test_a_tensorflow_mmar_is_refused_before_anything_starts_and_kit_topics_are_served(
    tmp_path: Path,
) -> None:
    from engine.admin_defs import Topic
    from engine.config import ConfigProblems
    from engine.site.site_service import SiteService

    # port 9 (discard): nothing may be contacted before the configs are found wrong
    root = _site(tmp_path, "client1", 9, FIXTURES / "mmar")
    shutil.rmtree(SitePaths(root).mmar(1, "client1"))
    shutil.copytree(FIXTURES / "mmar_tf", SitePaths(root).mmar(1, "client1"))
    service = SiteService(root, EventBus(), executor="thread")
    try:
        # Clara's ten request processors from the kit: start_mgpu is not among them
        assert Topic.START in service.agent.processors
        assert Topic.START_MGPU not in service.agent.processors
        with pytest.raises(ConfigProblems) as err:
            service.run(auto_start=True)
        assert "TFModelReaderWriter is a TensorFlow-only component" in str(err.value)
        assert not (root / "client_token.txt").exists()  # no worker was started
    finally:
        service.sender.close()
        service.session.communicator.close()
