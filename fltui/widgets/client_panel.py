"""ClientPanel: the training status in colour, run, MMAR, executor, worker PID, last error, and
how sure the console is of them (stale: dimmed with their age; lost: what is unknown)."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from engine.site.state import SiteState
from engine.status import ClientStatus
from fltui.widgets._text import set_text, show_whole, summary_line
from fltui.widgets.site_header import ago

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
    """The site's client: what it is doing and with what (``e``: the last error, whole)."""

    DEFAULT_CSS = """
    ClientPanel { border: round $primary; border-title-color: $primary; height: auto; }
    ClientPanel #status { text-style: bold; }
    ClientPanel #status.idle { color: $status-idle; }
    ClientPanel #status.busy { color: $status-busy; }
    ClientPanel #status.stopped { color: $status-stopped; }
    ClientPanel #status.bad { color: $status-bad; }
    ClientPanel #status.ok { color: $status-ok; }
    ClientPanel #status.stale, ClientPanel #details.stale { text-style: dim; }
    ClientPanel #status.stale, ClientPanel #status.bad { text-wrap: wrap; }
    ClientPanel #error { color: $error; max-height: 4; }
    ClientPanel #status, ClientPanel #details { text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "Client"
        yield Static(id="status")
        yield Static(id="details")
        yield Static(id="error")

    def refresh_from(self, state: SiteState, now: float | None = None) -> None:
        if now is None:
            now = getattr(self.app, "clock", time.time)()
        status = self.query_one("#status", Static)
        details = self.query_one("#details", Static)
        text = state.status_message
        cls = _STATUS_CLASS.get(state.status, "idle")
        if state.outcome == "completed" and state.status == ClientStatus.TRAINING_STOPPED:
            text, cls = "training stopped — federation completed", "ok"
        service, service_age = state.service_freshness(now)
        worker, _ = state.worker_freshness(now)
        run = f"run {state.run_number}" if state.run_number is not None else "no run"
        pid = f"worker pid {state.worker_pid}" if state.worker_pid else "no worker"
        if worker == "gone":
            pid = f"worker pid {state.worker_pid} gone"
        elif state.worker_pid and state.worker_seen is not None and service == "fresh":
            pid += f" · last word {ago(max(0.0, now - state.worker_seen))} ago"
        executor = state.executor or "—"
        second = f"executor {executor} · {pid}"
        if service == "lost":  # nothing shown can be vouched for: say so, not the last state
            text, cls = f"unknown — service lost {ago(service_age)} ago", "bad"
            second = f"worker pid {state.worker_pid}: unknown" if state.worker_pid else "worker ?"
        elif service == "stale":
            text, cls = f"{text} · {ago(service_age)} ago, unconfirmed", "stale"
        set_text(status, f"● {text}")
        status.set_classes(cls)
        set_text(details, f"{run} · MMAR {state.mmar or '—'}\n{second}")
        details.set_classes("stale" if service in ("stale", "lost") else "")
        if state.phase == "cross-site validation" and state.validation_progress:
            second += f"\n{state.validation_progress}"
            set_text(details, f"{run} · MMAR {state.mmar or '—'}\n{second}")
        error = self.query_one("#error", Static)
        whose = f" (run {state.last_error_run})" if state.last_error_run is not None else ""
        self._error = f"last error{whose}: {state.last_error}" if state.last_error else ""
        line = summary_line(state.last_error) if state.last_error else ""
        more = " · e: whole" if line and line != state.last_error.strip() else ""
        # which run and how to see it all, then what (wrapped, at most 3 lines: e for the rest)
        set_text(error, f"last error{whose}{more}:\n{line}" if line else "")
        error.display = bool(state.last_error)

    def show_error(self) -> bool:
        """Opens the whole last error (traceback and all); False when there is none."""
        if not getattr(self, "_error", ""):
            return False
        show_whole(self.app, "last error", self._error)
        return True
