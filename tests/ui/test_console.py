"""The console under Pilot against the real engine: every key, modal and palette command."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.binding import Binding
from textual.command import Command, CommandInput, CommandList, CommandPalette
from textual.pilot import Pilot

from engine.config import load_server_config
from engine.demo import _set_port, prepare_workspace
from engine.events import CrossSiteValidated, EventBus, StatusChanged
from engine.fileio import load_npz
from engine.server import FederatedServer
from engine.site.paths import SitePaths
from engine.status import ClientStatus
from fltui.app import ACTIONS, FLTuiApp, create_app
from fltui.screens.confirm import ConfirmScreen
from fltui.screens.dashboard import Dashboard
from fltui.screens.deploy import DeployScreen
from fltui.screens.first_run import FirstRunScreen
from fltui.screens.help import HelpScreen
from fltui.screens.start import StartScreen
from fltui.themes import load_themes, theme_name
from fltui.widgets.log_panel import LogPanel
from tests.conftest import Recorder
from tests.ui.replay import NoSampler


def _site(tmp_path: Path, rounds: int, steps: int) -> tuple[FederatedServer, Path]:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=rounds, heartbeat_interval=0.5)
    cfg = load_server_config(tmp_path / "server" / "config_fed_server.json")
    server = FederatedServer(
        cfg,
        tmp_path / "server",
        load_npz(tmp_path / "server" / "models" / "initial_model.npz"),
        EventBus(),
        long_poll=0.5,
    )
    port = server.start("127.0.0.1:0")
    site = tmp_path / "site-1"
    _set_port(SitePaths(site).kit, port)
    for mmar in (SitePaths(site).transfer / "demo_mmar", SitePaths(site).mmar(1, "site-1")):
        path = mmar / "config" / "config_fed_client.json"
        data = json.loads(path.read_text())
        data["client"]["steps_aggregation"] = steps
        path.write_text(json.dumps(data))
    return server, site


def _run(
    app: FLTuiApp,
    test: Callable[[FLTuiApp, Pilot[None]], Awaitable[None]],
    size: tuple[int, int] = (120, 40),
) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await test(app, pilot)

    asyncio.run(main())


async def _until(pilot: Pilot[None], check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.1)
    raise AssertionError(f"not reached within {timeout} s: {check}")


def _dash(app: FLTuiApp) -> Dashboard:
    assert isinstance(app.screen, Dashboard), app.screen
    return app.screen


async def _palette(pilot: Pilot[None], app: FLTuiApp, title: str, typed: bool = True) -> None:
    """Runs ``title`` from the command palette (typed key by key, or pasted whole).

    The keys of a title are also the dashboard's bindings ("d", "s", "a"...): they are typed
    only once the palette's input has the focus, and enter is pressed only once the palette has
    finished searching for the whole title and lists it.
    """
    await pilot.press("ctrl+p")
    palette = await _until(pilot, lambda: isinstance(app.screen, CommandPalette) and app.screen)
    field = await _until(pilot, lambda: isinstance(app.focused, CommandInput) and app.focused)
    if typed:
        await pilot.press(*title)
    else:
        field.insert_text_at_cursor(title)

    def listed() -> int | None:
        if palette.query_one(CommandInput).value != title:
            return None
        group = CommandPalette._GATHER_COMMANDS_GROUP
        if any(w.group == group and not w.is_finished for w in app.workers):
            return None  # still searching: the list is about to be replaced
        commands = palette.query_one(CommandList)
        for index in range(commands.option_count):
            option = commands.get_option_at_index(index)
            if isinstance(option, Command) and str(option.hit.text) == title:
                return index + 1
        return None

    index = await _until(pilot, listed) - 1
    palette.query_one(CommandList).highlighted = index
    await pilot.press("enter")
    await _until(pilot, lambda: not isinstance(app.screen, CommandPalette))


@pytest.mark.slow
def test_keys_deploy_start_abort_and_restart_the_real_site(tmp_path: Path) -> None:
    server, site = _site(tmp_path, rounds=200, steps=300)
    app = create_app(site, gpu_sampler=NoSampler())

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        await _until(pilot, lambda: dash.state.registered_at is not None)
        # d: deploy transfer/demo_mmar as the next run (2)
        await pilot.press("d")
        await _until(pilot, lambda: isinstance(app.screen, DeployScreen))
        await pilot.press("enter")  # choose the highlighted MMAR
        await pilot.press("enter")  # accept run 2
        await _until(pilot, lambda: (site / "run_2" / "mmar_site-1" / "config").is_dir())
        await _until(pilot, lambda: "deploy: deployed demo_mmar" in dash.last_action)
        # s: start run 2
        await pilot.press("s")
        start = await _until(pilot, lambda: isinstance(app.screen, StartScreen) and app.screen)
        assert start.query_one("#run").value == "2"
        await pilot.press("enter")
        await _until(
            pilot,
            lambda: dash.state.status == ClientStatus.TRAINING_STARTED and dash.state.worker_pid,
        )
        pid = dash.state.worker_pid
        await _until(pilot, lambda: dash.state.round >= 1)
        # a: abort asks first; n keeps training
        await pilot.press("a")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))
        assert dash.state.status == ClientStatus.TRAINING_STARTED
        await pilot.press("a")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STOPPED)
        await _until(pilot, lambda: not os.path.exists(f"/proc/{pid}"))
        await _until(pilot, lambda: "abort: training aborted" in dash.last_action)
        # r: restart asks first, then the engine registers again
        registered = dash.state.registered_at
        await pilot.press("r")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await _until(pilot, lambda: dash.state.registered_at not in (None, registered), 30)
        # the requests panel lists every local action
        topics = [r.topic for r in dash.state.requests]
        for topic in ("train.deploy", "train.start", "train.abort", "train.restart"):
            assert topic in topics
        await pilot.press("q")

    try:
        _run(app, test)
    finally:
        server.stop(grace=0)


@pytest.mark.slow
def test_validate_key_and_palette_commands(tmp_path: Path) -> None:
    server, site = _site(tmp_path, rounds=1, steps=5)
    app = create_app(site, gpu_sampler=NoSampler())

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        await _until(pilot, lambda: dash.state.registered_at is not None)
        rec = Recorder(app.bridge.bus)  # type: ignore[union-attr]
        # the palette has every action: "Start training" opens the start dialog
        await _palette(pilot, app, "Start training")
        await _until(pilot, lambda: isinstance(app.screen, StartScreen))
        await pilot.press("enter")  # run 1
        await _until(pilot, lambda: dash.state.outcome == "completed", 90)
        await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STOPPED)
        await _until(pilot, lambda: dash.state.worker_pid is None)  # the worker has exited
        # the run's last status is in the recorder too before it starts afresh
        await _until(
            pilot,
            lambda: (
                [e.status for e in rec.of(StatusChanged)][-1:] == [ClientStatus.TRAINING_STOPPED]
            ),
        )
        rec.events.clear()
        # v: cross-site validation on this site's data
        await pilot.press("v")
        await _until(pilot, lambda: "validate: validate process started" in dash.last_action)
        await _until(
            pilot,
            lambda: {e.model_owner for e in rec.of(CrossSiteValidated)} >= {"site-1", "server"},
            90,
        )
        # validating is not training, and the results are on the dashboard
        statuses = [e.status for e in rec.of(StatusChanged) if e.site == "site-1"]
        assert ClientStatus.CROSS_SITE_VALIDATION in statuses
        assert ClientStatus.TRAINING_STARTED not in statuses, statuses
        detail = dash.query_one("#round").query_one("#detail")
        await _until(pilot, lambda: "cross-site accuracy: server" in str(detail.render()), 30)
        await _until(pilot, lambda: dash.state.status == ClientStatus.TRAINING_STOPPED, 30)
        # palette: abort asks for confirmation as the key does
        await _palette(pilot, app, "Abort training")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await pilot.press("q")

    try:
        _run(app, test)
    finally:
        server.stop(grace=0)


def test_help_logs_search_and_theme_keys(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    app = create_app(tmp_path / "site-1", gpu_sampler=NoSampler(), theme="dark")

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        await pilot.press("question_mark")
        help_screen = await _until(pilot, lambda: isinstance(app.screen, HelpScreen) and app.screen)
        text = " ".join(str(w.render()) for w in help_screen.query("Static"))
        for key in ("deploy", "start", "abort", "restart", "validate", "palette"):
            assert key in text
        await pilot.press("escape")
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))
        logs = dash.query_one(LogPanel)
        await pilot.press("l")
        assert logs.level == "WARNING"
        await pilot.press("slash")
        await pilot.press(*"retry", "enter")
        assert logs.search == "retry"
        assert app.theme == "fltui-dark"
        await pilot.press("t")
        assert app.theme != "fltui-dark" and app.theme.startswith("fltui-")
        await pilot.press("q")

    _run(app, test, size=(80, 24))


def test_first_run_screen_explains_the_startup_kit(tmp_path: Path) -> None:
    app = create_app(tmp_path, gpu_sampler=NoSampler())

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        screen = await _until(pilot, lambda: isinstance(app.screen, FirstRunScreen) and app.screen)
        text = " ".join(str(w.render()) for w in screen.query("Static"))
        assert "startup kit" in text and "fed_client.json" in text and str(tmp_path) in text
        await pilot.press("q")

    _run(app, test, size=(100, 30))


# The console as the CLI runs it on a site workspace (the engine in this process, training in
# its worker process), driven by its keys until a run has completed. Prints JSON: what it saw.
CONSOLE = r"""
import asyncio
import json
import sys
import time
from pathlib import Path

