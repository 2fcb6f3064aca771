"""Requests and Logs at 80x24 (issue 18): the outcome visible, refusals coloured, the newest
followed; logs that wrap, keep following, and a search box that Esc leaves; the footer's keys;
the deploy dialog's one Enter and its refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from textual.color import Color
from textual.pilot import Pilot
from textual.widgets import Footer, Input, Log
from textual.widgets._footer import FooterKey

from engine.events import AdminRequestHandled, LogRecord
from fltui.app import FLTuiApp, create_app
from fltui.bridge import BridgeError
from fltui.screens.dashboard import Dashboard
from fltui.screens.deploy import DeployScreen
from fltui.widgets._text import summary_line, wrap_line
from fltui.widgets.log_panel import LogPanel
from fltui.widgets.requests_panel import RequestsPanel
from tests.ui import replay

WHY = 'refused by site policy (startup/site_policy.json): "deploy" is not in allowed_commands'


def _req(n: int, outcome: str = "ok", detail: str = "", topic: str = "sys.check") -> Any:
    return AdminRequestHandled(
        site=replay.SITE,
        ts=replay.T0 + 10 + n,
        origin="admin@hospital.example.org",
        topic=topic,
        outcome=outcome,
        detail=detail or f"reply {n}",
    )


def _log(n: int, message: str | None = None) -> LogRecord:
    return LogRecord(
        site=replay.SITE, ts=replay.T0 + n, level="INFO", logger="x", message=message or f"line {n}"
    )


def _app(tmp_path: Path, events: list[Any]) -> tuple[FLTuiApp, replay.ReplayBridge]:
    bridge = replay.ReplayBridge([*replay.not_started(), *events])
    app = create_app(tmp_path, gpu_sampler=replay.NoSampler(), bridge=bridge, clock=replay.clock)
    return app, bridge


def _run(
    app: FLTuiApp,
    test: Callable[[FLTuiApp, Pilot[None]], Awaitable[None]],
    size: tuple[int, int] = (80, 24),
) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await test(app, pilot)

    asyncio.run(main())


async def _until(pilot: Pilot[None], check: Callable[[], Any], timeout: float = 10) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"not reached within {timeout} s: {check}")


async def _dash(app: FLTuiApp, pilot: Pilot[None]) -> Dashboard:
    dash = await _until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen)
    assert isinstance(dash, Dashboard)
    return dash


def _screen_text(app: FLTuiApp) -> list[str]:
    """What the terminal shows, row by row."""
    return ["".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips()]


def _cells(panel: RequestsPanel) -> list[str]:
    return [str(panel.get_row_at(i)[0]) for i in range(panel.row_count)]


# ---------------------------------------------------------------------------------- helpers


def test_summary_line_keeps_what_happened() -> None:
    trace = "Traceback (most recent call last):\n  File x, line 1\nValueError: bad servers[0]"
    assert summary_line(trace) == "ValueError: bad servers[0]"
    assert summary_line("\nfirst\nsecond") == "first"
    assert summary_line("x" * 50, 10) == "x" * 9 + "…"
    assert summary_line("") == ""


def test_wrap_line_cuts_nothing() -> None:
    line = "11:07:17 site-1 !WARN " + "GetModel failed (UNAVAILABLE); retrying " * 3
    rows = wrap_line(line, 30, indent=9)
    assert all(len(r) <= 30 for r in rows)
    assert "".join(r[9:] if i else r for i, r in enumerate(rows)) == line


# ---------------------------------------------------------------------------------- requests


def test_requests_at_80x24_show_status_topic_and_outcome_and_follow_the_newest(
    tmp_path: Path,
) -> None:
    events = [_req(n) for n in range(8)] + [_req(9, "refused", WHY, topic="train.deploy")]
    app, bridge = _app(tmp_path, events)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        panel = dash.query_one(RequestsPanel)
        await _until(pilot, lambda: panel.row_count == 9)
        await pilot.pause(0.2)
        # the newest is the highlighted row, scrolled into view
        assert panel.cursor_row == 8
        screen = "\n".join(_screen_text(app))
        assert "refused train.deploy" in screen
        assert "refused by site policy" in screen  # the outcome, not only time and origin
        # the status is coloured with the theme's error colour, an ok one is not
        cell = panel.get_row_at(8)[0]
        bad = [s.style for s in cell.spans if "refused" in str(cell)[s.start : s.end]]
        assert bad and bad[0].color is not None
        error = Color.parse(app.current_theme.error or "")
        got = Color.parse(bad[0].color.triplet.hex)  # type: ignore[union-attr]
        assert max(abs(a - b) for a, b in zip(got.rgb, error.rgb, strict=True)) <= 2
        # a new request is followed
        bridge.events = [_req(10, "error", "deploy failed: no such folder", topic="train.deploy")]
        await _until(pilot, lambda: panel.row_count == 10 and panel.cursor_row == 9)
        await pilot.pause(0.2)
        assert "deploy failed: no such" in "\n".join(_screen_text(app))

    _run(app, test)


def test_wide_requests_elide_the_origin_not_the_outcome(tmp_path: Path) -> None:
    events = [_req(1, "refused", WHY, topic="train.deploy")]
    app, _ = _app(tmp_path, events)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        panel = dash.query_one(RequestsPanel)
        await _until(pilot, lambda: panel.row_count == 1)
        for width in (120, 140, 200):
            await pilot.resize_terminal(width, 40)
            await pilot.pause(0.2)
            row = _cells(panel)[0]
            assert "\n" not in row and row.startswith("11:06:51 refused train.deploy ")
            outcome_shown = row.split("train.deploy ", 1)[1].strip()
            assert len(outcome_shown) >= 24 and WHY.startswith(outcome_shown[:20])
            origin = "admin@hospital.example.org"
            # the origin is elided (or left out) first: the outcome keeps its room
            assert origin not in row or WHY in row
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert "\n" in _cells(panel)[0]  # two lines: the outcome has the second

    _run(app, test, size=(120, 40))


# ---------------------------------------------------------------------------------- logs


def test_long_log_lines_wrap_at_80_columns(tmp_path: Path) -> None:
    long = "GetModel to fl.example.org:8002 failed (UNAVAILABLE); retrying in 4 s, the END"
    app, _ = _app(tmp_path, [_log(5, long)])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        log = dash.query_one("#log", Log)
        await _until(pilot, lambda: any("the END" in line for line in log.lines))
        assert max(len(line) for line in log.lines) <= log.size.width
        assert "the END" in "\n".join(_screen_text(app))

    _run(app, test)


def test_logs_follow_unless_scrolled_up_then_mark_new_lines_below(tmp_path: Path) -> None:
    app, bridge = _app(tmp_path, [_log(n) for n in range(40)])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        logs = dash.query_one(LogPanel)
        log = dash.query_one("#log", Log)
        await _until(pilot, lambda: any("line 39" in x for x in log.lines))
        await _until(pilot, lambda: log.scroll_y == log.max_scroll_y > 0)
        log.scroll_to(y=0, animate=False)
        await pilot.pause(0.1)
        assert not logs.following
        bridge.events = [_log(100 + n) for n in range(3)]
        dash.pump(force=True)
        await pilot.pause(0.1)
        assert log.scroll_y == 0  # left where the operator is reading
        assert "3 new lines below" in str(logs.border_subtitle)
        log.scroll_end(animate=False)
        await _until(pilot, lambda: logs.following and logs.border_subtitle is None)

    _run(app, test)


def test_logs_follow_again_after_a_search_is_cleared_and_after_a_resize(tmp_path: Path) -> None:
    app, bridge = _app(tmp_path, [_log(n) for n in range(60)])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        logs = dash.query_one(LogPanel)
        log = dash.query_one("#log", Log)
        search = dash.query_one("#search", Input)
        at_end = lambda: log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y  # noqa: E731

        def last(n: int) -> str:  # the last n rows, a wrapped line joined again
            return " ".join(row.strip() for row in log.lines[-n:])

        await _until(pilot, at_end)
        # a search, then Esc: the search is cleared, the box closed, the focus given back
        before = app.focused
        await pilot.press("slash")
        assert app.focused is search
        await pilot.press(*"line 1", "enter")
        assert logs.search == "line 1" and app.focused is before
        await pilot.press("slash")
        await pilot.press("escape")
        await _until(pilot, lambda: logs.search == "" and not search.has_class("-shown"))
        assert app.focused is before
        bridge.events = [_log(200, "after the search")]
        dash.pump(force=True)
        await _until(pilot, lambda: "after the search" in last(2) and at_end())
        # a resize wraps again and keeps following
        for size in ((120, 40), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.2)
            bridge.events = [_log(300 + size[0], f"after resizing to {size[0]}")]
            dash.pump(force=True)
            await _until(pilot, lambda s=size: f"resizing to {s[0]}" in last(2) and at_end())
            assert logs.following

    _run(app, test)


def test_q_in_the_search_box_types_and_the_footer_still_says_how_out(tmp_path: Path) -> None:
    app, _ = _app(tmp_path, [_log(1, "a quiet line")])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        await pilot.press("slash", "q")
        await pilot.pause(0.2)
        assert dash.query_one("#search", Input).value == "q"
        assert app.is_running
        footer = _screen_text(app)[-1]
        assert "esc" in footer and "clear search" in footer and "quit" in footer
        await pilot.press("escape")
        await pilot.pause(0.2)
        footer = _screen_text(app)[-1]
        assert "q quit" in footer and "? help" in footer

    _run(app, test)


# ---------------------------------------------------------------------------------- footer


def test_the_footer_keeps_quit_and_help_at_80_columns(tmp_path: Path) -> None:
    app, _ = _app(tmp_path, [])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        for width in (80, 120):
            await pilot.resize_terminal(width, 24)
            await pilot.pause(0.2)
            keys = {k.description: k for k in dash.query_one(Footer).query(FooterKey)}
            for what in ("quit", "help", "deploy", "stop site"):
                region = keys[what].region
                assert region.width and region.right <= width, (what, region)
            footer = _screen_text(app)[-1]
            assert "q quit" in footer and "? help" in footer

    _run(app, test)


# ---------------------------------------------------------------------------------- deploy


class _Deploys(replay.ReplayBridge):
    """A recorded stream whose deploy answers as a site does (a refusal for a wrong path)."""

    def __init__(self) -> None:
        super().__init__(replay.not_started())
        self.calls: list[tuple[str, int]] = []

    def transfer_mmars(self) -> list[str]:
        return ["demo_mmar"]

    def latest_run(self) -> int | None:
        return 1

    def deploy(self, mmar: str, run_number: int) -> str:  # type: ignore[override]
        self.calls.append((mmar, run_number))
        if mmar != "demo_mmar":
            raise BridgeError(f"{mmar} is not an MMAR (no config/ folder)")
        return f"deployed {mmar} as run {run_number}"


def test_the_deploy_dialog_takes_one_enter_and_keeps_a_refusal_on_screen(tmp_path: Path) -> None:
    bridge = _Deploys()
    app = create_app(tmp_path, gpu_sampler=replay.NoSampler(), bridge=bridge, clock=replay.clock)

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        await pilot.press("d")
        dialog = await _until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen)
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))
        assert bridge.calls == [("demo_mmar", 2)]
        assert "deploy: deployed demo_mmar as run 2" in dash.last_action
        # a wrong path: the dialog stays, the reason is on it (and in the notices)
        await pilot.press("d")
        dialog = await _until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen)
        path = dialog.query_one("#path", Input)
        path.value = "/nowhere/mmar"
        path.focus()
        await pilot.press("enter")
        await _until(pilot, lambda: "no config/ folder" in dialog.error)
        assert app.screen is dialog
        assert "not deployed" in str(dialog.query_one("#error").render())
        assert "no config/ folder" in dash.last_action
        await pilot.press("escape")
        await _until(pilot, lambda: isinstance(app.screen, Dashboard))

    _run(app, test)


def test_a_restarted_service_s_state_replaces_the_old_rows(tmp_path: Path) -> None:
    """A console that re-attaches to a new service gets a state whose totals are smaller than
    what it showed: Requests and Logs start again from it, not keep the old service's rows."""
    from engine.site.state import SiteState

    app, _ = _app(tmp_path, [_req(n) for n in range(5)] + [_log(n) for n in range(6)])

    async def test(app: FLTuiApp, pilot: Pilot[None]) -> None:
        dash = await _dash(app, pilot)
        panel, logs = dash.query_one(RequestsPanel), dash.query_one(LogPanel)
        await _until(pilot, lambda: panel.row_count == 5)
        fresh = SiteState()
        fresh.apply(_req(50, detail="the new service's first"))
        fresh.apply(_log(50, "the new service's line"))
        panel.refresh_from(fresh)
        logs.refresh_from(fresh)
        await pilot.pause(0.2)
        assert panel.row_count == 1 and "the new service's first" in str(panel.get_row_at(0))
        shown = "\n".join(_screen_text(app))
        assert "the new service's line" in shown and "line 3" not in shown

    _run(app, test, size=(120, 40))
