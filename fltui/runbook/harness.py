"""The federation a scenario runs against, and the run that drives the console through it."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.config import load_server_config
from engine.demo import _set_admin_port, _set_port, prepare_workspace, task_mmar
from engine.events import (
    ConnectionChanged,
    Event,
    EventBus,
    HeartbeatAcknowledged,
    ModelTransferred,
    ServerRoundAggregated,
    SiteJoined,
)
from engine.fileio import load_npz, save_json_atomic
from engine.server import FederatedServer
from engine.site.lock import find_service
from engine.site.paths import SitePaths
from fltui.pictures import svg_to_png
from fltui.runbook.bridge import RunbookBridge, SteppedGpu
from fltui.runbook.pages import Page, Step
from fltui.runbook.standins import STEP_S

ROUNDS = 3
ROOT = Path(__file__).resolve().parents[2]  # the checkout: on the child processes' path


# ---------------------------------------------------------------------------------- federation


class Federation:
    """A federation of this site and ``sites - 1`` peers on loopback, for one scenario.

    The server runs in this process (so a scenario can stop and start it); peers run as
    ``fltui --no-ui`` child processes with training in their own process (so that SIGSTOP
    pauses all of a peer). This site's engine runs in the console (``LocalBridge``), or, for a
    scenario about the site service, as a service of its own (``start_service``: ``fltui
    --no-ui --serve``, as an operator or systemd runs it) that the console attaches to.
    """

    def __init__(
        self,
        root: Path,
        initial_model: Path | None,
        sites: int = 2,
        rounds: int = ROUNDS,
        heartbeat_interval: float = 1.0,
        retry_timeout: float = 30.0,
        policy: dict[str, Any] | None = None,
        task: str = "classification",
    ) -> None:
        self.root = root
        self.names = [f"site-{i}" for i in range(1, sites + 1)]
        if initial_model is not None and initial_model.exists():
            target = root / "server" / "models" / "initial_model.npz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(initial_model, target)
        prepare_workspace(
            root,
            num_sites=sites,
            num_rounds=rounds,
            heartbeat_interval=heartbeat_interval,
            torch_in_subprocess=True,  # the console's process never imports torch
            task=task,
        )
        offered = task_mmar(task).name
        config_path = root / "server" / "config_fed_server.json"
        config = json.loads(config_path.read_text())
        # A paused peer must not be dropped while the runbook waits on this site.
        config["servers"][0]["heart_beat_timeout"] = 600
        save_json_atomic(config_path, config)
        for name in self.names:
            paths = SitePaths(root / name)
            # The MMAR's retry_timeout wins over the kit's for training: set both.
            for path in (
                paths.kit,
                paths.transfer / offered / "config" / "config_fed_client.json",
                paths.mmar(1, name) / "config" / "config_fed_client.json",
            ):
                data = json.loads(path.read_text())
                data["client"]["retry_timeout"] = retry_timeout
                save_json_atomic(path, data)
        if policy is not None:
            save_json_atomic(SitePaths(root / "site-1").startup / "site_policy.json", policy)
        self.bus = EventBus()
        self.server: Any = None
        self.port = 0
        self.peers: dict[str, subprocess.Popen[bytes]] = {}
        self.services: list[subprocess.Popen[bytes]] = []  # this site's, newest last
        self.paused: set[str] = set()
        self.lockstep = False  # pause the peers whenever a round closes
        self.aggregated: list[int] = []
        self._lock = threading.Lock()
        self.bus.subscribe(self._on_server_event)

    @property
    def site(self) -> Path:
        return self.root / "site-1"

    def _on_server_event(self, event: Event) -> None:
        # Runs in the server's thread, before the site that joined or closed the round hears
        # back: a paused peer cannot get ahead of this site.
        if isinstance(event, SiteJoined) and event.site_name in self.peers and self.lockstep:
            self.pause(event.site_name)
        if isinstance(event, ServerRoundAggregated):
            self.aggregated.append(event.round)
            if self.lockstep:
                for name in self.peers:
                    self.pause(name)

    def start_server(self) -> int:
        server_dir = self.root / "server"
        config = load_server_config(server_dir / "config_fed_server.json")
        self.server = FederatedServer(
            config, server_dir, load_npz(server_dir / "models" / "initial_model.npz"), self.bus
        )
        self.port = int(self.server.start(f"127.0.0.1:{self.port}"))
        for name in self.names:
            _set_port(SitePaths(self.root / name).kit, self.port)
        _set_admin_port(self.root / "admin", self.port)
        return self.port

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None

    @staticmethod
    def _env() -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def start_service(self, timeout: float = 60.0) -> int:
        """This site as a service (``fltui --no-ui --serve``); returns its pid once it listens.

        Raises:
            StepTimeout: it did not open its control socket in time (its log says why).
        """
        logs = self.site / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "service-stderr.log").open("ab") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fltui",
                    "--no-ui",
                    "--serve",
                    "--workspace",
                    str(self.site),
                ],
                stdout=err,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                start_new_session=True,
            )
        self.services.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = find_service(self.site)
            if info is not None and info.pid == proc.pid:
                return proc.pid
            if proc.poll() is not None:
                raise StepTimeout(f"the site service exited with code {proc.returncode}")
            time.sleep(0.1)
        raise StepTimeout(f"the site service did not listen within {timeout:.0f} s")

    def kill_service(self) -> int:
        """SIGKILL to this site's running service (its process only: its worker is left to
        notice, as after a real crash); returns the pid."""
        proc = self.services[-1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return proc.pid

    def start_peers(self) -> None:
        env = self._env()
        for name in self.names[1:]:
            logs = self.root / name / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with (logs / "stderr.log").open("ab") as err:
                self.peers[name] = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "fltui", "--no-ui", "--executor", "thread"),
                        *("--workspace", str(self.root / name)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )

    def pause(self, name: str) -> None:
        with self._lock:
            proc = self.peers.get(name)
            if proc is not None and proc.poll() is None and name not in self.paused:
                os.kill(proc.pid, signal.SIGSTOP)
                self.paused.add(name)

    def resume(self) -> None:
        with self._lock:
            for name in sorted(self.paused):
                proc = self.peers[name]
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            self.paused.clear()

    def joined(self, name: str) -> bool:
        server = self.server
        return server is not None and name in getattr(server, "sites", {})

    def admin(self, *words: str) -> subprocess.CompletedProcess[str]:
        """``fltui admin --workspace ROOT/admin WORDS`` as the federation's admin runs it."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "fltui",
                "admin",
                "--workspace",
                str(self.root / "admin"),
                *words,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.lockstep = False
        self.resume()
        procs = [*self.peers.values(), *self.services]
        for proc in procs:
            # A killed service's group too: its worker may still be winding down.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stop_server()


