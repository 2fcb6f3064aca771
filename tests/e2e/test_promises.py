"""README promises that had no test of their own, each shown with real processes.

1. ``fltui`` (a site, a site service, ``demo``, ``server``) exits 130 on Ctrl-C and on SIGTERM,
   and leaves no process of its own behind (no worker, no demo peer).
2. ``x`` in a console attached to a site service stops that service: it exits 0, its worker is
   gone, the site said goodbye, and its lock and control socket are released.
3. Abort stops the worker's whole process group: a grandchild the MMAR's own code started
   (``sleep 600``) is gone when abort returns.
4. A kit whose certificate is not yet valid, or is not the key's, is refused before connecting:
   the reason in the site's output, exit code 3, not a byte sent to the server's port.
5. The site's service and its worker share one session: after the server forgets the site,
   only one of them registers again; the other takes the token from ``session_token.json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from textual.pilot import Pilot

from engine.client.fed_client_base import SESSION_FILE
from engine.config import load_server_config
from engine.demo import prepare_workspace
from engine.events import EventBus, SiteJoined, SiteLeft
from engine.fileio import load_npz
from engine.provision import (
    CertificateAuthority,
    issue_identity,
    site_tls_settings,
    write_certificate,
    write_private_key,
)
from engine.server import FederatedServer
from engine.site.lock import control_socket_path, find_service, service_dir
from engine.site.paths import SitePaths
from engine.status import ClientStatus
from engine.tls import ROLE_SITE
from engine.training import demo_mmar_path
from fltui.app import create_app
from fltui.bridge import RemoteBridge
from fltui.screens.confirm import ConfirmScreen
from fltui.screens.dashboard import Dashboard
from tests.conftest import Recorder
from tests.e2e.test_service import _ctl, _federation, _service, _status
from tests.faults.procs import ENV, ROOT, Proc, wait_for, workers
from tests.ui.replay import NoSampler
from tests.ui.test_console import _until

EXIT_INTERRUPTED = 130


def _events(log: Path) -> list[dict[str, Any]]:
    """The JSON lines a ``--json`` child has written to ``log`` so far."""
    found = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            found.append(item)
    return found


def _tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


def _live(proc: psutil.Process) -> bool:
    """Still running (a zombie is not: it only waits to be reaped; a reused pid is not it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _lock_free(workspace: Path) -> bool:
    """Whether the workspace's service lock can be taken (no service holds it)."""
    try:
        fd = os.open(service_dir(workspace) / "service.lock", os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases it again
    return True


# ---------------------------------------------------------------------------- 1. exit code 130


def _launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``fltui ARGS`` leading a process group of its own, as a shell starts a foreground job
    (Ctrl-C in the terminal then reaches that group, not the workers' own groups)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fltui", *args],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _interrupt(proc: subprocess.Popen[bytes], sig: signal.Signals, log: Path) -> None:
    """Ctrl-C (SIGINT to the job's process group) or SIGTERM (to the process, as ``kill`` and
    systemd's KillMode=mixed send it); the exit status must be 130 and every process it had
    started must be gone."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(sig)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within 60 s of {sig.name}:\n{_tail(log)}") from None
    assert code == EXIT_INTERRUPTED, f"exit status {code} after {sig.name}:\n{_tail(log)}"
    wait_for(
        lambda: not [p for p in descendants if _live(p)],
        15,
        f"its processes (of {[p.pid for p in descendants]}) to be gone after {sig.name}",
    )


def _training(log: Path, sites: set[str]) -> bool:
    """Every site in ``sites`` has reported a training step (its worker trains)."""
    stepping = {e.get("site") for e in _events(log) if e.get("event") == "ProgressUpdated"}
    return sites <= stepping


SIGNALS = [pytest.param(signal.SIGINT, id="ctrl-c"), pytest.param(signal.SIGTERM, id="sigterm")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("serve", [False, True], ids=["site", "service"])
def test_a_site_interrupted_while_training_exits_130_and_leaves_no_worker(
    tmp_path: Path, sig: signal.Signals, serve: bool
) -> None:
    server, site = _federation(tmp_path)
    log = tmp_path / "site.log"
    extra = ["--serve", "--run", "1"] if serve else []
    proc = _launch(["--no-ui", "--json", "--workspace", str(site), *extra], log)
    try:
        wait_for(lambda: _training(log, {"site-1"}) or proc.poll() is not None, 90, "training")
        assert proc.poll() is None, _tail(log)
        assert workers(site), "no worker process while training"
        _interrupt(proc, sig, log)
        assert not workers(site)
        assert find_service(site) is None
        # one goodbye to the server: a second Quit was refused and warned as "quit failed"
        assert "quit failed" not in log.read_text(), _tail(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for leftover in workers(site):
            os.kill(leftover, signal.SIGKILL)
        server.stop(grace=0)


@pytest.mark.slow
# Ctrl-C only, as an operator stops the demo (it reaches the peer and the workers too): SIGTERM
# raises the same KeyboardInterrupt in the demo (fltui/cli.py _on_sigterm), which the site tests
# cover with both signals, and each demo case costs ~10 s of the suite.
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["ctrl-c"])
def test_the_demo_interrupted_while_training_exits_130_and_leaves_no_process(
    tmp_path: Path, sig: signal.Signals
) -> None:
    ws = tmp_path / "demo"
    log = tmp_path / "demo.log"
    proc = _launch(
        ["demo", "--no-ui", "--json", "--workspace", str(ws), "--sites", "2", "--rounds", "200"],
        log,
    )
    try:
        wait_for(
            lambda: _training(log, {"site-1", "site-2"}) or proc.poll() is not None,
            120,
            "both sites to train",
        )
        assert proc.poll() is None, _tail(log)
        # the peer is a child process, and each site trains in a worker of its own
        assert workers(ws / "site-1") and workers(ws / "site-2")
        _interrupt(proc, sig, log)
        assert not workers(ws / "site-1") and not workers(ws / "site-2")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for leftover in workers(ws / "site-1") + workers(ws / "site-2"):
            os.kill(leftover, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_the_server_interrupted_exits_130(tmp_path: Path, sig: signal.Signals) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=2)
    log = tmp_path / "server.log"
    proc = _launch(["server", "--no-ui", "--json", "--workspace", str(tmp_path / "server")], log)
    try:
        wait_for(
            lambda: "server listening on port" in log.read_text() or proc.poll() is not None,
            60,
            "the server to listen",
        )
        assert proc.poll() is None, _tail(log)
        _interrupt(proc, sig, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------- 2. x: stop the site


@pytest.mark.slow
def test_x_in_a_console_stops_the_site_service_it_is_attached_to(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)
    seen = Recorder(server.bus)
    service = _service(site, "--serve", "--run", "1")
    try:
        info = wait_for(lambda: find_service(site), 60, "the service to start")
        assert info.pid == service.pid
        sock = control_socket_path(site)
        assert sock.exists() and not _lock_free(site)
        trained_by = [psutil.Process(p) for p in wait_for(lambda: workers(site), 60, "training")]
        app = create_app(site, gpu_sampler=NoSampler())
        assert isinstance(app.bridge, RemoteBridge)  # attached, not an engine of its own
        said: list[str] = []

        async def console(pilot: Pilot[None]) -> None:
            dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
            await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STARTED, 30)
            await pilot.press("x")
            asked = await _until(
                pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen
            )
            said.append(asked.question)
            assert service.poll() is None  # it asks first
            await pilot.press("y")
            await _until(pilot, lambda: service.poll() is not None, 60)
            await _until(pilot, lambda: app.bridge.label == "service gone", 10)  # type: ignore[union-attr]
            said.append(dash.last_action)
            await pilot.press("q")

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await console(pilot)

        asyncio.run(main())
        assert said[0].startswith("Stop the site service of site-1?"), said
        assert said[1] == "stop site: the site service is stopping", said
        # stopped on request: exit 0 (systemd does not restart it)
        assert service.wait(10) == 0
        # training stopped with it (its whole process group) ...
        assert not workers(site) and not any(_live(w) for w in trained_by)
        # ... the site said goodbye to the server ...
        assert [e.reason for e in seen.of(SiteLeft) if e.site_name == "site-1"] == ["quit"]
        assert "site-1" not in server.sites
        # ... and the workspace is free: no socket, no description, the lock not held
        assert not sock.exists()
        assert not (service_dir(site) / "service.json").exists()
        assert _lock_free(site)
        assert find_service(site) is None
        gone = _ctl(site, "status")
        assert gone.returncode == 5, gone
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        server.stop(grace=0)


# ---------------------------------------------------------------------------- 3. abort: the group

GRANDCHILD = '''\
"""A training dataset that starts a process of its own: what abort must stop too."""

import os
import subprocess
from pathlib import Path

from engine.training.data import SyntheticClassification


class SpawningData(SyntheticClassification):
    def __init__(self, pid_file, context=None, **kwargs):
        super().__init__(context=context, **kwargs)
        child = subprocess.Popen(["sleep", "600"])
        tmp = Path(pid_file + ".tmp")
        tmp.write_text(f"{child.pid} {os.getpid()}")
        tmp.replace(pid_file)
'''


@pytest.mark.slow
def test_abort_stops_a_grandchild_the_mmars_own_code_started(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)
    paths = SitePaths(site)
    (paths.startup / "site_policy.json").write_text(json.dumps({"allow_byoc": True}))
    mmar = paths.mmar(1, "site-1")
    (mmar / "custom" / "spawning.py").write_text(GRANDCHILD)
    pid_file = tmp_path / "grandchild.pid"
    train = json.loads((mmar / "config" / "config_train.json").read_text())
    train["train_data"] = {
        "path": "spawning.SpawningData",
        "args": {**train["train_data"]["args"], "pid_file": str(pid_file)},
    }
    (mmar / "config" / "config_train.json").write_text(json.dumps(train))
    service = _service(site, "--serve", "--run", "1")
    grandchild = None
    try:
        events = paths.logs / "events.jsonl"
        wait_for(
            lambda: (
                pid_file.exists()
                or (events.exists() and "training exception" in events.read_text())
            ),
            90,
            "the MMAR's code to start its process",
        )
        assert pid_file.exists(), (paths.logs / "worker.log").read_text()[-3000:]
        pid, worker = (int(w) for w in pid_file.read_text().split())
        grandchild = psutil.Process(pid)
        assert grandchild.name() == "sleep" and grandchild.ppid() == worker
        assert workers(site) == [worker]
        assert os.getpgid(pid) == worker  # in the worker's process group (it leads it)
        wait_for(lambda: _status(site).get("status") == "training started", 60, "training")

        aborted = _ctl(site, "abort")
        assert aborted.returncode == 0, aborted.stderr
        assert "training aborted" in aborted.stdout, aborted.stdout
        # abort returns only when no process of the group is left: no waiting here
        assert not _live(grandchild), f"{pid} ({grandchild.status()}) outlived the abort"
        if psutil.pid_exists(pid) and grandchild.is_running():  # a zombie: not left to us
            assert grandchild.ppid() not in (os.getpid(), service.pid, worker)
        assert not workers(site)
        assert service.poll() is None  # the service stays up
        assert _status(site).get("status") == "training stopped"
        assert _ctl(site, "shutdown").returncode == 0
        assert service.wait(30) == 0
    finally:
        if grandchild is not None and _live(grandchild):
            grandchild.kill()
        if service.poll() is None:
            service.kill()
            service.wait()
        for leftover in workers(site):
            os.kill(leftover, signal.SIGKILL)
        server.stop(grace=0)


# ---------------------------------------------------------------------------- 4. the certificate


def _secure_kit(site: Path, port: int) -> CertificateAuthority:
    """A provisioned site kit (its authority returned) aimed at ``port``, the demo MMAR as run 1."""
    ca = CertificateAuthority.create("promises")
    startup = SitePaths(site).startup
    issue_identity(ca, startup, "site-1", ROLE_SITE)
    kit = {
        "format_version": 1,
        "servers": [{"name": "demo_federation", "service": {"target": f"127.0.0.1:{port}"}}],
        "client": {"client_name": "site-1", "retry_timeout": 30, **site_tls_settings()},
    }
    SitePaths(site).kit.write_text(json.dumps(kit))
    shutil.copytree(demo_mmar_path(), SitePaths(site).mmar(1, "site-1"))
    return ca


@pytest.mark.parametrize("problem", ["not_yet_valid", "not_the_keys"])
def test_a_kit_certificate_not_yet_valid_or_not_the_keys_is_refused_before_connecting(
    tmp_path: Path, problem: str
) -> None:
    site = tmp_path / "site-1"
    with socket.socket() as listener:  # where the kit points: nothing may reach it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        ca = _secure_kit(site, listener.getsockname()[1])
        startup = SitePaths(site).startup
        crt = startup / "client.crt"
        if problem == "not_yet_valid":
            tomorrow = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
            key, cert = ca.issue("site-1", ROLE_SITE, not_before=tomorrow)
            write_private_key(startup / "client.key", key)
            write_certificate(crt, cert)
            reason = f"certificate not yet valid: {crt} is valid from "
        else:
            _, cert = ca.issue("site-1", ROLE_SITE)  # the authority's, for another key
            write_certificate(crt, cert)
            reason = f"client.key: this key does not belong to the certificate {crt}"
        done = subprocess.run(
            [sys.executable, "-m", "fltui", "--no-ui", "--workspace", str(site)],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        said = done.stdout + done.stderr
        assert done.returncode == 3, said
        assert f"connection failed: 127.0.0.1:{listener.getsockname()[1]} (" in said, said
        assert reason in said, said
        assert "federation failed after 0 rounds (" in said, said
        assert not workers(site)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # not even a TCP connection was attempted


# ---------------------------------------------------------------------------- 5. one session


@pytest.mark.slow
def test_service_and_worker_share_one_session_when_the_server_forgets_it(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)
    port = server.port
    proc = None
    second = None
    try:
        proc = Proc("site-1", ["--workspace", str(site)], tmp_path / "site.log")
        wait_for(lambda: server.current_round >= 1, 90, "round 1 to be aggregated")
        worker = workers(site)
        assert len(worker) == 1
        session = site / SESSION_FILE
        first_token = json.loads(session.read_text())["token"]
        assert server.sites["site-1"].token == first_token

        # The server restarts (from its saved state, on the same port): it knows no session.
        server.stop(grace=0)
        bus = EventBus()
        joined = Recorder(bus)
        second = FederatedServer(
            load_server_config(tmp_path / "server" / "config_fed_server.json"),
            tmp_path / "server",
            load_npz(tmp_path / "server" / "models" / "initial_model.npz"),
            bus,
            long_poll=0.5,
        )
        assert second.start(f"127.0.0.1:{port}") == port
        resumed_at = second.current_round
        # Both processes held the old token; both must go on: the worker's contributions are
        # counted again (rounds advance) and the service's heartbeats are answered.
        wait_for(lambda: second.current_round >= resumed_at + 2, 90, "two more rounds")
        beats = len(proc.events("HeartbeatAcknowledged"))
        wait_for(lambda: len(proc.events("HeartbeatAcknowledged")) > beats, 30, "a heartbeat")
        assert workers(site) == worker  # the same worker trained on: it was not restarted

        registrations = [e for e in joined.of(SiteJoined) if e.site_name == "site-1"]
        assert len(registrations) == 1, (
            f"{len(registrations)} registrations of site-1 after the restart:\n{proc.tail()}"
        )
        assert len(proc.events("SessionRenewed")) == 1, proc.tail()
        # the other process found the new session in the file instead of registering
        assert len(proc.logs("using the session registered again elsewhere")) == 1, proc.tail()
        token = json.loads(session.read_text())["token"]
        assert token != first_token and second.sites["site-1"].token == token
        assert stat.S_IMODE(session.stat().st_mode) == 0o600
    finally:
        if proc is not None:
            proc.stop()
        for leftover in workers(site):
            os.kill(leftover, signal.SIGKILL)
        server.stop(grace=0)
        if second is not None:
            second.stop(grace=0)
