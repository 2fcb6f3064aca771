"""RequestScreen: one admin request or local action in full (Enter on a row of Requests)."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from engine.events import AdminRequestHandled

__all__ = ["RequestScreen"]


class RequestScreen(ModalScreen[None]):
    """What was asked, by whom, and what came of it: the reason of a refusal in full."""

    DEFAULT_CSS = """
    RequestScreen { align: center middle; }
    RequestScreen > Vertical {
        width: 84; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 1 2;
    }
    RequestScreen #outcome.failed { color: $error; text-style: bold; }
    RequestScreen #detail { margin-top: 1; }
    RequestScreen #hint { margin-top: 1; color: $text-muted; }
    """
    BINDINGS = [Binding("escape,enter,q", "close", "close")]

    def __init__(self, request: AdminRequestHandled) -> None:
        super().__init__()
        self.request = request

    def compose(self) -> ComposeResult:
        req = self.request
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(req.ts))
        with Vertical():
            # Content, not markup: origin, topic and detail come from the wire.
            yield Static(Content(f"{req.topic} from {req.origin} at {when}"), classes="title")
            outcome = Static(Content(f"outcome: {req.outcome}"), id="outcome")
            if req.outcome != "ok":
                outcome.add_class("failed")
            yield outcome
            yield Static(Content(req.detail or "(no detail)"), id="detail")
            yield Static(
                "The same line is in logs/audit.jsonl of the workspace.  esc: close", id="hint"
            )

    def action_close(self) -> None:
        self.dismiss(None)
