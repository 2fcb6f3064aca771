"""RoundPanel: round k of N, the phase, local progress with ETA, transfers, the metric per round."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Sparkline, Static

from engine.client.status import ClientStatus
from engine.state import SiteState
from fltui.widgets._text import set_text
from fltui.widgets.site_header import ago

__all__ = ["RoundPanel"]


class RoundPanel(Vertical):
    """The federation as this site sees it."""

    DEFAULT_CSS = """
    RoundPanel { border: round $secondary; border-title-color: $secondary; height: auto; }
    RoundPanel ProgressBar { width: 1fr; }
    RoundPanel Sparkline { height: 1; width: 100%; margin: 0 0; }
    RoundPanel #outcome.completed { color: $success; text-style: bold; }
    RoundPanel #outcome.failed, RoundPanel #outcome.aborted { color: $error; text-style: bold; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "Round"
        yield Static(id="round")
        yield ProgressBar(total=100, show_eta=False, id="progress")
        yield Static(id="metrics")
        yield Sparkline([], id="spark")
        yield Static(id="outcome")

    def refresh_from(self, state: SiteState, now: float | None = None) -> None:
        if state.num_rounds:
            head = f"round {state.round} of {state.num_rounds}"
        else:
            head = "waiting for the first round"
        phase = f" · {state.phase}" if state.phase else ""
        set_text(self.query_one("#round", Static), head + phase)
        bar = self.query_one("#progress", ProgressBar)
        if state.total_steps:
            bar.update(total=state.total_steps, progress=state.step)
        else:
            bar.update(total=100, progress=0)
        running = state.worker_pid is not None or state.status in (
            ClientStatus.TRAINING_STARTING,
            ClientStatus.TRAINING_STARTED,
        )
        bar.display = running and bool(state.total_steps)
        eta = state.eta_seconds(time.time() if now is None else now)
        loss = f" · loss {state.loss:.4f}" if state.loss is not None else ""
        lines = []
        if running and state.total_steps:
            lines.append(
                f"step {state.step}/{state.total_steps}{loss}"
                + (f" · ETA {ago(eta)}" if eta is not None else "")
            )
        if running and state.transfer:
            lines.append(state.transfer)
        metric = _metric_name(state)
        values = [float(m[metric]) for _, m in state.round_metrics if m.get(metric) is not None]
        if values:
            shown = " → ".join(f"{v:.3f}" for v in values[-4:])
            more = "… " if len(values) > 4 else ""
            lines.append(f"global {metric}: {more}{shown}")
        set_text(self.query_one("#metrics", Static), "\n".join(lines) or "no training yet")
        spark = self.query_one("#spark", Sparkline)
        if list(spark.data or []) != values:
            spark.data = values  # type: ignore[misc]
        spark.display = len(values) > 2
        outcome = self.query_one("#outcome", Static)
        if state.outcome:
            last = f" ({metric} {values[-1]:.3f})" if values else ""
            detail = f": {state.outcome_detail}" if state.outcome_detail else ""
            set_text(outcome, f"federation {state.outcome}{last}{detail}")
            outcome.set_classes(state.outcome)
        outcome.display = bool(state.outcome)


def _metric_name(state: SiteState) -> str:
    for _, metrics in state.round_metrics:
        if "accuracy" in metrics:
            return "accuracy"
        if metrics:
            return sorted(metrics)[0]
    return "accuracy"
