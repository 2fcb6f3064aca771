"""The site service with real processes: consoles attach, detach and act; the service stays.

A real reference server on loopback, a real ``fltui --no-ui`` service training in its worker
process, consoles under Pilot and ``fltui ctl`` in a child process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from engine.config import load_server_config
from engine.demo import _set_port, prepare_workspace
from engine.events import Event, ServiceLink, StateSnapshot, StatusChanged
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.lock import find_service
from engine.site.paths import SitePaths
from engine.status import ClientStatus
from fltui.app import FLTuiApp, create_app
from fltui.bridge import RemoteBridge
from fltui.screens.confirm import ConfirmScreen
from fltui.screens.dashboard import Dashboard
from tests.e2e.test_orphans import _workers
from tests.ui.replay import NoSampler
from tests.ui.test_console import _until

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _wait(check: Callable[[], Any], timeout: float = 60, what: Any = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    what = what() if callable(what) else what
    raise AssertionError(f"not reached within {timeout} s: {what or check}")


def _federation(tmp_path: Path, rounds: int = 500) -> tuple[FederatedServer, Path]:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=rounds, heartbeat_interval=0.5)
    server = FederatedServer(
        load_server_config(tmp_path / "server" / "config_fed_server.json"),
        tmp_path / "server",
        load_npz(tmp_path / "server" / "models" / "initial_model.npz"),
        long_poll=0.5,
    )
    port = server.start("127.0.0.1:0")
    site = tmp_path / "site-1"
    _set_port(SitePaths(site).kit, port)
    return server, site


def _service(site: Path, *extra: str) -> subprocess.Popen[str]:
    log = (site.parent / f"service-{time.monotonic_ns()}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "fltui", "--no-ui", "--workspace", str(site), *extra],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _ctl(site: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fltui", "ctl", "--workspace", str(site), *words],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _status(site: Path) -> dict[str, Any]:
    """``fltui ctl status --json``'s result, or {} while it cannot answer."""
    done = _ctl(site, "status", "--json")
    try:
        return dict(json.loads(done.stdout)["result"]) if done.returncode == 0 else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


class Seen:
    """Records every event a second, script-side console gets (a RemoteBridge, drained)."""

    def __init__(self, bridge: RemoteBridge) -> None:
        self.bridge = bridge
        self.events: list[Event] = []

    def pump(self) -> list[Event]:
        self.events += self.bridge.drain()
        return self.events


@pytest.mark.slow
def test_consoles_attach_mid_round_abort_detach_and_the_service_stays(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)
    service = _service(site, "--serve", "--run", "1")
    other = third = None
    try:
        info = _wait(lambda: find_service(site), 60, "the service to start")
        assert info.pid == service.pid and info.site == "site-1"
        _wait(lambda: _workers(site), 60, "training to start")
        _wait(lambda: _status(site).get("round", 0) >= 1, 60, "round 1")

        # Two script-side consoles, attached the whole time: both must see every event.
        other, third = RemoteBridge(site, "site-1"), RemoteBridge(site, "site-1")
        for bridge in (other, third):
            bridge.start()
            assert bridge.ready.wait(10)
        seen, seen3 = Seen(other), Seen(third)

        app = create_app(site, gpu_sampler=NoSampler())
        assert isinstance(app.bridge, RemoteBridge)

        async def first_console(app: FLTuiApp, pilot: Pilot[None]) -> None:
            dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
            await _until(pilot, lambda: app.bridge.ready.is_set())  # type: ignore[union-attr]
            # the first refresh after attaching shows the run, round and status at once: the
            # snapshot brings them together (events alone would take rounds to say as much)
            await _until(pilot, lambda: dash.state.run_number == 1, 10)
            assert dash.state.status == ClientStatus.TRAINING_STARTED
            assert dash.state.round >= 1
            assert dash.state.registered_at is not None
            header = str(dash.query_one("#header").render())
            assert f"attached to service (pid {service.pid})" in header
            # abort from the console: the service stops training
            worker = dash.state.worker_pid
            await pilot.press("a")
            await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STOPPED)
            await _until(pilot, lambda: "abort: training aborted" in dash.last_action)
            await _until(pilot, lambda: worker and not _alive(worker), 30)
            await pilot.press("q")

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await first_console(app, pilot)

        asyncio.run(main())

        # the console quit; the service did not
        time.sleep(1.0)
        assert service.poll() is None
        assert find_service(site) == info
        stopped = [
            e
            for e in _wait(
                lambda: (
                    seen.pump()
                    if any(
                        isinstance(e, StatusChanged) and e.status == ClientStatus.TRAINING_STOPPED
                        for e in seen.pump()
                    )
                    else None
                ),
                20,
                "the other console to see the abort",
            )
            if isinstance(e, StatusChanged)
        ]
        assert stopped[-1].status == ClientStatus.TRAINING_STOPPED

        # a console attached afterwards sees the same state at once
        again = create_app(site, gpu_sampler=NoSampler())

        async def later_console(app: FLTuiApp, pilot: Pilot[None]) -> None:
            dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
            await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STOPPED, 10)
            assert dash.state.run_number == 1 and dash.state.round >= 1
            topics = [r.topic for r in dash.state.requests]
            assert "train.abort" in topics  # the audit trail came with the snapshot
            await pilot.press("q")

        async def main2() -> None:
            async with again.run_test(size=(80, 24)) as pilot:
                await later_console(again, pilot)

        asyncio.run(main2())
        assert service.poll() is None

        status = _ctl(site, "status")
        assert status.returncode == 0, status.stderr
        assert "training stopped" in status.stdout
        refused = _ctl(site, "start", "--run", "9")
        assert refused.returncode == 1 and "run 9" in refused.stderr, refused
        shutdown = _ctl(site, "shutdown")
        assert shutdown.returncode == 0, shutdown.stderr
        assert service.wait(30) == 0
        # the other consoles hear that the service ended (not lost), in words
        _wait(lambda: other is not None and other.label == "service gone", 10)
        assert any(
            "ended: the site service was stopped on request" in getattr(e, "message", "")
            for e in seen.pump()
        )

        # both saw every event, in the same order (the one attached later: a suffix)
        def engine_events(events: list[Event]) -> list[dict[str, Any]]:
            return [
                e.to_dict()
                for e in events
                # the console's own: its snapshot, its log lines, its link's liveness
                if not isinstance(e, (StateSnapshot, ServiceLink))
                and getattr(e, "logger", "") != "fltui"
            ]

        a, b = engine_events(seen.pump()), engine_events(seen3.pump())
        assert len(b) > 10 and a[len(a) - len(b) :] == b
        assert find_service(site) is None
        assert not _workers(site)
        gone = _ctl(site, "status")
        assert gone.returncode == 5 and "no site service runs" in gone.stderr
    finally:
        for bridge in (other, third):
            if bridge is not None:
                bridge.stop()
        if service.poll() is None:
            service.kill()
            service.wait()
        server.stop(grace=0)


