"""Sites that fail, or only look as if they did: real site services over loopback.

- A site killed (SIGKILL) in the middle of a round: the others' round closes once
  ``min_num_clients`` have contributed and ``wait_after_min_clients`` has passed, and the
  server names the missing site.
- A local training longer than the server's heartbeat timeout: the site is not dropped.
- An abort while the model is being uploaded (the upload held in the proxy): the worker stops
  at the abort command, no process is left, the status is stopped, and the next start works.

Where a test needs a site to be training at a given moment, or to train for a given time, its
training data is gated (``GATE``): it holds while a file exists, so the order of events is the
test's, not the machine's speed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_server_config
from engine.demo import prepare_workspace
from engine.events import EventBus, ServerRoundAggregated, SiteLeft
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.control_client import ControlClient
from engine.site.lock import find_service
from tests.conftest import Recorder
from tests.faults.procs import Proc, edit_json, start_site, wait_for, workers
from tests.faults.proxy import FaultProxy

GATE = '''
"""A test's gate (tests/faults): training holds while the file ``hold`` exists."""
import os
import time

from engine.training.data import SyntheticClassification


class GatedData(SyntheticClassification):
    def __init__(self, hold, held, context=None, **args):
        super().__init__(context=context, **args)
        self.hold, self.held = hold, held

    def __getitem__(self, index):
        while os.path.exists(self.hold):
            if not os.path.exists(self.held):  # the test waits for this: training is held
                with open(self.held, "w") as f:
                    f.write(str(time.time()))
            time.sleep(0.02)
        return super().__getitem__(index)
