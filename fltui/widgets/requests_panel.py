"""RequestsPanel: every admin request and local action: time, status, topic, outcome, origin;
the highlighted one's detail on the border, and Enter opens it in full."""

from __future__ import annotations

import time

from rich.style import Style
from rich.text import Text
from textual.content import Content
from textual.widgets import DataTable

from engine.events import AdminRequestHandled
from engine.site.state import SiteState
from fltui.screens.request import RequestScreen
from fltui.widgets._text import elide, summary_line

__all__ = ["BAD_OUTCOMES", "RequestsPanel"]

BAD_OUTCOMES = frozenset({"refused", "error", "failed"})
TIME_W, STATUS_W, TOPIC_W = 8, 7, 14
OUTCOME_MIN = 24  # below this the outcome goes on a second line of its own
ORIGIN_MAX = 20


class RequestsPanel(DataTable[Text]):
    """The audit trail as it happens: newest at the bottom, followed unless a row was chosen.

    Rows are drawn to the panel's width, so what matters is never the part that is cut: the
    status (coloured when refused or failed), the topic and the outcome come first and the
    origin last, elided first. Where a row cannot hold an outcome worth reading (an 80-column
    terminal), each request takes two lines and the outcome has the second to itself.
    """

    COMPONENT_CLASSES = {"requests--bad", "requests--ok"}
    DEFAULT_CSS = """
    RequestsPanel {
        border: round $accent; border-title-color: $accent; height: 1fr;
        overflow-x: hidden; scrollbar-size-vertical: 1;
    }
    RequestsPanel > .requests--bad { color: $error; text-style: bold; }
    RequestsPanel > .requests--ok { color: $success; }
    """

    def on_mount(self) -> None:
        self.border_title = "Requests"
        self.cursor_type = "row"
        self.cell_padding = 0
        self.zebra_stripes = False
        self._shown = 0
        self._rows: list[AdminRequestHandled] = []  # row index -> its request
        self._width = 0
        self._two_lines = False
        self._layout(self._inner_width())
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._rebuild())

    # ------------------------------------------------------------------ rows to the width

    def _inner_width(self) -> int:
        # The content region less the vertical scrollbar's column, whether it shows or not:
        # a row never changes because a scrollbar appeared.
        return max(self.content_region.width - 1, 20)

    def _widths(self, width: int) -> tuple[int, int, bool]:
        """(topic, origin) widths and whether the outcome needs a line of its own."""
        topic = min(TOPIC_W, max((len(r.topic) for r in self._rows), default=5))
        fixed = TIME_W + 1 + STATUS_W + 1 + topic + 1
        rest = width - fixed
        if rest < OUTCOME_MIN:
            return topic, 0, True
        longest = max((len(r.origin) for r in self._rows), default=0)
        origin = min(longest, ORIGIN_MAX, rest - OUTCOME_MIN - 1)
        return topic, origin if origin >= 4 else 0, False

    def _layout(self, width: int) -> None:
        topic, origin, two = self._widths(width)
        self._width, self._two_lines, self._topic_w, self._origin_w = width, two, topic, origin
        self.clear(columns=True)
        self.show_header = not two
        if two:
            self.add_column("request", key="row", width=width)
            return
        outcome = width - (TIME_W + 1 + STATUS_W + 1 + topic + 1) - (origin + 1 if origin else 0)
        self._outcome_w = outcome
        label = f"{'time':<{TIME_W}} {'status':<{STATUS_W}} {'topic':<{topic}} " + (
            f"{'outcome':<{outcome}} {'origin'}" if origin else "outcome"
        )
        self.add_column(Text(label), key="row", width=width)

    def _style(self, req: AdminRequestHandled) -> Style:
        bad = req.outcome in BAD_OUTCOMES
        return self.get_component_rich_style("requests--bad" if bad else "requests--ok")

    def _cell(self, req: AdminRequestHandled) -> Text:
        """One request as the row shows it (Text: nothing from the wire is markup)."""
        stamp = time.strftime("%H:%M:%S", time.localtime(req.ts))
        outcome = summary_line(req.detail) or req.outcome
        row = Text(f"{stamp} ")
        row.append(f"{elide(req.outcome, STATUS_W):<{STATUS_W}}", self._style(req))
        row.append(f" {elide(req.topic, self._topic_w):<{self._topic_w}} ")
        if self._two_lines:
            head = self._width - row.cell_len
            if head >= 4:
                row.append(elide(req.origin, head), "dim")
            row.append("\n  " + elide(outcome, self._width - 2))
            return row
        row.append(f"{elide(outcome, self._outcome_w):<{self._outcome_w}}")
        if self._origin_w:
            row.append(" " + elide(req.origin, self._origin_w), "dim")
        return row

    def _add(self, req: AdminRequestHandled) -> None:
        self.add_row(self._cell(req), height=2 if self._two_lines else 1)

    def _rebuild(self) -> None:
        """Draws every row again (a new width, a new theme), keeping the chosen row."""
        if not self.is_mounted:
            return
        row = self.cursor_row
        self._layout(self._inner_width())
        for req in self._rows:
            self._add(req)
        if self._rows:
            self.move_cursor(row=min(max(row, 0), len(self._rows) - 1))

    def on_resize(self) -> None:
        if self._inner_width() != self._width:
            self._rebuild()

    # ------------------------------------------------------------------ selection

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        req = self._request(event.cursor_row)
        # Content, not markup: a detail from the wire is shown as it is.
        line = summary_line(req.detail) if req is not None else ""
        self.border_subtitle = Content(line) if line else None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        req = self._request(event.cursor_row)
        if req is not None:
            self.app.push_screen(RequestScreen(req))

    def _request(self, row: int) -> AdminRequestHandled | None:
        return self._rows[row] if 0 <= row < len(self._rows) else None

    def refresh_from(self, state: SiteState) -> None:
        requests = list(state.requests)
        if state.requests_total < self._shown:
            # Fewer than already shown: another service (a restarted one) whose state this is.
            self._rows, self._shown = [], state.requests_total - len(requests)
            self._rebuild()
        # The deque drops old rows past its bound: what is new is counted by the total.
        fresh = min(state.requests_total - self._shown, len(requests))
        new = requests[-fresh:] if fresh > 0 else []
        self._shown = state.requests_total
        if not new:
            return
        # The cursor follows new rows only from the last row: one the operator chose (a refusal
        # being read) stays where it is.
        following = self.cursor_row >= self.row_count - 1
        self._rows.extend(new)
        if self._widths(self._width)[:2] != (self._topic_w, self._origin_w):
            self._rebuild()  # a longer topic or origin than any before: columns move
        else:
            for req in new:
                self._add(req)
        if following:
            self.move_cursor(row=self.row_count - 1)
