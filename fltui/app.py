"""FLTuiApp: the operator's console (one factory builds it for the CLI, the tests and runbooks)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.command import Hit, Hits, Provider

from engine.gpu import GpuSampler
from engine.site.lock import find_service
from fltui.bridge import LocalBridge, RemoteBridge, SiteBridge
from fltui.screens.dashboard import Dashboard
from fltui.screens.first_run import FirstRunScreen
from fltui.themes import DEFAULT_THEME, load_themes, theme_name

__all__ = ["FLTuiApp", "create_app"]

ACTIONS = [
    ("Deploy an MMAR", "deploy", "pick an MMAR from transfer/ and a run number (d)"),
    ("Start training", "start", "train a deployed run (s)"),
    ("Abort training", "abort", "stop training, after confirming (a)"),
    ("Restart the site engine", "restart", "new session with the server, after confirming (r)"),
    ("Validate across sites", "validate", "cross-site validation on this site's data (v)"),
    ("Stop the site", "stop_site", "stop the site service or engine, after confirming (x)"),
    ("Cycle the log level", "log_level", "DEBUG → INFO → WARNING → ERROR (l)"),
    ("Search the logs", "search", "filter log lines by text (/)"),
    ("Show the last error, whole", "last_error", "the Client panel's last error and traceback (e)"),
    ("Save a screenshot", "screenshot", "this screen as SVG and PNG, for a support ticket (p)"),
    ("Help", "help", "the keys (?)"),
]


class ActionCommands(Provider):
    """Every console action and every theme, in the command palette."""

    def _commands(self) -> Iterator[tuple[str, object, str]]:
        app = self.app
        assert isinstance(app, FLTuiApp)
        for title, action, help_text in ACTIONS:
            yield title, partial(app.run_dashboard_action, action), help_text
        for stem in app.fltui_themes:
            yield f"Theme: {stem}", partial(app.set_fltui_theme, stem), "switch colours"

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)  # type: ignore[arg-type]

    async def discover(self) -> Hits:
        for title, callback, help_text in self._commands():
            yield Hit(1.0, title, callback, help=help_text)  # type: ignore[arg-type]


class FLTuiApp(App[None]):
    """The console: a dashboard over a SiteBridge (or the first-run screen)."""

    TITLE = "fltui"
    COMMANDS = App.COMMANDS | {ActionCommands}
    BINDINGS = [Binding("t", "next_theme", "theme", show=False)]
    CSS_PATH = "app.tcss"

    def __init__(
        self,
        bridge: SiteBridge | None,
        theme: str = DEFAULT_THEME,
        workspace: Path | None = None,
        demo_factory: object = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        # Textual's own ctrl+q, shown: where q cannot quit (the log search box takes the q) the
        # footer says "^q quit"; elsewhere the dashboard's "q quit" stands for both.
        self._bindings.key_to_bindings["ctrl+q"] = [
            Binding("ctrl+q", "quit", "quit", show=True, priority=True)
        ]
        self.clock = clock  # runbooks and snapshots fix it, so screens repeat
        self.bridge = bridge
        self.workspace = workspace or Path.cwd()
        self.demo_factory = demo_factory
        self.fltui_themes = load_themes()
        for t in self.fltui_themes.values():
            self.register_theme(t)
        if theme not in self.fltui_themes:
            raise ValueError(f"unknown theme {theme!r} (themes: {', '.join(self.fltui_themes)})")
        self.theme = theme_name(theme)
        self.theme_stem = theme

    def on_mount(self) -> None:
        if self.bridge is None:
            self.push_screen(FirstRunScreen(self.workspace), self._first_run_done)
        else:
            self._open(self.bridge)

    def _open(self, bridge: SiteBridge) -> None:
        self.bridge = bridge
        self.push_screen(Dashboard(bridge))
        # The first frame first: starting an engine (or a demo service) competes for the CPU.
        self.call_after_refresh(bridge.start)

    def _first_run_done(self, choice: str | None) -> None:
        if choice == "demo" and callable(self.demo_factory):
            self._open(self.demo_factory())
        else:
            self.exit()

    def run_dashboard_action(self, action: str) -> None:
        screen = self.screen
        if isinstance(screen, Dashboard):
            getattr(screen, f"action_{action}")()

    def set_fltui_theme(self, stem: str) -> None:
        self.theme = theme_name(stem)
        self.theme_stem = stem

    def action_next_theme(self) -> None:
        stems = list(self.fltui_themes)
        self.set_fltui_theme(stems[(stems.index(self.theme_stem) + 1) % len(stems)])
        self.notify(f"theme: {self.theme_stem}", timeout=2)

    def on_unmount(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()


def create_app(
    workspace: Path | None = None,
    demo: bool = False,
    theme: str = DEFAULT_THEME,
    demo_sites: int = 3,
    demo_rounds: int = 5,
    demo_secure: bool = False,
    demo_task: str = "classification",
    demo_mmar: Path | None = None,
    gpu_sampler: object = None,
    bridge: SiteBridge | None = None,
    clock: Callable[[], float] = time.time,
) -> FLTuiApp:
    """The one factory: the CLI, the tests and the runbooks all build the app here.

    Args:
        workspace: the site workspace (or the demo's root); default the current folder.
        demo: run the demo federation (in ``workspace``), as a service in a child process.
        demo_secure: the demo with provisioned certificates and mutual TLS.
        demo_task: the demo's task ("classification", "segmentation"); demo_mmar: an MMAR to
            federate instead of the task's.
        theme: a theme file's stem ("dark", "light", "high_contrast").
        gpu_sampler: the GPU sampler to run (default: NVML's, which says why when there is none).
        bridge: use this bridge instead of building one (tests).
    """
    root = Path(workspace) if workspace is not None else Path.cwd()
    if gpu_sampler is None:
        gpu_sampler = GpuSampler()

    def demo_bridge(path: Path = root) -> SiteBridge:
        # The demo runs as a service in a child process: this console only draws it.
        return RemoteBridge.demo(
            path,
            sites=demo_sites,
            rounds=demo_rounds,
            secure=demo_secure,
            task=demo_task,
            mmar=demo_mmar,
        )

    if bridge is None:
        if demo:
            bridge = demo_bridge()
        elif (root / "startup" / "fed_client.json").is_file():
            info = find_service(root)
            if info is not None:
                bridge = RemoteBridge(root, info.site)
            else:
                bridge = LocalBridge(root, gpu_sampler=gpu_sampler)

    def fresh_demo() -> SiteBridge:
        return demo_bridge(Path(tempfile.mkdtemp(prefix="fltui-demo-")))

    return FLTuiApp(bridge, theme=theme, workspace=root, demo_factory=fresh_demo, clock=clock)
