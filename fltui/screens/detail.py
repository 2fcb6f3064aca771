"""DetailScreen: the whole of an outcome a panel shows in one line (Enter on the panel)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

__all__ = ["DetailScreen"]


class DetailScreen(ModalScreen[None]):
    """A title and a text in full (wrapped, scrolled when longer than the screen)."""

    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > VerticalScroll {
        width: 100; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    DetailScreen .title { text-style: bold; }
    DetailScreen #hint { margin-top: 1; color: $text-muted; }
    """
    BINDINGS = [Binding("escape,enter,q", "close", "close")]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self.title_text = title
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            # Content, not markup: an error or an outcome comes from a worker or the wire.
            yield Static(Content(self.title_text), classes="title")
            yield Static(Content(self.text or "(nothing)"), id="text")
            yield Static("esc: close", id="hint")

    def action_close(self) -> None:
        self.dismiss(None)
