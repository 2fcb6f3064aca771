"""HelpScreen: the keys and what they do, and when a value is shown stale or lost."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from engine.site.state import thresholds_text

__all__ = ["HELP_TEXT", "HelpScreen"]

HELP_TEXT = """\
d  deploy    pick an MMAR from transfer/ (or a path) and a run number
s  start     train a deployed run (asks the run number, and GPUs where there are several)
a  abort     stop training (asks first); no worker process is left
r  restart   restart the site engine: a new session with the server (asks first)
v  validate  cross-site validation of every site's model on this site's data
x  stop site stop the site service (asks first); q only detaches from a service
l  logs      cycle the log level filter          /  search the logs
t  theme     next colour theme                   ctrl+p  command palette (every action)
p  screenshot save this screen (SVG and PNG) in screenshots/, for a support ticket
enter       on a request: the whole of it (why it was refused)
e  error     the Client panel's last error, whole (with its traceback)
?  help      this screen                         q  quit (a service keeps running)
"""


class HelpScreen(ModalScreen[None]):
    """Lists the keys; any key closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 84; height: auto; border: thick $primary; background: $surface; padding: 1 2;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "close", "close")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("fltui — keys", classes="title")
            yield Static(HELP_TEXT)
            yield Static(thresholds_text(self._heartbeat_interval()), id="thresholds")

    def _heartbeat_interval(self) -> float:
        """The site's heartbeat interval, from the dashboard underneath (0: not known yet)."""
        for screen in reversed(self.app.screen_stack):
            state = getattr(screen, "state", None)
            if state is not None:
                return float(getattr(state, "heartbeat_interval", 0.0) or 0.0)
        return 0.0

    def action_close(self) -> None:
        self.dismiss(None)