from engine.status import ClientStatus
from fltui.app import create_app
from fltui.screens.dashboard import Dashboard
from fltui.screens.start import StartScreen

app = create_app(Path(sys.argv[1]))
seen = {"bridge": type(app.bridge).__name__}


async def until(pilot, check, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.1)
    raise SystemExit(f"not within {timeout} s: {what}")


async def main():
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen, "ui")
        await until(pilot, lambda: dash.state.registered_at is not None, "registered")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, StartScreen), "the start dialog")
        await pilot.press("enter")  # run 1
        await until(pilot, lambda: dash.state.outcome == "completed", "run 1 completed")
        await until(pilot, lambda: dash.state.worker_pid is None, "the worker to exit")
        seen["status"] = int(dash.state.status)
        seen["round"] = dash.state.round
        await pilot.press("q")


asyncio.run(main())
seen["torch"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_the_console_process_never_imports_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    # a child process: what other tests imported into this one does not count
    server, site = _site(tmp_path, rounds=1, steps=5)
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            [sys.executable, "-c", CONSOLE, str(site)],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        server.stop(grace=0)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # the real engine ran in the console and trained a round (in its worker process) ...
    assert seen["bridge"] == "LocalBridge"
    assert seen["status"] == ClientStatus.TRAINING_STOPPED and seen["round"] >= 1, seen
    assert server.history and server.history[0]["contributors"] == ["site-1"]
    # ... and the console process never imported torch
    assert seen["torch"] == [], seen["torch"]


class _ActionsBridge:
    """Mixed into the replay: the actions a palette test takes are noted, not refused."""

    calls: list[str]

    def validate(self, *args: object) -> str:
        self.calls.append("validate")
        return "validate process started"


def _confirms(words: str) -> Callable[..., bool]:
    return lambda app, dash, bridge, ws: (
        isinstance(app.screen, ConfirmScreen) and words in app.screen.question
    )


# What each action of the app does, seen from outside; every action of ``fltui.app.ACTIONS``
# (what the palette offers) must have one.
ACTION_CHECKS: dict[str, Callable[..., bool]] = {
    "deploy": lambda app, dash, bridge, ws: isinstance(app.screen, DeployScreen),
    "start": lambda app, dash, bridge, ws: isinstance(app.screen, StartScreen),
    "abort": _confirms("Abort training"),
    "restart": _confirms("Restart the site engine"),
    "validate": lambda app, dash, bridge, ws: (
        bridge.calls == ["validate"] and dash.last_action == "validate: validate process started"
    ),
    "stop_site": _confirms("Stop the site engine"),
    "log_level": lambda app, dash, bridge, ws: dash.query_one(LogPanel).level == "WARNING",
    "search": lambda app, dash, bridge, ws: dash.query_one("#search").has_class("-shown"),
    "screenshot": lambda app, dash, bridge, ws: (
        dash.last_action.startswith("screenshot saved:") and any((ws / "screenshots").glob("*.svg"))
    ),
    "help": lambda app, dash, bridge, ws: isinstance(app.screen, HelpScreen),
    # the replayed run has no error: said so (a run with one opens it: test_staleness)
    "last_error": lambda app, dash, bridge, ws: dash.last_action == "last error: none in this run",
}
THEMES = list(load_themes())
PALETTE = [(title, action) for title, action, _ in ACTIONS] + [
    (f"Theme: {stem}", f"theme:{stem}") for stem in THEMES
]


def test_the_palette_offers_every_key_of_the_console() -> None:
    from fltui.screens.dashboard import Dashboard as DashboardScreen

    bindings = [*DashboardScreen.BINDINGS, *FLTuiApp.BINDINGS]
    assert all(isinstance(b, Binding) for b in bindings)
    keys = {b.action for b in DashboardScreen.BINDINGS if isinstance(b, Binding)} - {"quit"}
    assert keys == {action for _, action, _ in ACTIONS}  # quit: Textual's own command
    app_keys = {b.action for b in FLTuiApp.BINDINGS if isinstance(b, Binding)}
    assert app_keys == {"next_theme"}  # every theme is offered
    assert set(ACTION_CHECKS) == keys


@pytest.mark.parametrize(("title", "action"), PALETTE, ids=[t for t, _ in PALETTE])
def test_every_action_is_in_the_command_palette(tmp_path: Path, title: str, action: str) -> None:
    from tests.ui import replay

    class Bridge(_ActionsBridge, replay.ReplayBridge):
        pass

    bridge = Bridge(replay.training())
    bridge.calls = []
    stem = action.removeprefix("theme:") if action.startswith("theme:") else None
    # a theme other than the one chosen, so that choosing it shows
    start_theme = next(t for t in THEMES if t != stem) if stem else THEMES[0]
    app = create_app(tmp_path, gpu_sampler=NoSampler(), bridge=bridge, theme=start_theme)
    if stem is not None:

        def check(app: FLTuiApp, dash: Dashboard, bridge: Any, ws: Path) -> bool:
            return app.theme == theme_name(stem) and app.theme_stem == stem
    else:
        assert action in ACTION_CHECKS, f"no check for the palette's {title!r} ({action}): add one"
        check = ACTION_CHECKS[action]

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        assert not check(app, dash, bridge, tmp_path)  # not so before
        await _palette(pilot, app, title, typed=False)  # typed: test_validate_key_and_palette...
        await _until(pilot, lambda: check(app, dash, bridge, tmp_path), 30)
        if action != "validate":
            assert bridge.calls == []

    _run(app, test, size=(100, 30))


def test_start_asks_how_many_gpus_where_there_are_several(tmp_path: Path) -> None:
    from engine.gpu import GpuSampler
    from tests.fake_nvml import fake_two_gpus
    from tests.ui import replay

    feed = GpuSampler(nvml=fake_two_gpus()).sample(replay.SITE)  # a FAKE NVML: two GPUs
    app = create_app(
        tmp_path, gpu_sampler=NoSampler(), bridge=replay.ReplayBridge(replay.not_started(feed))
    )

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))
        await pilot.press("s")
        start = await _until(pilot, lambda: isinstance(app.screen, StartScreen) and app.screen)
        assert start.query_one("#gpus").value == "1"
        await pilot.press(*"3", "tab", "backspace", *"5", "enter")
        assert "between 1 and 2" in str(start.query_one("#error").render())
        await pilot.press("escape")

    _run(app, test, size=(100, 30))


