"""RequestsPanel: every admin request and local action: time, origin, topic, outcome."""

from __future__ import annotations

import time

from textual.widgets import DataTable

from engine.state import SiteState

__all__ = ["RequestsPanel"]


class RequestsPanel(DataTable[str]):
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
        # The deque drops old rows past its bound: append only what is new.
        new = requests[-(len(requests) - self._shown) :] if len(requests) > self._shown else []
        if len(requests) < self._shown:
            new = requests[-1:]
        for req in new:
            self.add_row(
                time.strftime("%H:%M:%S", time.localtime(req.ts)),
                req.origin,
                req.topic,
                req.outcome,
            )
        self._shown = len(requests)
        if new:
            self.move_cursor(row=self.row_count - 1)