# ---------------------------------------------------------------------------------- a run


class StepTimeout(RuntimeError):
    """A scenario's state was not reached in time (the message says which)."""


class Run:
    """One scenario being driven: the app, its pilot, the federation and the page."""

    def __init__(
        self,
        app: Any,
        pilot: Any,
        bridge: RunbookBridge,
        fed: Federation,
        gpu: SteppedGpu,
        page: Page,
        out: Path,
    ) -> None:
        self.app, self.pilot, self.bridge, self.fed, self.gpu = app, pilot, bridge, fed, gpu
        self.page, self.out = page, out
        self.clock = bridge.clock
        self.gpu_samples = 0

    @property
    def dash(self) -> Any:
        from fltui.screens.dashboard import Dashboard  # deferred: textual, once a scenario plays

        for screen in self.app.screen_stack:
            if isinstance(screen, Dashboard):
                return screen
        raise StepTimeout("the dashboard is not open")

    @property
    def state(self) -> Any:
        return self.dash.state

    async def until(self, check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = check()
            except StepTimeout:
                value = None
            if value:
                return value
            await self.pilot.pause(0.1)
        raise StepTimeout(f"{self.page.name}: not reached within {timeout:.0f} s: {what}")

    async def press(self, *keys: str) -> None:
        for key in keys:
            await self.pilot.press(key)
            await self.pilot.pause(0.05)

    async def quiet(self, seconds: float = 0.8, timeout: float = 30.0) -> None:
        """Waits until the engine has published nothing but periodic events for ``seconds``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.bridge.activity < seconds:
            if time.monotonic() > deadline:
                break
            await self.pilot.pause(0.1)

    def heartbeats(self) -> int:
        return len(self.bridge.inner_heartbeats)

    async def fresh_heartbeat(self) -> None:
        """Waits for a heartbeat at the current clock reading ("heartbeat 0 s ago")."""
        before = self.clock()
        await self.until(
            lambda: any(e.ts == before for e in self.bridge.of(HeartbeatAcknowledged)),
            "a heartbeat",
            90,  # up to two heartbeat intervals of the slowest scenario
        )

    async def shot(
        self,
        slug: str,
        title: str,
        text: str,
        *,
        advance: float = STEP_S,
        heartbeat: bool = True,
        extra: str = "",
    ) -> None:
        """Takes a step's picture once everything has settled; then the clock moves on."""
        await self.quiet()
        if heartbeat:
            await self.fresh_heartbeat()
        dash = self.dash
        # One sample per refresh (the dashboard shows the newest sample of each refresh): the
        # first picture gets a little history for the sparklines.
        for _ in range(8 if self.gpu_samples == 0 else 2):
            self.gpu.tick(1)
            dash.pump()
        self.gpu_samples += 1
        await self.pilot.pause(0.2)
        dash.pump(force=True)
        from textual.widgets import Input  # deferred: textual, loaded once a scenario plays

        for widget in self.app.screen.query(Input):
            widget.cursor_blink = False  # a blinking cursor is on or off by chance
        await self.pilot.pause(0.3)
        await self.pilot.wait_for_scheduled_animations()
        dash.pump(force=True)
        await self.pilot.pause(0.2)
        index = len(self.page.steps) + 1
        name = f"{index:02d}-{slug}"
        svg = self.app.export_screenshot(title=f"fltui runbook · {self.page.title} · step {index}")
        folder = self.out / self.page.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.svg").write_text(svg, encoding="utf-8")
        (folder / f"{name}.png").write_bytes(svg_to_png(svg))
        self.page.steps.append(Step(slug, title, text, [f"{name}.svg", f"{name}.png"], extra))
        self.clock.advance(advance)
        # Each picture shows the notices of its own step (they stay until then: see _play).
        self.app.clear_notifications()

    # -- states every scenario waits for ---------------------------------------------------

    async def registered(self, after: int = 0) -> None:
        await self.until(
            lambda: (
                sum(1 for e in self.bridge.of(ConnectionChanged) if e.state == "registered") > after
            ),
            "this site registered with the server",
            60,
        )

    def contributed(self, round_number: int) -> bool:
        return any(
            e.direction == "upload" and e.what == "contribution" and e.round == round_number
            for e in self.bridge.of(ModelTransferred)
        )

    async def waiting_after(self, round_number: int) -> None:
        """This site's contribution to ``round_number`` is in; the others are paused."""
        await self.until(
            lambda: (
                self.contributed(round_number)
                and self.state.phase in ("waiting for the others", "pulling model")
            ),
            f"site-1 sent its contribution to round {round_number}",
        )
        await self.quiet(1.0)

    async def rounds_in_lockstep(
        self, rounds: int, shots: dict[int, Callable[[], Awaitable[None]]] | None = None
    ) -> None:
        """Each round: this site's contribution first (a picture may be taken), then the peers'.

        After the last round the peers run freely (cross-site validation needs them).
        """
        for k in range(1, rounds + 1):
            await self.waiting_after(k)
            if shots and k in shots:
                await shots[k]()
            if k == rounds:
                self.fed.lockstep = False
            self.fed.resume()
            closed = functools.partial(operator.contains, self.fed.aggregated, k)
            await self.until(closed, f"the server closed round {k}")

    async def finished(self, outcome: str = "completed", timeout: float = 180.0) -> None:
        await self.until(lambda: self.state.outcome == outcome, f"federation {outcome}", timeout)
        await self.until(lambda: self.state.worker_pid is None, "the worker exited", 60)

    async def last_action(self, text: str) -> None:
        await self.until(lambda: text in self.dash.last_action, f"the console said {text!r}", 60)
