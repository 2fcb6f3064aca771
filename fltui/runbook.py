"""``fltui runbook --out DIR``: the console drives itself through scenarios and writes a runbook.

Each scenario runs against a federation of its own on this machine: the reference server in
this process, this site's engine in this process (``LocalBridge``, as ``fltui --workspace DIR``
runs it where no service runs), training in worker processes, and peers as ``fltui --no-ui``
child processes. Textual's Pilot presses the keys an operator would; at each step the screen is
saved as SVG (Textual's own) and PNG (resvg), and a Markdown page walks through the steps.

So that a run repeats and a diff of ``docs/runbook/`` shows real changes only:

- The terminal is 140×40 and the clock is fixed: it starts at 09:00:00 UTC and moves on only
  between steps. Every event the console receives is stamped with it (log lines, requests,
  registration, heartbeats), so every time on screen comes from it.
- Values that differ on every run are replaced by fixed stand-ins, listed on each page and
  named in the header: process ids (the console 1000, workers 1101, 1102, …), the server's port
  (8002), the workspace folder (``/srv/fl``), heartbeat round trips (1.0 ms), transfer speeds
  (100 MB/s) and retry counts and delays in messages.
- Steps are taken in states that do not depend on timing: a peer is paused (SIGSTOP) while this
  site waits for it, so every round is captured after this site's contribution is in, and the
  peers' contributions arrive in the same order on every run (the same float sums).
- GPUs are sampled once per step, not on a timer. Without a GPU the pictures show the honest
  no-GPU panel; ``--simulate-gpus N`` shows a simulated feed, labelled SIMULATED on screen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.client.status import ClientStatus
from engine.events import (
    AdminRequestHandled,
    ConnectionChanged,
    Event,
    EventBus,
    GpuSampled,
    HeartbeatAcknowledged,
    LogRecord,
    ModelTransferred,
    RunChanged,
    ServerRoundAggregated,
    SiteConfigured,
    SiteJoined,
)
from fltui.bridge import SiteBridge

__all__ = [
    "SCENARIOS",
    "SIZE",
    "T0",
    "FixedClock",
    "RunbookBridge",
    "Scenario",
    "StandIns",
    "SteppedGpu",
    "generate",
    "main",
]

E = TypeVar("E", bound=Event)

SIZE = (140, 40)  # wide enough for the requests table's four columns
T0 = 1_767_258_000.0  # 2026-01-01 09:00:00 UTC: where the fixed clock starts in every scenario
STEP_S = 5.0  # the fixed clock's default move between two steps
STAND_IN_ROOT = "/srv/fl"
STAND_IN_PORT = 8002
CONSOLE_PID = 1000
FIRST_WORKER_PID = 1101
OTHER_PID = 1201
RTT_MS = 1.0
MB_PER_S = 100.0
ROUNDS = 3
PERIODIC = (HeartbeatAcknowledged, GpuSampled)  # not activity: they come on a timer
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- the clock


class FixedClock:
    """The runbook's clock: starts at ``start`` and moves only when told."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------- stand-ins


class StandIns:
    """Replaces what differs on every run (pids, port, folder, measured times) with fixed values.

    Args:
        root: the scenario's federation folder (shown as ``/srv/fl``).
        console_pid: this process (shown as 1000).
    """

    def __init__(self, root: Path, console_pid: int | None = None) -> None:
        self.roots = sorted({str(root), os.path.realpath(root)}, key=len, reverse=True)
        self.ports: set[int] = set()
        self.pids: dict[int, int] = {console_pid or os.getpid(): CONSOLE_PID}
        self._workers = FIRST_WORKER_PID
        self._others = OTHER_PID
        self._lock = threading.Lock()

    def pid(self, pid: int, worker: bool = False) -> int:
        with self._lock:
            if pid not in self.pids:
                if worker:
                    self.pids[pid], self._workers = self._workers, self._workers + 1
                else:
                    self.pids[pid], self._others = self._others, self._others + 1
            return self.pids[pid]

    _PID = re.compile(r"\b(pids?) (\d+)")
    _WORKER = re.compile(r"worker started \(pid (\d+)")
    _GAVE_UP = re.compile(r"gave up after \d+ attempts? in [\d.]+ s")
    _RETRY_IN = re.compile(r"retrying in [\d.]+ s")
    _MBPS = re.compile(r"[\d.]+ MB in [\d.]+ s \([\d.]+ MB/s\)")
    _MS = re.compile(r"in \d+(\.\d+)? ms\b")
    _TOKEN = re.compile(r"\btoken: [0-9a-f]{8}\.\.\.")

    def text(self, text: str) -> str:
        """A message with the stand-ins in place of the real values."""
        if not text:
            return text
        for root in self.roots:
            text = text.replace(root, STAND_IN_ROOT)
        for port in self.ports:
            text = re.sub(
                rf"(127\.0\.0\.1|localhost|\[::1\]):{port}\b", rf"\1:{STAND_IN_PORT}", text
            )
        for match in self._WORKER.finditer(text):
            self.pid(int(match.group(1)), worker=True)
        text = self._PID.sub(lambda m: f"{m.group(1)} {self.pid(int(m.group(2)))}", text)
        text = self._GAVE_UP.sub("gave up after N attempts in T s", text)
        text = self._RETRY_IN.sub("retrying in T s", text)
        text = self._MBPS.sub("N MB in T s (N MB/s)", text)
        text = self._TOKEN.sub("token: 0123abcd...", text)
        return self._MS.sub("in T ms", text)

    def event(self, event: E, ts: float) -> E:
        """``event`` stamped ``ts``, with stand-ins (a new event; events are frozen)."""
        changes: dict[str, Any] = {"ts": ts}
        if isinstance(event, RunChanged) and event.pid is not None:
            changes["pid"] = self.pid(event.pid, worker=True)
        if isinstance(event, HeartbeatAcknowledged):
            changes["rtt_ms"] = RTT_MS
        if isinstance(event, ModelTransferred) and event.seconds > 0:  # 0: not measured
            changes["seconds"] = event.nbytes / (MB_PER_S * 1e6)
        if isinstance(event, GpuSampled) and event.gpus:
            changes["gpus"] = [self._gpu(g) for g in event.gpus]
        if isinstance(event, SiteConfigured):
            changes["workspace"] = self.text(event.workspace)
        for name in ("message", "detail", "server"):
            value = getattr(event, name, None)
            if isinstance(value, str):
                changes[name] = self.text(value)
        return dataclasses.replace(event, **changes)

    def _gpu(self, gpu: dict[str, Any]) -> dict[str, Any]:
        procs = [
            {**p, "pid": self.pid(int(p["pid"]))} if p.get("pid") else p
            for p in gpu.get("processes", [])
        ]
        return {**gpu, "processes": procs}

    def describe(self) -> str:
        return (
            f"process ids (this console {CONSOLE_PID}, training workers {FIRST_WORKER_PID}, "
            f"{FIRST_WORKER_PID + 1}, …, others from {OTHER_PID}), the server's port "
            f"({STAND_IN_PORT}), the workspace folder (`{STAND_IN_ROOT}`), heartbeat round trips "
            f"({RTT_MS:.1f} ms), transfer speeds ({MB_PER_S:.0f} MB/s), and retry counts and "
            "delays in messages (N, T), session token prefixes (`0123abcd...`)"
        )