'''


class Federation:
    """An in-process reference server on a demo workspace; site services as child processes."""

    def __init__(self, root: Path, num_sites: int, rounds: int, **server: Any) -> None:
        prepare_workspace(root, num_sites=num_sites, num_rounds=rounds, heartbeat_interval=0.5)
        self.root = root
        for i in range(1, num_sites + 1):
            self.train_config(f"site-{i}", client={"cross_site_validate": False})
        path = root / "server" / "config_fed_server.json"
        edit_json(path, lambda d: d["servers"][0].update(server))
        self.config = path
        self.bus = EventBus()
        self.events = Recorder(self.bus)
        self.server: FederatedServer | None = None
        self.procs: list[Proc] = []
        (root / "out").mkdir()

    def start(self) -> FederatedServer:
        self.server = FederatedServer(
            load_server_config(self.config),
            self.root / "server",
            load_npz(self.root / "server" / "models" / "initial_model.npz"),
            self.bus,
            long_poll=0.5,
        )
        self.port = self.server.start("127.0.0.1:0")
        return self.server

    def train_config(self, site: str, client: dict[str, Any] | None = None, **train: Any) -> None:
        config = self.root / site / "run_1" / f"mmar_{site}" / "config"
        if client:
            edit_json(config / "config_fed_client.json", lambda d: d["client"].update(client))
        for key, value in train.items():

            def change(d: dict[str, Any], key: str = key, value: Any = value) -> None:
                target = d
                *path, last = key.split(".")
                for part in path:
                    target = target[part]
                target[last] = value

            edit_json(config / "config_train.json", change)

    def gate(self, site: str) -> tuple[Path, Path]:
        """Gates ``site``'s training data (its own code, allowed by its site policy).

        Returns:
            ``hold`` (while it exists, training holds) and ``held`` (appears once it has held).
        """
        gates = self.root / "gates"
        gates.mkdir(exist_ok=True)
        hold, held = gates / f"hold-{site}", gates / f"held-{site}"
        mmar = self.root / site / "run_1" / f"mmar_{site}"
        (mmar / "custom").mkdir(exist_ok=True)
        (mmar / "custom" / "gate.py").write_text(GATE)
        (self.root / site / "startup" / "site_policy.json").write_text(
            json.dumps({"allow_byoc": True})
        )

        def gated(d: dict[str, Any]) -> None:
            args = {**d["train_data"]["args"], "hold": str(hold), "held": str(held)}
            d["train_data"] = {"path": "gate.GatedData", "args": args}

        edit_json(mmar / "config" / "config_train.json", gated)
        return hold, held

    def site(self, name: str, *extra: str, port: int | None = None) -> Proc:
        proc = start_site(
            self.root / name, port or self.port, self.root / "out" / f"{name}.log", *extra
        )
        self.procs.append(proc)
        return proc

    def aggregated(self) -> list[ServerRoundAggregated]:
        return self.events.of(ServerRoundAggregated)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.server is not None:
            self.server.stop(grace=0)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Any]:
    made: list[Federation] = []

    def make(num_sites: int, rounds: int, **server: Any) -> Federation:
        fed = Federation(tmp_path, num_sites, rounds, **server)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


@pytest.mark.slow
def test_site_killed_mid_round_the_others_finish_after_the_wait_and_it_is_reported(
    federation,
) -> None:
    # Round 1 must have all three, round 2 must close without site-3, killed while it trains it.
    # Gates order that: site-1 and site-2 hold in round 1 until site-3 has sent its update, and
    # site-3 holds in round 2 until it is killed. Round 1 waits for everyone (a wait no machine
    # reaches); round 2's wait is then made short, once site-3 is dead: the wait closes it.
    fed = federation(3, 2, min_num_clients=2, wait_after_min_clients=600, heart_beat_timeout=120)
    gates = {name: fed.gate(name) for name in ("site-1", "site-2", "site-3")}
    for name in ("site-1", "site-2"):
        gates[name][0].touch()
    server = fed.start()
    sites = {name: fed.site(name, "--executor", "thread") for name in ("site-1", "site-2")}
    victim = fed.site("site-3", "--executor", "thread")
    wait_for(
        lambda: victim.events("PhaseChanged", phase="waiting for the others", round=1),
        120,
        f"site-3 to send its round 1 update; it said:\n{victim.tail()}",
    )
    gates["site-3"][0].touch()  # before the others go on: round 1 cannot close without them
    for name in ("site-1", "site-2"):
        gates[name][0].unlink()
    wait_for(
        lambda: (
            gates["site-3"][1].exists() and victim.events("PhaseChanged", phase="training", round=2)
        ),
        120,
        f"site-3 to be held training round 2; it said:\n{victim.tail()}",
    )
    assert [r.round for r in fed.aggregated()] == [1]
    victim.kill()
    server.config = dataclasses.replace(server.config, wait_after_min_clients=1.0)
    for name, site in sites.items():
        assert site.wait(120) == 0, f"{name} did not complete:\n{site.tail()}"
    rounds = fed.aggregated()
    assert [r.round for r in rounds] == [1, 2], rounds
    assert rounds[0].contributors == ["site-1", "site-2", "site-3"]
    assert rounds[1].contributors == ["site-1", "site-2"] and rounds[1].missing == ["site-3"]
    assert server.history[1]["missing"] == ["site-3"]
    # The wait closed the round: the dead site was still registered (no heartbeat drop yet).
    assert not [e for e in fed.events.of(SiteLeft) if e.site_name == "site-3"]
    assert "site-3" in server.sites


@pytest.mark.slow
def test_training_longer_than_the_heartbeat_timeout_is_not_a_dead_site(federation) -> None:
    timeout = 2.0
    fed = federation(1, 1, min_num_clients=1, heart_beat_timeout=timeout)
    hold, held = fed.gate("site-1")
    hold.touch()
    fed.start()
    site = fed.site("site-1")  # the service heartbeats while its worker process trains
    # The training holds until the site has been heard (heartbeats) for twice the timeout since
    # it began: longer than the timeout however fast this machine trains.
    wait_for(lambda: held.exists(), 120, f"site-1's training to hold; it said:\n{site.tail()}")
    (started,) = wait_for(
        lambda: site.events("PhaseChanged", phase="training", round=1), 60, "the training event"
    )
    wait_for(
        lambda: [
            e for e in site.events("HeartbeatAcknowledged") if e["ts"] > started["ts"] + 2 * timeout
        ],
        120,
        f"a heartbeat {2 * timeout:g} s into the training; the site said:\n{site.tail()}",
    )
    hold.unlink()
    assert site.wait(120) == 0, site.tail()
    sent = site.events("PhaseChanged", phase="submitting", round=1)
    assert sent
    trained = sent[0]["ts"] - started["ts"]
    assert trained > 1.5 * timeout, (
        f"training took {trained:.1f} s, not longer than the heartbeat timeout: nothing tested"
    )
    assert fed.events.of(SiteLeft) == [s for s in fed.events.of(SiteLeft) if s.reason == "quit"]
    (rnd,) = fed.aggregated()
    assert rnd.contributors == ["site-1"] and rnd.missing == []
    assert [e["outcome"] for e in site.events("FederationFinished")] == ["completed"]


@pytest.mark.slow
def test_abort_during_the_upload_leaves_no_process_and_the_next_start_works(
    federation,
) -> None:
    fed = federation(1, 5, min_num_clients=1)
    # A model of 1.2 MB, so that the upload is well under way when the proxy holds it.
    fed.train_config(
        "site-1", **{"model.args.hidden": [1024, 256], "train_data.args.samples": 2000}
    )
    ws = fed.root / "site-1"
    from engine.training.initial_model import write_initial_model

    write_initial_model(
        ws / "run_1" / "mmar_site-1", fed.root / "server" / "models" / "initial_model.npz"
    )
    server = fed.start()
    with FaultProxy(fed.port) as proxy:
        held = proxy.stall_after("up", 400_000)  # only an upload sends that much
        site = fed.site("site-1", "--serve", "--run", "1", port=proxy.port)
        wait_for(
            lambda: held.is_set() or site.events("FederationFinished"),
            120,
            "an upload to be held",
        )
        assert held.is_set(), f"no upload was held; site said:\n{site.tail()}"
        assert site.events("PhaseChanged", phase="submitting", round=1)
        first = workers(ws)
        assert first, "no worker while its upload is held"
        info = wait_for(lambda: find_service(ws), 30, "the service's control socket")
        ctl = ControlClient(info.socket)
        ctl.connect()
        try:
            result = ctl.call("abort", timeout=60)
            assert "stopped after the abort command" in str(result), result
            assert workers(ws) == [], "a worker outlived the abort"
            status = ctl.call("status")
            assert status["status"] == "training stopped", status
            assert server.current_round == 0 and not server.history
            proxy.release()
            ctl.call("start_training", 1, 1)
            wait_for(
                lambda: fed.aggregated() or site.events("FederationFinished", outcome="failed"),
                120,
                "round 1 after the new start",
            )
            assert fed.aggregated(), f"the new start failed:\n{site.tail()}"
            assert set(workers(ws)).isdisjoint(first)
            assert server.history[0]["contributors"] == ["site-1"]
            ctl.call("shutdown")
        finally:
            ctl.close()
        assert site.wait(60) == 0, site.tail()
        assert workers(ws) == []
