"""LogPanel: live logs with a level filter and a search, from a bounded buffer."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Log

from engine.events import LogRecord
from engine.site.state import SiteState

__all__ = ["LEVELS", "LogPanel"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_RANK = {name: i for i, name in enumerate(LEVELS)}


class LogPanel(Vertical):
    """Logs of this site (and the embedded server)."""

    DEFAULT_CSS = """
    LogPanel { border: round $panel-lighten-2; height: 1fr; }
    LogPanel Log { height: 1fr; background: $surface; }
    LogPanel Input { height: 3; display: none; }
    LogPanel Input.-shown { display: block; }
    """

    def compose(self) -> ComposeResult:
        # Log, not RichLog: plain lines written in one batch per refresh (one layout pass).
        yield Log(max_lines=2000, id="log")
        yield Input(placeholder="search the logs (Enter applies, Esc clears)", id="search")

    def on_mount(self) -> None:
        self.level = "INFO"
        self.search = ""
        self._shown = 0
        self._title()

    def _title(self) -> None:
        search = f" · search {self.search!r}" if self.search else ""
        self.border_title = f"Logs ≥ {self.level}{search}  (l level, / search)"

    def _visible(self, record: LogRecord) -> bool:
        if _RANK.get(record.level, 1) < _RANK[self.level]:
            return False
        return not self.search or self.search.lower() in record.message.lower()

    @staticmethod
    def _line(record: LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.ts))
        mark = "!" if _RANK.get(record.level, 1) >= _RANK["WARNING"] else " "
        return f"{stamp} {record.site:<7}{mark}{record.level[:4]:<4} {record.message}"

    def refresh_from(self, state: SiteState, rebuild: bool = False) -> None:
        records = list(state.logs)
        log = self.query_one("#log", Log)
        if rebuild:
            log.clear()
            self._shown = state.logs_total - len(records)
        # The buffer drops old lines past its bound: what is new is counted by the total.
        fresh = min(state.logs_total - self._shown, len(records))
        lines = [self._line(r) for r in records[len(records) - fresh :] if self._visible(r)]
        if lines:
            log.write_lines(lines)
        self._shown = state.logs_total

    def cycle_level(self, state: SiteState) -> str:
        self.level = LEVELS[(LEVELS.index(self.level) + 1) % len(LEVELS)]
        self._title()
        self.refresh_from(state, rebuild=True)
        return self.level

    def open_search(self) -> None:
        search = self.query_one("#search", Input)
        search.add_class("-shown")
        search.focus()

    def apply_search(self, text: str, state: SiteState) -> None:
        self.search = text.strip()
        search = self.query_one("#search", Input)
        if not self.search:
            search.remove_class("-shown")
        self._title()
        self.refresh_from(state, rebuild=True)
