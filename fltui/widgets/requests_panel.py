"""RequestsPanel: every admin request and local action: time, origin, topic, outcome."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import DataTable

from engine.state import SiteState

__all__ = ["RequestsPanel"]


class RequestsPanel(DataTable[Text]):
    """The audit trail as it happens (newest at the bottom)."""

    DEFAULT_CSS = """
    RequestsPanel { border: round $accent; border-title-color: $accent; height: 1fr; }
    """

    def on_mount(self) -> None:
        self.border_title = "Requests"
        self.cursor_type = "row"
        self.add_columns("time", "origin", "topic", "outcome")
        self._shown = 0

    def refresh_from(self, state: SiteState) -> None:
        requests = list(state.requests)
        # The deque drops old rows past its bound: what is new is counted by the total.
        fresh = min(state.requests_total - self._shown, len(requests))
        new = requests[-fresh:] if fresh > 0 else []
        for req in new:
            self.add_row(  # Text: an origin or topic from the wire is never markup
                Text(time.strftime("%H:%M:%S", time.localtime(req.ts))),
                Text(req.origin),
                Text(req.topic),
                Text(req.outcome),
            )
        self._shown = state.requests_total
        if new:
            self.move_cursor(row=self.row_count - 1)
