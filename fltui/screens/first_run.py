"""FirstRunScreen: no workspace here yet — what a startup kit is, where it goes, or the demo."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Static

__all__ = ["FirstRunScreen"]


class FirstRunScreen(Screen[str]):
    """Dismisses with "demo" or "quit"."""

    DEFAULT_CSS = """
    FirstRunScreen { align: center middle; }
    FirstRunScreen > Vertical {
        width: 90; height: auto; border: thick $primary; padding: 1 2; background: $surface;
    }
    FirstRunScreen Button { margin-top: 1; }
    """
    BINDINGS = [
        Binding("d", "choose('demo')", "run the demo"),
        Binding("q", "choose('quit')", "quit"),
    ]

    def __init__(self, workspace: Path) -> None:
        super().__init__()
        self.workspace = workspace

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                f"No site workspace in {self.workspace}.\n\n"
                "A site joins a federation with its startup kit: the folder the federation's\n"
                "provisioning gives each site, holding startup/fed_client.json (the server's\n"
                "address and this site's name), its certificate and key, and rootCA.pem.\n\n"
                f"Put the kit's startup/ folder into {self.workspace} (or run fltui with\n"
                "--workspace DIR, or set FLTUI_WORKSPACE), then start fltui again.\n\n"
                "Or try everything on this machine first: the demo runs a federation of three\n"
                "sites with a reference server, all on loopback, on synthetic data."
            )
            yield Button("Run the demo (d)", variant="primary", id="demo")
            yield Button("Quit (q)", id="quit")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))

    def action_choose(self, what: str) -> None:
        self.dismiss(what)
