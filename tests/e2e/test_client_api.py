"""A research team's own script, federated through fltui.client: real script processes, a real
server on a loopback port, the site engine that a training worker runs.

Two sites train two rounds; a script that raises, one that never asks for the model, an abort
while the script sends, cross-site validation through ``is_evaluate()``, and two gloo ranks of
which only rank 0 talks to the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import ConfigError, ServerConfig, load_mmar_client_config
from engine.events import (
    CrossSiteValidated,
    EventBus,
    FederationFinished,
    MetricsReported,
    ProgressUpdated,
    RoundCompleted,
)
from engine.procs import pid_alive
from engine.server import FederatedServer
from engine.site.site_engine import SiteEngine, check_mmar
from engine.site.site_service import SiteService
from engine.training.initial_model import initial_weights
from tests.conftest import Recorder
from tests.engine.test_clara_federation import _run, _site, servers  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
TASK = "clara_federation"  # the task of the Clara kit fixture that _site writes

# What every test script starts with: a tiny model and data, and the five lines' module.
PRELUDE = """\
import json, os, sys, time
import torch
from torch import nn
import fltui.client as flc

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(2, 3))
x = torch.randn(64, 2, generator=torch.Generator().manual_seed(len(flc.site_name())))
y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()

def accuracy():
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())

def train(steps=4):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        flc.progress(step, steps, loss=loss.item())
    flc.log({"train_loss": loss.item()}, step=1)
    return steps
"""

# The loop with the five lines, answering evaluation tasks too.
LOOP = """\
flc.init()
env = {k: v for k, v in os.environ.items() if k.startswith(("FLTUI", "MASTER", "RANK"))}
json.dump(env, open("script_env.json", "w"))
tasks = []
while flc.is_running():
    model = flc.receive()
    net.load_state_dict(model.params)
    tasks.append([model.task, model.current_round, model.total_rounds])
    if flc.is_evaluate():
        flc.send(metrics={"accuracy": accuracy()})
        continue
    steps = train()
    flc.send(net.state_dict(), n_iter=steps, metrics={"accuracy": accuracy()})
