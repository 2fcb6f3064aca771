"""Dashboard: the site at a glance, refreshed from engine events, one key per action."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer

from engine.site.state import SiteState
from fltui.bridge import BridgeError, SiteBridge
from fltui.pictures import default_stem, write_screenshot
from fltui.screens.confirm import ConfirmScreen
from fltui.screens.deploy import DeployScreen
from fltui.screens.help import HelpScreen
from fltui.screens.start import StartScreen
from fltui.widgets.client_panel import ClientPanel
from fltui.widgets.gpu_panel import GpuPanel
from fltui.widgets.log_panel import LogPanel
from fltui.widgets.requests_panel import RequestsPanel
from fltui.widgets.round_panel import RoundPanel
from fltui.widgets.site_header import SiteHeader

__all__ = ["Dashboard"]

NARROW = 100  # below this many columns the footer is compact and leaves out the palette key
REFRESH_S = 1.0  # events are drained and shown once a second
LOG_EVERY = 2  # the log panel catches up every other tick (each catch-up re-lays out the screen)


class Dashboard(Screen[None]):
    """The main screen."""

    BINDINGS = [
        Binding("d", "deploy", "deploy"),
        Binding("s", "start", "start"),
        Binding("a", "abort", "abort"),
        Binding("r", "restart", "restart"),
        Binding("v", "validate", "validate"),
        Binding("x", "stop_site", "stop site"),
        Binding("l", "log_level", "log level", show=False),
        Binding("slash", "search", "search logs", show=False),
        Binding("p", "screenshot", "screenshot", show=False),
        Binding("e", "last_error", "last error, whole", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, bridge: SiteBridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.state = SiteState(site=bridge.site)
        self.last_action = ""

    def compose(self) -> ComposeResult:
        yield SiteHeader(id="header")
        with Horizontal(id="top"):
            with Vertical(id="left"):
                yield ClientPanel(id="client")
                yield RoundPanel(id="round")
            yield GpuPanel(id="gpu")
        with Horizontal(id="bottom"):
            yield RequestsPanel(id="requests")
            yield LogPanel(id="logs")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(REFRESH_S, self.pump)
        self.pump(force=True)
        self._fit_footer()

    def on_resize(self) -> None:
        self._fit_footer()

    def _fit_footer(self) -> None:
        """Every key of the footer, `? help` and `q quit` last, fits 80 columns: a narrow
        terminal gets the compact footer without the palette's key (ctrl+p still opens it, and
        the help screen lists it)."""
        footer = self.query_one(Footer)
        narrow = self.size.width < NARROW
        if footer.compact != narrow:
            footer.compact = narrow
            footer.show_command_palette = not narrow
            footer.refresh(recompose=True)

    # ------------------------------------------------------------------ events → widgets

    def pump(self, force: bool = False) -> None:
        """Folds the events that arrived into the state; redraws only the parts that changed."""
        changed: set[str] = set()
        for event in self.bridge.drain():
            changed |= self.state.apply(event)
        if force:
            changed |= {"header", "client", "round", "requests", "logs"}
        # The header shows ages ("3 s ago"): redraw it on every tick, it is one line.
        now = self.app.clock() if hasattr(self.app, "clock") else None
        self.query_one(SiteHeader).refresh_from(self.state, self.bridge.label, now)
        if "client" in changed:
            self.query_one(ClientPanel).refresh_from(self.state)
        if "round" in changed:
            self.query_one(RoundPanel).refresh_from(self.state, now)
        if "gpu" in changed and self.state.gpu is not None:
            self.query_one(GpuPanel).update_sample(self.state.gpu)
        if "requests" in changed:
            self.query_one(RequestsPanel).refresh_from(self.state)
        self._ticks = getattr(self, "_ticks", 0) + 1
        self._logs_pending = getattr(self, "_logs_pending", False) or "logs" in changed
        if self._logs_pending and (force or self._ticks % LOG_EVERY == 0):
            self.query_one(LogPanel).refresh_from(self.state)
            self._logs_pending = False

    # ------------------------------------------------------------------ actions

    def _report(self, text: str, error: bool = False) -> None:
        self.last_action = text
        self.notify(text, severity="error" if error else "information", timeout=6, markup=False)

    @work(thread=True, exclusive=True, group="action")
    def run_engine_action(self, label: str, fn: Any, *args: Any) -> None:
        """Runs an engine action off the UI thread and reports its outcome."""
        try:
            text = fn(*args)
        except BridgeError as exc:
            self.app.call_from_thread(self._report, f"{label}: {exc}", True)
        except Exception as exc:  # the console stays up; the operator sees what broke
            self.app.call_from_thread(
                self._report, f"{label} failed: {type(exc).__name__}: {exc}", True
            )
        else:
            self.app.call_from_thread(self._report, f"{label}: {text}")

    def action_deploy(self) -> None:
        # The dialog deploys itself: a refusal stays on it, to be corrected there.
        def deployed(reply: str | None) -> None:
            if reply is not None:
                self._report(f"deploy: {reply}")

        def refused(why: str) -> None:
            self._report(f"deploy: {why}", error=True)

        next_run = (self.bridge.latest_run() or 0) + 1
        dialog = DeployScreen(self.bridge.transfer_mmars(), next_run, self.bridge.deploy, refused)
        self.app.push_screen(dialog, deployed)

    def action_start(self) -> None:
        def chosen(result: tuple[int, int] | None) -> None:
            if result is not None:
                self.run_engine_action("start", self.bridge.start_training, *result)

        gpus = len(self.state.gpu.gpus) if self.state.gpu is not None else 0
        self.app.push_screen(StartScreen(self.bridge.latest_run(), gpus), chosen)

    def action_abort(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_engine_action("abort", self.bridge.abort)

        self.app.push_screen(
            ConfirmScreen(f"Abort training on {self.state.site or 'this site'}?"), confirmed
        )

    def action_restart(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_engine_action("restart", self.bridge.restart)

        self.app.push_screen(
            ConfirmScreen(
                f"Restart the site engine of {self.state.site or 'this site'}? Training stops and "
                "the site registers again."
            ),
            confirmed,
        )

    def action_stop_site(self) -> None:
        attached = self.bridge.mode == "attached"
        question = (
            f"Stop the site service of {self.state.site or 'this site'}? Training stops and the "
            "site leaves the federation until the service is started again. (To leave it running, "
            "just quit the console with q.)"
            if attached
            else f"Stop the site engine of {self.state.site or 'this site'}? Training stops and "
            "the site leaves the federation."
        )

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_engine_action("stop site", self.bridge.shutdown)

        self.app.push_screen(ConfirmScreen(question), confirmed)

    def action_validate(self) -> None:
        self.run_engine_action("validate", self.bridge.validate)

    def action_log_level(self) -> None:
        level = self.query_one(LogPanel).cycle_level(self.state)
        self.notify(f"logs at {level} and above", timeout=2)

    def action_search(self) -> None:
        self.query_one(LogPanel).open_search()

    def on_input_submitted(self, event: Any) -> None:
        if event.input.id == "search":
            logs = self.query_one(LogPanel)
            logs.apply_search(event.value, self.state)
            logs.close_search(hide=not logs.search)

    def action_last_error(self) -> None:
        """The Client panel's last error, whole (a traceback is one summary line there)."""
        if not self.query_one(ClientPanel).show_error():
            self.last_action = "last error: none in this run"
            self.notify("no error in this run", timeout=3)

    def action_screenshot(self) -> None:
        """Saves what is on screen now (SVG and PNG) under the workspace's screenshots/."""
        app = self.app
        workspace = getattr(app, "workspace", None)
        folder = (workspace if workspace is not None else Path.cwd()) / "screenshots"
        clock = getattr(app, "clock", None)
        stem = default_stem(folder, self.state.site, clock() if clock is not None else None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # The SVG now, on this thread: the picture is of this moment, before any notice.
            svg = app.save_screenshot(filename=stem.name + ".svg", path=str(folder))
        except OSError as exc:
            self._report(f"screenshot not saved: {exc}", error=True)
            return
        self._write_png(Path(svg))

    @work(thread=True, group="screenshot")
    def _write_png(self, svg: Path) -> None:
        try:
            _, png, problem = write_screenshot(svg.read_text(encoding="utf-8"), svg.with_suffix(""))
        except OSError as exc:
            png, problem = None, f"no PNG: {exc}"
        saved = f"screenshot saved: {svg}" + (f" and {png.name}" if png is not None else "")
        self.app.call_from_thread(
            self._report, saved + (f" ({problem})" if problem else ""), bool(problem)
        )

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.app.exit()