def test_text_from_the_wire_is_never_markup_and_logs_keep_flowing(tmp_path: Path) -> None:
    from engine.events import LogRecord
    from engine.site.state import MAX_LOGS
    from tests.ui import replay

    flood = [
        LogRecord(site=replay.SITE, ts=replay.T0 + i, level="INFO", logger="x", message=f"line {i}")
        for i in range(MAX_LOGS + 50)
    ]
    hostile = StatusChanged(
        site=replay.SITE, status=4, message="training exception", detail="bad [/bold] [link=x]"
    )
    bridge = replay.ReplayBridge([*replay.not_started(), *flood, hostile])
    app = create_app(tmp_path, gpu_sampler=NoSampler(), bridge=bridge)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        error = dash.query_one("#error")
        await _until(pilot, lambda: "bad [/bold] [link=x]" in str(error.render()), 30)
        log = dash.query_one("#log")
        # past the buffer's bound, new lines still arrive
        bridge.events = [
            LogRecord(site=replay.SITE, ts=replay.T0, level="INFO", logger="x", message="newest")
        ]
        await _until(pilot, lambda: any("newest" in line for line in log.lines), 5)

    _run(app, test, size=(100, 30))


def test_a_refused_request_shows_its_reason_and_enter_opens_it_whole(tmp_path: Path) -> None:
    from engine.events import AdminRequestHandled
    from fltui.screens.request import RequestScreen
    from fltui.widgets.requests_panel import RequestsPanel
    from tests.ui import replay

    why = 'refused by site policy (startup/site_policy.json): "deploy" is not in allowed_commands'
    requests = [
        AdminRequestHandled(
            site=replay.SITE, ts=replay.T0 + 1, origin="admin@x", topic="sys.check", outcome="ok"
        ),
        AdminRequestHandled(
            site=replay.SITE,
            ts=replay.T0 + 2,
            origin="admin@x [b]",  # from the wire: never markup
            topic="train.deploy",
            outcome="refused",
            detail=why,
        ),
    ]
    bridge = replay.ReplayBridge([*replay.not_started(), *requests])
    app = create_app(tmp_path, gpu_sampler=NoSampler(), bridge=bridge)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        panel = dash.query_one(RequestsPanel)
        await _until(pilot, lambda: panel.row_count == 2, 5)
        # the newest is highlighted; its reason is on the panel's border
        await _until(pilot, lambda: "allowed_commands" in str(panel.border_subtitle or ""), 5)
        panel.focus()
        await pilot.press("enter")
        screen = await _until(pilot, lambda: isinstance(app.screen, RequestScreen) and app.screen)
        shown = " ".join(str(s.render()) for s in screen.query("Static"))
        assert why in shown and "admin@x [b]" in shown and "outcome: refused" in shown
        await pilot.press("escape")
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))
        # the first request: ok, no detail, no subtitle
        await pilot.press("up")
        await _until(pilot, lambda: panel.border_subtitle is None, 5)
        # from the last row the cursor follows new requests; a detail of several lines shows
        # its first on the border
        await pilot.press("down")

        def info(n: int) -> AdminRequestHandled:
            return AdminRequestHandled(
                site=replay.SITE,
                ts=replay.T0 + 2 + n,
                origin="local",
                topic="sys.info",
                outcome="ok",
                detail=f"line one {n}\nline two",
            )

        bridge.events = [info(1)]
        await _until(pilot, lambda: panel.row_count == 3 and panel.cursor_row == 2, 5)
        await _until(pilot, lambda: str(panel.border_subtitle or "") == "line one 1", 5)
        # a row the operator chose (the refusal being read) stays chosen when another arrives
        await pilot.press("up")
        await _until(pilot, lambda: "allowed_commands" in str(panel.border_subtitle or ""), 5)
        bridge.events = [info(2)]
        await _until(pilot, lambda: panel.row_count == 4, 30)
        await pilot.pause()  # what the new row set off has run
        assert panel.cursor_row == 1 and "allowed_commands" in str(panel.border_subtitle)

    _run(app, test, size=(80, 24))