json.dump(tasks, open("tasks.json", "w"))
"""


def _mmar(folder: Path, code: str, **client: Any) -> Path:
    """A script MMAR: config_fed_client.json naming custom/train.py, the initial model."""
    import torch  # deferred: the test's own model file

    (folder / "config").mkdir(parents=True)
    (folder / "custom").mkdir()
    (folder / "models").mkdir()
    config = {
        "servers": [{"name": TASK}],
        "client": {
            "script": "custom/train.py",
            "script_timeout": 60,
            "cross_site_validate": False,
            "privacy": {},
            **client,
        },
    }
    (folder / "config" / "config_fed_client.json").write_text(json.dumps(config))
    (folder / "config" / "environment.json").write_text(
        json.dumps({"PRETRAIN_WEIGHTS_FILE": "models/initial_model.pt", "MMAR_CKPT_DIR": "models"})
    )
    torch.manual_seed(1)
    torch.save(
        torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict(),
        folder / "models" / "initial_model.pt",
    )
    (folder / "custom" / "train.py").write_text(code)
    return folder


def _federation(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
    script: str,
    sites: tuple[str, ...] = ("site-1",),
    rounds: int = 1,
    **client: Any,
) -> tuple[FederatedServer, list[SiteEngine], list[Recorder]]:
    mmar = _mmar(tmp_path / "template", script, **client)
    config = ServerConfig(
        task_name=TASK, target="127.0.0.1:0", num_rounds=rounds, min_num_clients=len(sites)
    )
    server = FederatedServer(config, tmp_path / "server", initial_weights(mmar), long_poll=0.5)
    server.start()
    servers.append(server)
    engines, recorders = [], []
    for name in sites:
        root = _site(tmp_path, name, server.port, mmar)
        # a script is the MMAR's own code: it runs only where the site policy allows BYOC
        (root / "startup" / "site_policy.json").write_text(json.dumps({"allow_byoc": True}))
        bus = EventBus()
        recorders.append(Recorder(bus))
        engines.append(SiteEngine(root, bus))
    return server, engines, recorders


def test_a_script_trains_two_rounds_with_two_sites_and_validates_across_sites(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    server, engines, recorders = _federation(
        tmp_path, servers, PRELUDE + LOOP, ("site-1", "site-2"), 2, cross_site_validate=True
    )
    initial = dict(server.global_model)
    assert _run(engines) == {"site-1": "completed", "site-2": "completed"}
    assert server.finished and len(server.history) == 2
    assert all(sorted(h["contributors"]) == ["site-1", "site-2"] for h in server.history)
    assert not np.array_equal(server.global_model["0.weight"], initial["0.weight"])
    for engine, rec in zip(engines, recorders, strict=True):
        mmar = engine.mmar
        # round 1 trains the initial model; each new global model is evaluated, then trained;
        # the final one is evaluated, then the server's and the two sites' best models
        tasks = json.loads((mmar / "tasks.json").read_text())
        assert tasks[:3] == [["train", 0, 2], ["evaluate", 1, 2], ["train", 1, 2]]
        cross = rec.of(CrossSiteValidated)
        assert [t[0] for t in tasks[3:]] == ["evaluate"] * (1 + len(cross)), (tasks, cross)
        # the script's log() and progress() are the site's events
        assert [r.round for r in rec.of(RoundCompleted)] == [1, 2]
        assert all(r.key_metric == "accuracy" for r in rec.of(RoundCompleted))
        assert all("accuracy" in r.metrics for r in rec.of(RoundCompleted))
        trained = [m for m in rec.of(MetricsReported) if m.scope == "train"]
        assert [m.round for m in trained] == [1, 2] and "train_loss" in trained[0].metrics
        assert any(p.step == p.total_steps == 4 for p in rec.of(ProgressUpdated))
        assert sorted(c.model_owner for c in cross) == ["server", "site-1", "site-2"]
        assert all("accuracy" in c.metrics for c in cross)
        assert engine.fitter.n_iter == 4
        assert (mmar / "models" / "best_model.pt").is_file()
        # the script saw a loopback address and its site's name, never the server or a token
        env = json.loads((mmar / "script_env.json").read_text())
        assert sorted(env) == [
            "FLTUI_CLIENT_ADDRESS",
            "FLTUI_SITE_NAME",
            "MASTER_ADDR",
            "MASTER_PORT",
            "RANK",
        ]
        assert env["FLTUI_CLIENT_ADDRESS"].startswith("127.0.0.1:")
        assert str(server.port) not in env["FLTUI_CLIENT_ADDRESS"].split(":")[1:]
        assert engine.fitter.pid is None  # the script ended with the run


def _finished(rec: Recorder) -> FederationFinished:
    [finished] = rec.of(FederationFinished)
    return finished


def test_a_script_that_raises_fails_the_run_with_its_file_and_line(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = PRELUDE + textwrap.dedent(
        """\
        def step(model):
            net.load_state_dict(model.params)
            raise ValueError("boom in the loop")

        flc.init()
        while flc.is_running():
            step(flc.receive())
        """
    )
    line = script.splitlines().index('    raise ValueError("boom in the loop")') + 1
    server, [engine], [rec] = _federation(tmp_path, servers, script)
    assert engine.run() == "failed"
    detail = _finished(rec).detail
    assert f"custom/train.py failed at custom/train.py:{line} (in step)" in detail
    assert "ValueError: boom in the loop (exit code 1)" in detail
    # the whole traceback is in the run's log; nothing reached the server
    assert any("Traceback (most recent call last)" in r.getMessage() for r in caplog.records)
    assert server.history == [] and not server._round.contributions


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("flc.init()\ntime.sleep(60)\n", "did not ask for round 1's model within 2 s"),
        ("time.sleep(60)\n", "did not connect within 2 s"),
    ],
)
def test_a_script_that_never_asks_for_the_model_times_out(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
    body: str,
    expected: str,
) -> None:
    script = "import time\nimport fltui.client as flc\n" + body
    server, [engine], [rec] = _federation(tmp_path, servers, script, script_timeout=2)
    started = time.monotonic()
    assert engine.run() == "failed"
    assert time.monotonic() - started < 20
    detail = _finished(rec).detail
    assert f"custom/train.py {expected}" in detail
    assert "script_timeout in" in detail and "config_fed_client.json" in detail
    assert engine.fitter.pid is None and server.history == []


def test_abort_while_the_script_sends_takes_nothing_and_the_script_ends_cleanly(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    script = PRELUDE + textwrap.dedent(
        """\
        flc.init()
        while flc.is_running():
            net.load_state_dict(flc.receive().params)
            steps = train()  # its last progress() is the moment the site aborts
            flc.send(net.state_dict(), n_iter=steps)
            open("after_send.txt", "w").write(f"is_running={flc.is_running()}")
        """
    )
    server, [engine], [rec] = _federation(tmp_path, servers, script, rounds=2)

    def abort_at_the_last_step(event: Any) -> None:
        if isinstance(event, ProgressUpdated) and event.step == event.total_steps:
            engine.abort()

    engine.bus.subscribe(abort_at_the_last_step)
    assert engine.run() == "aborted"
    assert _finished(rec).outcome == "aborted"
    assert server.history == [] and not server._round.contributions
    # send() came back, is_running() turned false, and the script ended by itself
    assert (engine.mmar / "after_send.txt").read_text() == "is_running=False"
    assert engine.fitter.pid is None


def test_a_script_that_ignores_the_abort_is_ended_after_the_grace(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    script = textwrap.dedent(
        """\
        import signal, time
        import fltui.client as flc
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # deaf to SIGTERM too
        flc.receive()
        open("received.txt", "w").write("yes")
        while True:
            time.sleep(0.1)  # never asks is_running()
        """
    )
    _, [engine], _ = _federation(tmp_path, servers, script)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(engine.run()), daemon=True)
    thread.start()
    received = engine.mmar / "received.txt"
    deadline = time.monotonic() + 60
    while not received.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = engine.fitter.pid
    assert pid is not None and received.exists()
    started = time.monotonic()
    engine.abort()
    thread.join(30)
    assert outcome == ["aborted"]
    assert time.monotonic() - started < 10  # the grace, SIGTERM ignored, then SIGKILL
    assert not pid_alive(pid)


# A script run as two ranks: rank 0 talks to the worker and broadcasts; both train with DDP.
RANKS = """\
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank = dist.get_rank()
flc.init()
env = {k: v for k, v in os.environ.items() if k.startswith(("FLTUI", "MASTER", "RANK", "WORLD"))}
seen = []
while flc.is_running():
    model = flc.receive()
    net.load_state_dict(model.params)
    total = float(sum(p.sum() for p in model.params.values()))
    seen.append([model.task, model.current_round, total])
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(1, 4):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
        opt.step()
        flc.progress(step, 3)
    flc.send(net.state_dict(), n_iter=3 * dist.get_world_size())