# ---------------------------------------------------------------------------------- the bridge


class RunbookBridge(SiteBridge):
    """A real bridge seen through the fixed clock and the stand-ins (runbook mode only).

    Actions go to ``inner`` unchanged; every event drained is restamped with the clock and has
    its stand-ins put in. The header says so.
    """

    def __init__(self, inner: Any, clock: FixedClock, stand_ins: StandIns) -> None:
        self.inner = inner
        self.clock = clock
        self.stand_ins = stand_ins
        self.mode = inner.mode
        self.seen: list[Event] = []  # everything the console got, as it got it
        self.activity = time.monotonic()
        self._gpu_seq = 0
        self.inner_heartbeats: list[float] = []
        bus = getattr(inner, "bus", None)
        if bus is not None:
            bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        # On the engine's thread, as it happens (drain() runs only when the console refreshes).
        if isinstance(event, HeartbeatAcknowledged):
            self.inner_heartbeats.append(time.monotonic())
        if not isinstance(event, PERIODIC):
            self.activity = time.monotonic()

    @property
    def site(self) -> str:  # type: ignore[override]
        return str(self.inner.site)

    @property
    def label(self) -> str:
        return f"{self.inner.label} · runbook: fixed clock, stand-ins"

    def drain(self) -> list[Event]:
        out = []
        for event in self.inner.drain():
            ts = self.clock()
            if isinstance(event, GpuSampled):  # each sample its own instant (the panel's history)
                self._gpu_seq += 1
                ts += self._gpu_seq * 1e-3
            out.append(self.stand_ins.event(event, ts))
        self.seen.extend(out)
        return out

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.seen if isinstance(e, kind)]

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> None:
        self.inner.stop()

    def transfer_mmars(self) -> list[str]:
        return list(self.inner.transfer_mmars())

    def latest_run(self) -> int | None:
        found = self.inner.latest_run()
        return int(found) if found is not None else None

    def deploy(self, mmar: str, run_number: int) -> str:
        return self.stand_ins.text(str(self.inner.deploy(mmar, run_number)))

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        return self.stand_ins.text(str(self.inner.start_training(run_number, gpus)))

    def abort(self) -> str:
        return self.stand_ins.text(str(self.inner.abort()))

    def restart(self) -> str:
        return self.stand_ins.text(str(self.inner.restart()))

    def validate(self) -> str:
        return self.stand_ins.text(str(self.inner.validate()))

    def shutdown(self) -> str:
        return self.stand_ins.text(str(self.inner.shutdown()))