def test_cross_site_results_are_shown_on_this_sites_data_while_and_after_validating(
    tmp_path: Path,
) -> None:
    from engine.events import PhaseChanged, RunChanged
    from engine.status import ClientStatus as CS
    from fltui.widgets.round_panel import RoundPanel
    from tests.ui import replay

    site = replay.SITE

    def validated(owner: str, acc: float) -> CrossSiteValidated:
        return CrossSiteValidated(
            site=site, model_owner=owner, metrics={"accuracy": acc, "loss": 0.5}
        )

    bridge = replay.ReplayBridge(
        [
            *replay.training(),
            StatusChanged(site=site, status=CS.TRAINING_STOPPED, message="training stopped"),
            RunChanged(site=site, running=False, run_number=1, mmar="", executor="process"),
            StatusChanged(site=site, status=CS.CROSS_SITE_VALIDATION, message="cross site"),
            PhaseChanged(site=site, phase="cross-site validation", round=0),
            validated("site-2", 0.691),
            validated("server", 0.795),
        ]
    )
    app = create_app(tmp_path, gpu_sampler=NoSampler(), bridge=bridge)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
        panel = dash.query_one(RoundPanel)

        def detail() -> str:
            return str(panel.query_one("#detail").render())

        await _until(pilot, lambda: "cross-site accuracy:" in detail(), 5)
        assert detail() == "cross-site accuracy: server 0.795 · site-2 0.691"
        assert "cross-site validation" in str(panel.query_one("#round").render())
        bridge.events = [
            validated("site-1", 0.809),
            StatusChanged(site=site, status=CS.TRAINING_STOPPED, message="training stopped"),
        ]
        await _until(pilot, lambda: "site-1 0.809" in detail(), 5)
        assert detail() == "cross-site accuracy: server 0.795 · site-1 0.809 · site-2 0.691"
        # the next validation starts afresh
        bridge.events = [PhaseChanged(site=site, phase="cross-site validation", round=0)]
        await _until(pilot, lambda: detail() == "", 5)

    _run(app, test, size=(120, 40))
