"""RequestsPanel: every admin request and local action: time, origin, topic, outcome; the
highlighted one's detail on the border, and Enter opens it in full."""

from __future__ import annotations

import time

from rich.text import Text
from textual.content import Content
from textual.widgets import DataTable

from engine.events import AdminRequestHandled
from engine.site.state import SiteState
from fltui.screens.request import RequestScreen

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
        self._rows: list[AdminRequestHandled] = []  # row index -> its request

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        req = self._request(event.cursor_row)
        # Content, not markup: a detail from the wire is shown as it is.
        line = req.detail.strip().splitlines()[0] if req is not None and req.detail.strip() else ""
        self.border_subtitle = Content(line) if line else None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        req = self._request(event.cursor_row)
        if req is not None:
            self.app.push_screen(RequestScreen(req))

    def _request(self, row: int) -> AdminRequestHandled | None:
        return self._rows[row] if 0 <= row < len(self._rows) else None

    def refresh_from(self, state: SiteState) -> None:
        requests = list(state.requests)
        # The deque drops old rows past its bound: what is new is counted by the total.
        fresh = min(state.requests_total - self._shown, len(requests))
        new = requests[-fresh:] if fresh > 0 else []
        # The cursor follows new rows only from the last row: one the operator chose (a refusal
        # being read) stays where it is.
        following = self.cursor_row >= self.row_count - 1
        for req in new:
            self.add_row(  # Text: an origin or topic from the wire is never markup
                Text(time.strftime("%H:%M:%S", time.localtime(req.ts))),
                Text(req.origin),
                Text(req.topic),
                Text(req.outcome, style="" if req.outcome == "ok" else "bold"),
            )
            self._rows.append(req)
        self._shown = state.requests_total
        if new and following:
            self.move_cursor(row=self.row_count - 1)