class SteppedGpu:
    """A GPU sampler (NVML's, or the SIMULATED one) that samples when the runbook says.

    On a timer, how many samples a picture has seen would depend on timing; here each step
    takes the same number.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.bus: EventBus | None = None
        self.site = ""

    def start(self, bus: EventBus, site: str, interval: float = 1.0) -> None:
        self.bus, self.site = bus, site

    def stop(self, timeout: float = 2.0) -> bool:
        shutdown = getattr(self.sampler, "shutdown", None)
        if shutdown is not None:
            shutdown()
        return True

    def tick(self, samples: int = 1) -> GpuSampled | None:
        event = None
        for _ in range(samples):
            event = self.sampler.sample(self.site)
            if self.bus is not None:
                self.bus.publish(event)
        return event


# ---------------------------------------------------------------------------------- federation


class Federation:
    """A federation of this site and ``sites - 1`` peers on loopback, for one scenario.

    The server runs in this process (so a scenario can stop and start it); peers run as
    ``fltui --no-ui`` child processes with training in their own process (so that SIGSTOP
    pauses all of a peer).
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
    ) -> None:
        from engine.demo import prepare_workspace
        from engine.fileio import save_json_atomic
        from engine.site import SitePaths

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
        )
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
                paths.transfer / "demo_mmar" / "config" / "config_fed_client.json",
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
        from engine.config import load_server_config
        from engine.demo import _set_admin_port, _set_port
        from engine.fileio import load_npz
        from engine.server import FederatedServer
        from engine.site import SitePaths

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

    def start_peers(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
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
        for proc in self.peers.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.peers.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stop_server()


# ---------------------------------------------------------------------------------- pages


@dataclass
class Step:
    slug: str
    title: str
    text: str
    files: list[str] = field(default_factory=list)
    extra: str = ""  # Markdown after the picture (a command's output, an audit trail)


@dataclass
class Page:
    number: int
    slug: str
    title: str
    intro: str
    steps: list[Step] = field(default_factory=list)
    outro: str = ""

    @property
    def name(self) -> str:
        return f"{self.number:02d}-{self.slug}"

    def markdown(self, gpu_note: str) -> str:
        lines = [f"# {self.number}. {self.title}", "", self.intro.strip(), ""]
        for i, step in enumerate(self.steps, 1):
            png = f"{self.name}/{i:02d}-{step.slug}.png"
            svg = f"{self.name}/{i:02d}-{step.slug}.svg"
            lines += [f"## Step {i}: {step.title}", ""]
            lines += [f"[![{step.title}]({png})]({svg})", ""]
            lines += [step.text.strip(), ""]
            if step.extra:
                lines += [step.extra.strip(), ""]
        if self.outro:
            lines += [self.outro.strip(), ""]
        lines += [
            "---",
            "",
            f"*Made by `fltui runbook` ([how](README.md#how-the-pictures-are-made)). {gpu_note}*",
            "",
        ]
        return "\n".join(lines)


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
        from fltui.screens.dashboard import Dashboard

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
        from textual.widgets import Input

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
        from fltui.screenshot import svg_to_png

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


# ---------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    number: int
    slug: str
    title: str
    intro: str
    sites: int
    play: Callable[[Run], Awaitable[None]]
    rounds: int = ROUNDS
    heartbeat_interval: float = 1.0
    retry_timeout: float = 30.0
    policy: dict[str, Any] | None = None
    peers_lockstep: bool = True


async def _first_start(run: Run) -> None:
    await run.registered()
    await run.shot(
        "registered",
        "The dashboard a moment after start",
        """
The header is the site's connection: the site's name, the server it talks to (from
`startup/fed_client.json`), whether TLS is on, the connection state (`registered`: the server
knows this site and gave it a session token), the age of the token and the last heartbeat with
its round trip. The end of the header says where the engine runs: here `engine in this
console`, because no site service ran for the workspace, so the console started the engine
itself; where the site runs as a service the header says `attached to service (pid N)` and
quitting the console leaves the site running. A red header means the connection is in
trouble: see [a site that lost its server](06-lost-server.md).

**Client** shows what the site's training is doing (`training not started` until a run is
started) and with which run, MMAR and worker process. **Round** shows the federation's round,
phase and progress once training runs. **GPUs** shows every GPU of this machine and which of
the site's processes use it; where there is none it says why and what to do (training then runs
on the CPU). **Requests** lists every admin request from the federation and every action taken
here, and **Logs** the site's log.
""",
    )
    await run.press("question_mark")
    await run.until(lambda: type(run.app.screen).__name__ == "HelpScreen", "the help screen")
    await run.shot(
        "help",
        "Every key, with `?`",
        """
`?` lists every key; any key closes the list. Keys that change what the site does (`a` abort,
`r` restart, `x` stop the site) ask before they act. `p` saves the screen as SVG and PNG under
the workspace's `screenshots/` folder, for a support ticket.
""",
    )
    await run.press("escape")
    await run.press("ctrl+p")
    await run.until(lambda: type(run.app.screen).__name__ == "CommandPalette", "the palette")
    await run.pilot.pause(0.5)
    await run.shot(
        "palette",
        "Every action and theme in the command palette (`ctrl+p`)",
        """
`ctrl+p` opens the command palette: type a few letters of an action (`dep`, `abort`) or a theme
and press Enter. `Esc` closes it.
""",
    )
    await run.press("escape")


async def _deploy_and_start(run: Run) -> None:
    await run.registered()
    await run.press("d")
    await run.until(lambda: type(run.app.screen).__name__ == "DeployScreen", "the deploy dialog")
    await run.shot(
        "deploy-dialog",
        "`d`: choose an MMAR and a run number",
        """
`d` lists the MMARs offered in the workspace's `transfer/` folder (or type the path of an MMAR
folder). The run number is the next free one: run 1 is already deployed here, so `2`. Choose
with the arrow keys and Enter, then Enter again to deploy.
""",
    )
    await run.press("enter", "enter")
    await run.last_action("deploy: ")
    await run.shot(
        "deployed",
        "Deployed: `run_2/mmar_site-1`",
        """
The MMAR was checked whole before anything was written (no paths outside the MMAR, no links,
no code under `custom/` unless the site policy allows it), then copied to
`run_2/mmar_site-1/` in the workspace. The notice says what was done, and the Requests panel has
the action as the audit log records it (origin `local`: a key on this console; a request from
the federation shows the admin's name).
""",
    )
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.shot(
        "start-dialog",
        "`s`: start the run",
        """
`s` asks which deployed run to train (the newest by default) and, on a machine with several
GPUs, on how many.
""",
    )
    await run.press("enter")
    await run.last_action("start: ")
    await run.waiting_after(1)
    await run.shot(
        "training",
        "Training: round 1 is done here, the other site is still working",
        """
The status is `training started`, the worker process is named, and **Round** shows round 1 of
3. This site has trained its round (313 steps, the final loss), sent its contribution (the
`↑ contribution` line) and now waits for the server's next global model, which comes once the
other site has sent its own. Watching a round is the [next page](03-watch-a-round.md).
""",
    )


async def _watch_a_round(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")

    async def round_1() -> None:
        await run.shot(
            "round-1",
            "Round 1: trained, contribution sent, waiting for the others",
            """
A round goes through these phases, shown after the round number: `pulling model` (the global
model comes down), `training` (the bar fills, with the step, the loss and an ETA),
`submitting` (the difference between the trained and the global model goes up), `waiting for
the others`, then `validating global model` once the server has averaged every site's
contribution. Here this site has finished round 1 and waits for the server's next global model:
the bar is full (313 of 313 steps), the loss is the last step's, and `↑ contribution` is the
upload just made.

Nothing to do while a round runs. A site that waits much longer than its peers usually waits
for a slow or stopped peer: the federation's admin sees which one.
""",
            advance=12,
        )

    async def round_2() -> None:
        await run.shot(
            "round-2",
            "Round 2: the global model after round 1, measured here",
            """
When a round closes, each site measures the new global model on its own validation data:
`global accuracy` lists these values round after round (the newest last). The site has trained
round 2 and waits again.
""",
            advance=12,
        )

    await run.rounds_in_lockstep(ROUNDS, {1: round_1, 2: round_2})
    await run.finished()
    await run.shot(
        "completed",
        "The federation completed",
        """
After the last round the status reads `training stopped — federation completed`, the worker
process has exited (`no worker`), and **Round** shows the global accuracy of every round with a
sparkline, and the final value. Before it stopped, the site ran cross-site validation (see
[page 5](05-cross-site-validation.md)).

The GPU panel shows the same at every step on a machine without GPUs. With GPUs, each has a line
with its utilisation and history, memory, temperature and power, and the processes of this
site that use it (`ours`).
""",
    )


async def _abort_and_restart(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.waiting_after(1)
    await run.press("a")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.shot(
        "abort-asks",
        "`a`: abort asks first",
        """
`a` stops the site's training after a question (`y` or Enter: abort, `n` or Esc: go on
training). Abort when the federation's admin asks for it, when the run is the wrong one, or
when the machine is needed for something else.
""",
    )
    await run.press("y")
    await run.last_action("abort: ")
    await run.until(lambda: run.state.worker_pid is None, "the worker is gone")
    await run.until(lambda: run.state.outcome == "aborted", "the outcome is shown")
    await run.shot(
        "aborted",
        "Aborted: no worker is left",
        """
The worker got an abort command, then SIGTERM to its whole process group, then SIGKILL: the
action returns only when no process of the group is left, so no orphan holds a GPU. The status
is `training stopped`, the worker is gone (`no worker`), and **Requests** has `train.abort`.
The site is still registered with the server: start again with `s`, or restart the engine with
`r` for a fresh session.
""",
    )
    registrations = sum(1 for e in run.bridge.of(ConnectionChanged) if e.state == "registered")
    await run.press("r")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.shot(
        "restart-asks",
        "`r`: restart the site engine",
        """
`r` restarts the site's engine, after a question: training stops, the site says goodbye to the
server and registers again with a new session. Use it after the server was restarted, when the
site's session was dropped, or after changing `startup/` files.
""",
    )
    # Right after a heartbeat: the old engine closes its channel before its next one is due
    # (a heartbeat racing the close would add a warning to the picture, or not).
    beats = run.heartbeats()
    await run.until(lambda: run.heartbeats() > beats, "a heartbeat", 30)
    await run.press("y")
    await run.last_action("restart: ")
    await run.registered(after=registrations)
    await run.shot(
        "restarted",
        "Restarted: a new session",
        """
The engine registered again: the token is new (its age starts again) and **Requests** lists
`train.restart`. The site waits for the next `s` or for the federation's `start`.
""",
    )


async def _cross_site_validation(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.rounds_in_lockstep(2)
    await run.finished()
    await run.shot(
        "completed",
        "The run completed; cross-site validation ran at its end",
        """
With `cross_site_validate: true` in the MMAR's `config_fed_client.json` (the demo MMAR has it),
every site sends its best local model to the server after the last round, and every site
validates every model (each site's and the server's global one) on its own validation data.
**Round** shows what this site measured, one number per model (`cross-site accuracy: server …
· site-1 … · site-2 …`); **Client** keeps the run's outcome.
""",
        heartbeat=True,
    )
    before = len(run.bridge.of(LogRecord))
    runs = len(run.bridge.of(RunChanged))
    await run.press("v")
    await run.last_action("validate: ")
    await run.until(
        lambda: any(
            "cross-site validation done" in e.message for e in run.bridge.of(LogRecord)[before:]
        ),
        "the validation finished",
        120,
    )
    await run.until(
        lambda: (
            any(not e.running for e in run.bridge.of(RunChanged)[runs:])
            and run.state.status == ClientStatus.TRAINING_STOPPED
        ),
        "the validation worker exited",
        60,
    )
    await run.shot(
        "validated",
        "`v`: validate again, on this site's data",
        """
`v` runs cross-site validation again on this site's data (the federation's admin can ask for
it too: `fltui admin … validate all`). It runs in a worker process like training; meanwhile
**Client** says `cross site validation`, and **Round** fills in each model's result as it comes.
The log says how many models were validated.
""",
    )
    results = _cross_site_table(run)
    run.page.steps[-1].extra = (
        "Each model's results are events of the site (`CrossSiteValidated`), in "
        "`logs/events.jsonl` of the workspace and in `fltui --no-ui --json` output:\n\n"
        "```sh\ngrep CrossSiteValidated logs/events.jsonl\n```\n\n" + results
    )


def _cross_site_table(run: Run) -> str:
    from engine.site import SitePaths

    path = SitePaths(run.fed.site).logs / "events.jsonl"
    rows: dict[str, dict[str, float]] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if data.get("event") == "CrossSiteValidated":
                    rows[str(data["model_owner"])] = data["metrics"]  # the newest wins
    if not rows:
        return "(no results were recorded)"
    lines = [
        "| model of | accuracy on site-1's data | loss |",
        "|---|---|---|",
    ]
    for owner in sorted(rows):
        metrics = rows[owner]
        lines.append(
            f"| {owner} | {metrics.get('accuracy', float('nan')):.3f} "
            f"| {metrics.get('loss', float('nan')):.3f} |"
        )
    return (
        "\n".join(lines)
        + "\n\nThe `server` row is the final global model; a site's row is its best local "
        "model. A site's own model usually does best on its own data (the demo's data is "
        "non-IID); the global model should do well everywhere."
    )


async def _lost_server(run: Run) -> None:
    await run.registered()
    await run.fresh_heartbeat()
    run.fed.stop_server()
    # The next heartbeat is due heartbeat_interval (30 s) after the last one: the clock says so.
    run.clock.advance(30)
    await run.until(
        lambda: any("heartbeat to" in e.message for e in run.bridge.of(LogRecord)),
        "a heartbeat failed",
        60,
    )
    await run.until(
        lambda: any("admin Retrieve" in e.message for e in run.bridge.of(LogRecord)),
        "the admin channel failed",
        30,
    )
    await run.shot(
        "server-gone",
        "The server stopped answering",
        """
The first signs: the last heartbeat gets older in the header (`heartbeat 30 s ago`), and the
log has one warning for the failed heartbeat and one for the admin channel (which polls the
server for the federation's requests). The connection state still reads `registered`: nothing
else has talked to the server yet. A site that is training notices at its next call (next
step).
""",
        advance=5,
        heartbeat=False,
    )
    stopped = len(run.bridge.of(RunChanged))
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.until(lambda: run.state.outcome == "failed", "training failed", 120)
    await run.until(
        lambda: any(not e.running for e in run.bridge.of(RunChanged)[stopped:]),
        "the worker exited",
        60,
    )
    await run.shot(
        "failed",
        "Training cannot reach the server: retried, then failed",
        """
Training's calls to the server are retried with backoff for `retry_timeout` seconds (from the
MMAR's `config_fed_client.json`, else the startup kit's; 5 s in this runbook, 30 s in the demo
MMAR). Meanwhile the header turns red and says
`retrying`; then `failed`, the client panel shows the last error (here gRPC's words:
connection refused), and the round panel `federation failed`.

What to do:

1. Ask the federation's admin whether the server is up (the address is in the header and in
   `startup/fed_client.json`).
2. From this machine, check that the server's port can be reached (`nc -vz HOST PORT`): a
   firewall, a proxy or a changed address shows here as `connection refused` or a timeout.
3. TLS or authentication failures are not retried and say so in the header's place of
   `failed` (see Secure federation in the README): those need the admin's new kit, not a retry.
4. Once the server is back, restart the site engine with `r` (next step).
""",
        advance=30,
        heartbeat=False,
    )
    registrations = sum(1 for e in run.bridge.of(ConnectionChanged) if e.state == "registered")
    logs = len(run.bridge.of(LogRecord))
    await run.press("r")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.press("y")
    # The new engine tries to register while the server is still down; the server comes back
    # before its retries run out. (A channel that waited for a dead server reconnects after a
    # backoff of its own: starting the server first would make the picture depend on it.)
    await run.until(
        lambda: any(
            "Register to" in e.message and "retrying" in e.message
            for e in run.bridge.of(LogRecord)[logs:]
        ),
        "the new engine tried to register",
        60,
    )
    run.fed.start_server()  # on the same port
    await run.registered(after=registrations)
    await run.last_action("restart: ")
    await run.shot(
        "back",
        "The server is back: `r`, registered again",
        """
`r` restarted the site's engine: the old session was closed (the server could not be told:
`quit failed`), and the new engine registered, retrying until the server answered (one warning
for the first failed try). The header is `registered` again, with a fresh token and heartbeat.
The last error stays on the client panel until the next run starts. Start training again with
`s`, or wait for the federation's `start`.

A site whose server comes back while its engine runs also registers again by itself at its next
heartbeat (`the server no longer knows this site; registering again`); `r` does it at once.
""",
    )


POLICY = {
    "allow_byoc": False,
    "allowed_commands": ["check_status", "sys_info", "validate", "abort", "shell"],
    "read_only": False,
    "max_deploy_bytes": 2147483648,
    "shell_timeout": 10,
    "shell_max_output": 65536,
}


async def _refused_request(run: Run) -> None:
    await run.registered()
    outputs = []
    for words in (
        ["check_status", "client", "site-1"],
        ["set_run_number", "2"],
        ["deploy", "demo_mmar", "client", "site-1"],
    ):
        done = await asyncio.to_thread(run.fed.admin, *words)
        text = run.bridge.stand_ins.text((done.stdout + done.stderr).strip())
        outputs.append(f"$ fltui admin --workspace ADMIN_KIT {' '.join(words)}\n{text}")
    await run.until(
        lambda: (
            [e.topic for e in run.bridge.of(AdminRequestHandled)]
            == ["train.check_status", "train.deploy"]
        ),
        "both requests reached the site",
        60,
    )
    await run.shot(
        "refused",
        "A request that the site policy refuses",
        """
The federation's admin asked this site for its status (allowed) and then to deploy an MMAR,
which this site's policy does not allow: **Requests** lists both, with their origin (the
admin's name, from the admin's certificate where the federation uses TLS) and outcome
`refused`; the highlighted request's reason is on the panel's lower border. The admin got an
error reply naming the rule; the site did nothing else.
""",
        extra="The admin's side:\n\n```text\n" + "\n\n".join(outputs) + "\n```",
    )
    from fltui.screens.request import RequestScreen
    from fltui.widgets.requests_panel import RequestsPanel

    run.dash.query_one(RequestsPanel).focus()
    await run.press("enter")
    await run.until(lambda: isinstance(run.app.screen, RequestScreen), "the request opened")
    await run.shot(
        "request",
        "Enter on a request: all of it",
        """
`enter` on a request opens it whole: who asked, when, the outcome, and the reason of a refusal
word for word, as the admin was told. The arrows choose the request (**Requests** has the keys
when the console opens; `tab` moves them between it and the log). `esc` closes it.
""",
    )
    await run.press("escape")
    await run.shot(
        "policy",
        "Why: the site's policy and the audit log",
        """
The policy is the site's own file, `startup/site_policy.json` (`fltui check-config` checks it).
Here it lets the federation check status, ask for system information and validation, run
read-only shell commands and abort, but not deploy or start: those stay with the site's
operator (`d`, `s`). A missing file allows every command; `read_only: true` allows only
`check_status`, `sys_info` and `shell`.

Every request, allowed or not, and every local action is one line of `logs/audit.jsonl` in
the workspace, with the reason for a refusal. For a question about a request, look there.
""",
        extra=_policy_and_audit(run),
    )


def _policy_and_audit(run: Run) -> str:
    from engine.site import SitePaths

    paths = SitePaths(run.fed.site)
    policy = json.dumps(POLICY, indent=1)
    audit = []
    stamped = run.bridge.of(AdminRequestHandled)
    with contextlib.suppress(OSError):
        lines = (paths.logs / "audit.jsonl").read_text().splitlines()
        for line, event in zip(lines, stamped, strict=False):
            record = json.loads(line)
            # the file has the real time; the runbook shows the fixed clock's, as on screen
            record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(event.ts))
            record["detail"] = run.bridge.stand_ins.text(str(record.get("detail", "")))
            audit.append(json.dumps(record, ensure_ascii=False))
    return (
        "`startup/site_policy.json`:\n\n```json\n"
        + policy
        + "\n```\n\n`logs/audit.jsonl`:\n\n```json\n"
        + "\n".join(audit)
        + "\n```"
    )


SCENARIOS = [
    Scenario(
        1,
        "first-start",
        "First start: connect and read the dashboard",
        """
An operator starts the console on the site's machine (`fltui --workspace DIR`, or with the
site running as a service, the same command attaches to it). The console connects to the
federation's server named in the startup kit and shows the site at a glance.
""",
        sites=1,
        play=_first_start,
    ),
    Scenario(
        2,
        "deploy-and-start",
        "Deploy an MMAR and start a run",
        """
An MMAR (the training's configuration, code and models, in Clara's layout) is deployed into a
numbered run and then started. Here the operator does both with keys; the federation's admin
can do the same from `fltui admin` where the site policy allows it.
""",
        sites=2,
        play=_deploy_and_start,
    ),
    Scenario(
        3,
        "watch-a-round",
        "Watch a round: phases, progress, metrics, GPUs",
        """
Once a run is started, the console follows it round by round. This federation has two sites
and 3 rounds of federated averaging on the demo's synthetic data.
""",
        sites=2,
        play=_watch_a_round,
    ),
    Scenario(
        4,
        "abort-and-restart",
        "Abort a run and restart the client",
        """
Stopping a run and giving the site a fresh session with the server: two keys, each asking
first.
""",
        sites=2,
        play=_abort_and_restart,
        heartbeat_interval=5.0,
    ),
    Scenario(
        5,
        "cross-site-validation",
        "Cross-site validation and reading its results",
        """
Cross-site validation measures every site's model, and the server's global model, on every
site's own data: it shows whether the federated model works here, and how far the sites' data
differ.
""",
        sites=2,
        rounds=2,
        play=_cross_site_validation,
    ),
    Scenario(
        6,
        "lost-server",
        "A site that lost its server: what the screen says and what to do",
        """
The server stops answering (it crashed, was restarted, or the network between the site and
the server broke). What the console shows, in order, and how to get the site back.
""",
        sites=1,
        play=_lost_server,
        heartbeat_interval=30.0,
        retry_timeout=5.0,
    ),
    Scenario(
        7,
        "refused-request",
        "A refused request (site policy) and the audit trail",
        """
The site decides what the federation may ask of it, in its policy file. A request the policy
does not allow is refused with a reason, and every request is in the audit log.
""",
        sites=1,
        play=_refused_request,
        policy=POLICY,
    ),
]


# ---------------------------------------------------------------------------------- driving


def _gpu_note(sample: GpuSampled | None, simulated: int) -> str:
    if simulated:
        return (
            f"GPUs: {simulated} SIMULATED (`--simulate-gpus {simulated}`), labelled so on screen."
        )
    if sample is None or not sample.available:
        reason = sample.reason if sample is not None else "no sample"
        return f"GPUs: none on the machine that made the pictures ({reason})."
    return f"GPUs: the real GPUs of the machine that made the pictures ({len(sample.gpus)})."


@contextlib.contextmanager
def _utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


async def _play(
    scenario: Scenario,
    out: Path,
    work: Path,
    initial_model: Path | None,
    sampler: Any,
    theme: str,
) -> tuple[Page, GpuSampled | None]:
    from fltui.app import create_app
    from fltui.bridge import LocalBridge

    root = work / f"{scenario.number:02d}-{scenario.slug}"
    fed = Federation(
        root,
        initial_model,
        sites=scenario.sites,
        rounds=scenario.rounds,
        heartbeat_interval=scenario.heartbeat_interval,
        retry_timeout=scenario.retry_timeout,
        policy=scenario.policy,
    )
    page = Page(scenario.number, scenario.slug, scenario.title, scenario.intro)
    clock = FixedClock()
    gpu = SteppedGpu(sampler)
    stand_ins = StandIns(root)
    try:
        fed.start_server()
        stand_ins.ports.add(fed.port)
        fed.lockstep = scenario.peers_lockstep
        fed.start_peers()
        inner = LocalBridge(fed.site, gpu_sampler=gpu)
        bridge = RunbookBridge(inner, clock, stand_ins)
        app = create_app(fed.site, theme=theme, bridge=bridge, clock=clock, gpu_sampler=gpu)
        app.animation_level = "none"  # a picture never catches a bar or a notice half-way
        notify = app.notify

        def lasting_notify(message: str, **kwargs: Any) -> None:
            # A notice stays until its step's picture is taken (a timeout would make whether it
            # shows depend on timing); the runbook clears them after each picture.
            kwargs["timeout"] = 3600
            notify(message, **kwargs)

        app.notify = lasting_notify  # type: ignore[method-assign]
        failure: list[BaseException] = []

        async def drive(pilot: Any) -> None:
            run = Run(app, pilot, bridge, fed, gpu, page, out)
            try:
                await run.until(lambda: run.dash, "the dashboard", 30)
                for name in fed.peers:  # every peer has joined (and is paused, in lockstep)
                    await run.until(functools.partial(fed.joined, name), f"{name} joined", 120)
                await scenario.play(run)
            except BaseException as exc:  # reported after the app has closed
                failure.append(exc)
            finally:
                app.exit()

        await app.run_async(headless=True, size=SIZE, auto_pilot=drive)
        if failure:
            raise failure[0]
        sample = next((e for e in reversed(bridge.seen) if isinstance(e, GpuSampled)), None)
        return page, sample
    finally:
        fed.close()


def _initial_model(work: Path) -> Path:
    """The demo model's seeded start, made once (in a child process: no torch here)."""
    from engine.training import demo_mmar_path

    out = work / "initial_model.npz"
    if not out.exists():
        scratch = work / "initial_mmar"
        shutil.copytree(demo_mmar_path(), scratch, dirs_exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "engine.training.initial_model", str(scratch), str(out)],
            check=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return out


def generate(
    out: Path,
    only: list[int] | None = None,
    simulate_gpus: int = 0,
    sampler: Callable[[], Any] | None = None,
    theme: str = "dark",
    keep: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Plays the scenarios (all, or the numbers in ``only``) and writes the runbook to ``out``.

    With every scenario, ``out/README.md`` (the index) and ``out/runbook.json`` are written too.

    Args:
        simulate_gpus: show N SIMULATED GPUs (labelled so) instead of this machine's.
        sampler: makes the GPU sampler each scenario steps (tests); default NVML's, or the
            simulated one (a fresh one per scenario: one scenario's pictures do not depend on
            which ran before it).
        keep: keep the federations' workspaces under this folder (else a temporary one).

    Returns:
        the Markdown pages written.

    Raises:
        StepTimeout: a scenario did not reach a state it waits for.
    """
    from engine.gpu import GpuSampler, simulated_feed

    chosen = [s for s in SCENARIOS if not only or s.number in only]
    if sampler is None:

        def sampler() -> Any:
            return simulated_feed(simulate_gpus, seed=0) if simulate_gpus else GpuSampler()

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fltui-runbook-", dir=keep))
    pages: list[Path] = []
    samples: list[GpuSampled | None] = []
    try:
        with _utc():
            model = _initial_model(work)
            for scenario in chosen:
                started = time.monotonic()
                folder = out / f"{scenario.number:02d}-{scenario.slug}"
                if folder.exists():
                    shutil.rmtree(folder)  # no picture of an older run stays behind
                page, sample = asyncio.run(_play(scenario, out, work, model, sampler(), theme))
                samples.append(sample)
                note = _gpu_note(sample, simulate_gpus)
                path = out / f"{page.name}.md"
                path.write_text(page.markdown(note), encoding="utf-8")
                pages.append(path)
                say(f"{page.name}: {len(page.steps)} steps in {time.monotonic() - started:.0f} s")
        if len(chosen) == len(SCENARIOS):
            sample = next((s for s in samples if s is not None), None)
            _write_index(out, _gpu_note(sample, simulate_gpus), simulate_gpus, sample)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return pages


def _write_index(out: Path, gpu_note: str, simulate_gpus: int, sample: GpuSampled | None) -> None:
    lines = [
        "# Runbooks: the console, step by step",
        "",
        "Pictures of the real console (`fltui`) in the situations a site operator meets, taken "
        "by the app itself (`fltui runbook`) against a real federation on one machine: the "
        "reference server, this site's engine and a peer site, real training on the demo's "
        "synthetic data.",
        "",
    ]
    for s in SCENARIOS:
        lines.append(f"{s.number}. [{s.title}]({s.number:02d}-{s.slug}.md)")
    lines += [
        "",
        "Each picture links to its SVG (Textual's own export; sharp at any size, and its text "
        "can be searched and copied).",
        "",
        "## How the pictures are made",
        "",
        "```sh",
        "fltui runbook --out docs/runbook              # every scenario (a few minutes)",
        "fltui runbook --out docs/runbook --only 7     # one scenario",
        "fltui runbook --out DIR --simulate-gpus 2     # with a SIMULATED GPU feed",
        "```",
        "",
        f"- The terminal is {SIZE[0]}×{SIZE[1]} and the theme `dark`.",
        "- The clock is fixed: each scenario starts at 09:00:00 UTC and the clock moves only "
        "between steps; every time on screen (log lines, requests, the token's and the last "
        "heartbeat's age) comes from it.",
        "- What differs on every run is shown as fixed stand-ins, and the header says "
        f"`runbook: fixed clock, stand-ins`: {StandIns(Path('/')).describe()}.",
        "- Steps are taken in states that do not depend on timing: the peer site is paused "
        "while this site waits for it, so each round is pictured after this site's "
        "contribution is in, and the contributions arrive in the same order on every run.",
        f"- {gpu_note}",
        "",
        "So a second run gives the same SVGs, and a diff of this folder shows what changed in "
        "the console. PNGs are rendered from the SVGs by resvg (`resvg-py`) with DejaVu Sans "
        "Mono; their pixels depend on the machine's fonts. "
        "`tests/ui/test_runbook.py` regenerates one scenario and compares it with this folder.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    manifest = {
        "size": list(SIZE),
        "clock_start": T0,
        "simulate_gpus": simulate_gpus,
        "gpu": (
            None
            if sample is None
            else {
                "available": sample.available,
                "reason": sample.reason,
                "simulated": sample.simulated,
            }
        ),
        "scenarios": [{"number": s.number, "slug": s.slug, "title": s.title} for s in SCENARIOS],
    }
    (out / "runbook.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------- CLI


def _only(text: str) -> list[int]:
    numbers = []
    for part in text.split(","):
        part = part.strip()
        match = next((s for s in SCENARIOS if part in (str(s.number), s.slug)), None)
        if match is None:
            names = ", ".join(f"{s.number} {s.slug}" for s in SCENARIOS)
            raise argparse.ArgumentTypeError(f"no scenario {part!r} (scenarios: {names})")
        numbers.append(match.number)
    return numbers


def main(argv: list[str]) -> int:
    """``fltui runbook``; returns the exit code (0 written, 1 a scenario failed, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="fltui runbook",
        description="Drive the console through the operator's scenarios against a demo "
        "federation on this machine and write screenshots (SVG, PNG) and Markdown pages.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    parser.add_argument(
        "--only",
        type=_only,
        default=None,
        metavar="N[,N...]",
        help="only these scenarios (numbers or names); the index is written with all of them",
    )
    parser.add_argument(
        "--simulate-gpus",
        type=int,
        default=0,
        metavar="N",
        help="show N SIMULATED GPUs (labelled so on screen) instead of this machine's",
    )
    parser.add_argument("--theme", default="dark", help="dark (default), light, high_contrast")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the scenarios' federation workspaces under DIR (for a look at their logs)",
    )
    args = parser.parse_args(argv)
    if args.simulate_gpus < 0:
        parser.error("--simulate-gpus must be 0 or more")
    from fltui.themes import load_themes

    if args.theme not in load_themes():
        parser.error(f"unknown theme {args.theme!r}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        pages = generate(
            args.out,
            only=args.only,
            simulate_gpus=args.simulate_gpus,
            theme=args.theme,
            keep=args.keep,
        )
    except StepTimeout as exc:
        print(f"fltui runbook: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"{len(pages)} pages under {args.out} in {time.monotonic() - started:.0f} s")
    return 0