@pytest.mark.slow
def test_one_service_per_workspace_and_a_killed_one_leaves_nothing_behind(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)
    first = _service(site)
    second = third = console = None
    try:
        info = _wait(lambda: find_service(site), 60, "the first service")
        _wait(lambda: _workers(site), 60, "training to start")
        # a second service on the workspace is refused, naming the running one
        second = subprocess.run(
            [sys.executable, "-m", "fltui", "--no-ui", "--serve", "--workspace", str(site)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 4
        assert f"fltui service pid {info.pid}" in second.stderr
        assert "fltui ctl --workspace" in second.stderr
        # a console attached now outlives the service's death and attaches to the next one
        console = RemoteBridge(site, "site-1")
        console.start()
        assert console.ready.wait(10)
        # SIGKILL: the kernel drops the lock; the worker notices and stops
        workers = _workers(site)
        first.send_signal(signal.SIGKILL)
        first.wait()
        _wait(lambda: not _workers(site) and not any(_alive(w) for w in workers), 30, "no worker")
        assert find_service(site) is None
        # the next start takes the workspace over (stale socket and service.json replaced)
        third = _service(site, "--serve")
        info3 = _wait(lambda: find_service(site), 60, "the next service")
        assert info3.pid == third.pid != info.pid
        said: list[str] = []

        def reattached() -> bool:
            said.extend(getattr(e, "message", "") for e in console.drain())
            return console.label == f"attached to service (pid {third.pid})"

        _wait(reattached, 30, lambda: f"re-attach; label {console.label!r}, said {said}")
        assert any(f"lost the site service (pid {info.pid})" in m for m in said), said
        assert any(f"re-attached to the site service (pid {third.pid})" in m for m in said), said
        _wait(lambda: _ctl(site, "status").returncode == 0, 30, "ctl to reach it")
        # the console's actions from a script: deploy the next run, train it, abort it
        deployed = _ctl(site, "deploy", "demo_mmar")
        assert deployed.returncode == 0, deployed.stderr
        assert (site / "run_2" / "mmar_site-1" / "config").is_dir()
        started = _ctl(site, "start", "--json")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["ok"] is True
        _wait(lambda: _workers(site), 60, "run 2 to train")
        assert _ctl(site, "abort").returncode == 0
        _wait(lambda: not _workers(site), 30, "the abort to stop the worker")
        assert "training stopped" in _ctl(site, "status").stdout
        bad = _ctl(site, "deploy")
        assert bad.returncode == 2 and "deploy needs an MMAR" in bad.stderr
        assert _ctl(site, "shutdown").returncode == 0
        assert third.wait(30) == 0
    finally:
        if console is not None:
            console.stop()
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop(grace=0)


def test_stopping_a_service_that_is_still_trying_to_reach_its_server_exits_0(
    tmp_path: Path,
) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    site = tmp_path / "site-1"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _set_port(SitePaths(site).kit, port)
    kit = json.loads(SitePaths(site).kit.read_text())
    kit["client"]["retry_timeout"] = 600
    SitePaths(site).kit.write_text(json.dumps(kit))
    service = _service(site, "--serve")
    try:
        _wait(lambda: find_service(site), 60, "the service to listen")
        status = _status(site)
        assert status["connection"] in ("connecting", "retrying", "not connected"), status
        done = _ctl(site, "shutdown")
        assert done.returncode == 0, done.stderr
        # stopped on request: 0 (systemd must not restart it), not a registration failure
        assert service.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
