"""LogPanel: live logs with a level filter and a search, from a bounded buffer; follows the
newest line unless the operator scrolled up."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Input, Log

from engine.events import LogRecord
from engine.site.state import SiteState
from fltui.widgets._text import wrap_line

__all__ = ["LEVELS", "LogPanel"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_RANK = {name: i for i, name in enumerate(LEVELS)}
INDENT = 9  # a wrapped line's rows after the first start under the message, past the time


class LogPanel(Vertical):
    """Logs of this site (and the embedded server).

    Long lines wrap to the panel's width (never cut at its edge). The panel follows the newest
    line; once the operator scrolls up it stays where they are and its border says how many
    lines came in below, until they are back at the end (End, or scrolling down). Clearing the
    search and resizing the terminal redraw the lines and follow again.
    """

    DEFAULT_CSS = """
    LogPanel { border: round $panel-lighten-2; border-title-color: $foreground; height: 1fr; }
    LogPanel { border-subtitle-color: $warning; }
    LogPanel Log { height: 1fr; background: $surface; overflow-x: hidden; }
    LogPanel Input { height: 3; display: none; }
    LogPanel Input.-shown { display: block; }
    """
    # While the search box has the focus it takes the printable keys (a q is typed, not quit):
    # the footer then says how to leave it (and the app's ctrl+q quits).
    BINDINGS = [Binding("escape", "clear_search", "clear search")]

    def compose(self) -> ComposeResult:
        # Log, not RichLog: plain lines written in one batch per refresh (one layout pass).
        yield Log(max_lines=2000, id="log", auto_scroll=False)
        yield Input(placeholder="search the logs (Enter applies, Esc clears)", id="search")

    def on_mount(self) -> None:
        self.level = "INFO"
        self.search = ""
        self.following = True
        self.unseen = 0  # lines written below the view while not following
        self._shown = 0
        self._width = 0
        self._state: SiteState | None = None
        self._return_focus: Widget | None = None
        self._title()
        self.watch(self.query_one("#log", Log), "scroll_y", self._scrolled, init=False)

    def _title(self) -> None:
        search = f" · search {self.search!r}" if self.search else ""
        self.border_title = f"Logs ≥ {self.level}{search}  (l level, / search)"

    def _marker(self) -> None:
        below = self.unseen if not self.following else 0
        self.border_subtitle = f"▼ {below} new lines below (End)" if below else None

    def _scrolled(self, _old: float, new: float) -> None:
        log = self.query_one("#log", Log)
        self.following = new >= log.max_scroll_y
        if self.following:
            self.unseen = 0
        self._marker()

    def _visible(self, record: LogRecord) -> bool:
        if _RANK.get(record.level, 1) < _RANK[self.level]:
            return False
        return not self.search or self.search.lower() in record.message.lower()

    @staticmethod
    def _line(record: LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.ts))
        mark = "!" if _RANK.get(record.level, 1) >= _RANK["WARNING"] else " "
        return f"{stamp} {record.site:<7}{mark}{record.level[:4]:<4} {record.message}"

    def _rows(self, record: LogRecord) -> list[str]:
        rows: list[str] = []
        for n, part in enumerate(self._line(record).splitlines() or [""]):
            # a traceback's own lines are indented like a wrapped line's rows
            rows += wrap_line(part if n == 0 else " " * INDENT + part, self._width, INDENT)
        return rows

    def _log_width(self) -> int:
        log = self.query_one("#log", Log)
        # less the vertical scrollbar's column, shown or not: the rows never change with it
        return max(log.size.width - log.styles.scrollbar_size_vertical, 20)

    def refresh_from(self, state: SiteState, rebuild: bool = False) -> None:
        self._state = state
        records = list(state.logs)
        log = self.query_one("#log", Log)
        width = self._log_width()
        if width != self._width:
            self._width, rebuild = width, True
        if state.logs_total < self._shown:
            rebuild = True  # fewer than already shown: another (restarted) service's state
        if rebuild:
            log.clear()
            self.following, self.unseen = True, 0
            self._shown = state.logs_total - len(records)
        # The buffer drops old lines past its bound: what is new is counted by the total.
        fresh = min(state.logs_total - self._shown, len(records))
        lines = [
            row
            for r in records[len(records) - fresh :]
            if self._visible(r)
            for row in self._rows(r)
        ]
        self._shown = state.logs_total
        if lines:
            log.write_lines(lines)
            if not self.following:
                self.unseen += len(lines)
        if self.following:
            self.call_after_refresh(self._follow)
        self._marker()

    def _follow(self) -> None:
        # After the refresh (the new lines laid out), and only if the operator has not
        # scrolled up meanwhile.
        if self.following:
            self.query_one("#log", Log).scroll_end(animate=False, immediate=True, x_axis=False)

    def on_resize(self) -> None:
        # A new width wraps every line again and follows the newest (the lines moved anyway).
        if self._state is not None and self._log_width() != self._width:
            self.refresh_from(self._state)

    def cycle_level(self, state: SiteState) -> str:
        self.level = LEVELS[(LEVELS.index(self.level) + 1) % len(LEVELS)]
        self._title()
        self.refresh_from(state, rebuild=True)
        return self.level

    def open_search(self) -> None:
        search = self.query_one("#search", Input)
        focused = self.screen.focused
        if focused is not search:
            self._return_focus = focused
        search.add_class("-shown")
        search.focus()

    def close_search(self, hide: bool = True) -> None:
        """Gives the focus back to where it was before ``/`` (and hides the search box)."""
        if hide:
            self.query_one("#search", Input).remove_class("-shown")
        target = self._return_focus
        self._return_focus = None
        if target is not None and target.is_attached and target is not self:
            target.focus()
        else:
            self.screen.set_focus(None)
            self.screen.focus_next()

    def apply_search(self, text: str, state: SiteState) -> None:
        self.search = text.strip()
        if not self.search:
            self.query_one("#search", Input).remove_class("-shown")
        self._title()
        self.refresh_from(state, rebuild=True)

    def action_clear_search(self) -> None:
        """Esc: the search is cleared, the box closed, the logs follow again."""
        search = self.query_one("#search", Input)
        search.value = ""
        if self._state is not None:
            self.apply_search("", self._state)
        self.close_search()
