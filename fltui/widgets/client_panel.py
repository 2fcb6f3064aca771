"""ClientPanel: the training status in colour, run, MMAR, executor, worker PID, last error."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from engine.site.state import SiteState
from engine.status import ClientStatus
from fltui.widgets._text import set_text

__all__ = ["ClientPanel"]

_STATUS_CLASS = {
    ClientStatus.TRAINING_NOT_STARTED: "idle",
    ClientStatus.TRAINING_STARTING: "busy",
    ClientStatus.TRAINING_STARTED: "busy",
    ClientStatus.TRAINING_STOPPED: "stopped",
    ClientStatus.TRAINING_EXCEPTION: "bad",
    ClientStatus.CROSS_SITE_VALIDATION: "busy",
}


class ClientPanel(Vertical):
    """The site's client: what it is doing and with what."""

    DEFAULT_CSS = """
    ClientPanel { border: round $primary; border-title-color: $primary; height: auto; }
    ClientPanel #status { text-style: bold; }
    ClientPanel #status.idle { color: $status-idle; }
    ClientPanel #status.busy { color: $status-busy; }
    ClientPanel #status.stopped { color: $status-stopped; }
    ClientPanel #status.bad { color: $status-bad; }
    ClientPanel #status.ok { color: $status-ok; }
    ClientPanel #error { color: $error; }
    ClientPanel #status, ClientPanel #details { text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "Client"
        yield Static(id="status")
        yield Static(id="details")
        yield Static(id="error")

    def refresh_from(self, state: SiteState) -> None:
        status = self.query_one("#status", Static)
        text = state.status_message
        cls = _STATUS_CLASS.get(state.status, "idle")
        if state.outcome == "completed" and state.status == ClientStatus.TRAINING_STOPPED:
            text, cls = "training stopped — federation completed", "ok"
        set_text(status, f"● {text}")
        status.set_classes(cls)
        run = f"run {state.run_number}" if state.run_number is not None else "no run"
        pid = f"worker pid {state.worker_pid}" if state.worker_pid else "no worker"
        executor = state.executor or "—"
        set_text(
            self.query_one("#details", Static),
            f"{run} · MMAR {state.mmar or '—'}\nexecutor {executor} · {pid}",
        )
        error = self.query_one("#error", Static)
        set_text(error, f"last error: {state.last_error}" if state.last_error else "")
        error.display = bool(state.last_error)