final = float(sum(p.sum() for p in net.state_dict().values()))
json.dump({"env": env, "seen": seen, "final": final}, open(f"rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_train_and_only_rank_0_talks_to_the_worker(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    server, [engine], _ = _federation(tmp_path, servers, PRELUDE + RANKS, rounds=2)
    engine.distributed(0, 2)  # as the executor's rank 0 of start_mgpu 2
    assert engine.run() == "completed"
    assert [h["contributors"] for h in server.history] == [["site-1"], ["site-1"]]
    assert engine.fitter.n_iter == 6  # as rank 0 sent it for both ranks
    ranks = [json.loads((engine.mmar / f"rank{r}.json").read_text()) for r in (0, 1)]
    # both ranks got the same models each round (rank 0's broadcast) and ended equal (DDP)
    assert ranks[0]["seen"] == ranks[1]["seen"] and len(ranks[0]["seen"]) == 2
    assert ranks[0]["final"] == pytest.approx(ranks[1]["final"])
    # only rank 0 was told where the worker listens; both were told torchrun's variables
    assert "FLTUI_CLIENT_ADDRESS" in ranks[0]["env"]
    assert not any(k.startswith("FLTUI_CLIENT") for k in ranks[1]["env"])
    for r, seen in enumerate(ranks):
        assert seen["env"]["RANK"] == str(r) and seen["env"]["WORLD_SIZE"] == "2"
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"]


@pytest.mark.slow
def test_the_site_service_runs_a_script_on_two_ranks_with_start_mgpu(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    """The executor's two worker ranks: rank 0 starts both script ranks, rank 1 has nothing to
    do; no process of the run is left afterwards."""
    server, [engine], _ = _federation(tmp_path, servers, PRELUDE + RANKS, rounds=1)
    bus = EventBus()
    rec = Recorder(bus)
    service = SiteService(engine.paths.root, bus)
    service.executor.extra_env["OMP_NUM_THREADS"] = "1"
    try:
        service.session.register()
        assert "2 GPU rank(s)" in service.interface.start_mgpu_client(1, 2)
        workers = [p.pid for p in service.executor._procs]
        assert service.executor.wait_process_complete(service.session, timeout=180)
        assert service.executor.outcome == "completed", (
            engine.paths.root / "logs" / "worker.log"
        ).read_text()
    finally:
        service.stop()
    assert server.finished and server.history[0]["contributors"] == ["site-1"]
    assert [e.outcome for e in rec.of(FederationFinished)] == ["completed"]
    ranks = [json.loads((engine.mmar / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seen"] == ranks[1]["seen"]
    assert not any(k.startswith("FLTUI_CLIENT") for k in ranks[1]["env"])
    assert not any(pid_alive(pid) for pid in workers)


@pytest.mark.slow
def test_the_example_mmar_federates_its_plain_loop(
    tmp_path: Path,
    servers: list[FederatedServer],  # noqa: F811
) -> None:
    """docs/examples/script_mmar (what ``fltui demo --mmar`` runs), two sites, one round."""
    mmar = Path(shutil.copytree(ROOT / "docs" / "examples" / "script_mmar", tmp_path / "example"))
    config_path = mmar / "config" / "config_fed_client.json"
    config = json.loads(config_path.read_text())
    config["servers"][0]["name"] = TASK
    config["client"]["script_args"] = ["--epochs", "1"]
    config_path.write_text(json.dumps(config))
    check_mmar(mmar)
    server = FederatedServer(
        ServerConfig(task_name=TASK, target="127.0.0.1:0", num_rounds=1, min_num_clients=2),
        tmp_path / "server",
        initial_weights(mmar),
        long_poll=0.5,
    )
    server.start()
    servers.append(server)
    engines, recorders = [], []
    for name in ("site-1", "site-2"):
        root = _site(tmp_path, name, server.port, mmar)
        (root / "startup" / "site_policy.json").write_text(json.dumps({"allow_byoc": True}))
        bus = EventBus()
        recorders.append(Recorder(bus))
        engines.append(SiteEngine(root, bus))
    assert _run(engines) == {"site-1": "completed", "site-2": "completed"}
    for rec in recorders:
        [completed] = rec.of(RoundCompleted)
        assert completed.key_metric == "accuracy" and completed.metrics["accuracy"] > 0.5
        assert len(rec.of(CrossSiteValidated)) == 3


# -- the MMAR's keys, and the module's weight ---------------------------------------------------


def _config(tmp_path: Path, **client: Any) -> Path:
    return _mmar(tmp_path / "mmar", "print('hi')\n", **client)


@pytest.mark.parametrize(
    ("client", "key", "words"),
    [
        ({"script": "train.py"}, "client.script", "under the MMAR's custom/ folder"),
        ({"script": "custom/../../x.py"}, "client.script", "a path inside the MMAR"),
        ({"script": "custom/missing.py"}, "client.script", "is not a file of the MMAR"),
        ({"script_args": {"lr": 1}}, "client.script_args", "expected a list of strings"),
        ({"script_timeout": 0}, "client.script_timeout", "seconds > 0"),
    ],
)
def test_bad_script_settings_name_the_file_and_key(
    tmp_path: Path, client: dict[str, Any], key: str, words: str
) -> None:
    mmar = _config(tmp_path, **client)
    with pytest.raises(ConfigError) as caught:
        load_mmar_client_config(mmar)
    assert caught.value.key == key and words in str(caught.value)
    assert caught.value.path.name == "config_fed_client.json"


def test_script_args_and_a_missing_initial_model(tmp_path: Path) -> None:
    mmar = _config(tmp_path, script_args="--lr 0.1 --name 'a b'")
    spec = load_mmar_client_config(mmar).script
    assert spec is not None and spec.args == ("--lr", "0.1", "--name", "a b")
    (mmar / "config" / "environment.json").write_text("{}")
    with pytest.raises(ConfigError) as caught:
        check_mmar(mmar)
    assert caught.value.key == "PRETRAIN_WEIGHTS_FILE" and "torch.save" in caught.value.problem


def test_the_client_api_imports_no_console_and_no_torch() -> None:
    code = (
        "import sys, fltui.client\n"
        "heavy = [m for m in ('textual', 'rich', 'torch', 'grpc') if m in sys.modules]\n"
        "print(heavy)\n"
        "try:\n"
        "    fltui.client.init()\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLTUI_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert "not started by a fltui site" in out[1]


def test_check_config_knows_a_script_mmar(tmp_path: Path) -> None:
    """No config_train.json to ask for: only the model the script's federation starts from."""
    import shutil

    from fltui.check_config import check_path

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "script_mmar"
    assert check_path(example).problems == []
    broken = Path(shutil.copytree(example, tmp_path / "m"))
    for model in (broken / "models").glob("*.pt"):
        model.unlink()
    [problem] = check_path(broken).problems
    assert problem.key == "PRETRAIN_WEIGHTS_FILE" and "does not exist" in str(problem)
