"""RoundPanel: round k of N, the phase, local progress with ETA, transfers, the metric per round,
and the last cross-site validation on this site's data."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import ProgressBar, Sparkline, Static

from engine.site.state import SiteState
from engine.status import ClientStatus
from fltui.widgets._text import set_text, summary_line
from fltui.widgets.site_header import ago

__all__ = ["RoundPanel"]


class RoundPanel(Vertical):
    """The federation as this site sees it.

    Five rows that never change height (a hidden row keeps its place, a long line is cut with
    an ellipsis): a round's phases and progress repaint the panel but never re-lay out the
    screen, which is what a console would otherwise spend its CPU on while a site trains. Rows
    are hidden by opacity, not visibility: Textual re-lays out the screen on a visibility change.
    A sixth row, homomorphic encryption's, appears once in a federation that runs it.
    """

    DEFAULT_CSS = """
    RoundPanel { border: round $secondary; border-title-color: $secondary; height: auto; }
    RoundPanel Static { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    RoundPanel ProgressBar { width: 1fr; height: 1; }
    RoundPanel Sparkline { height: 1; width: 100%; margin: 0 0; }
    RoundPanel #he { display: none; }
    RoundPanel #detail.completed { color: $success; text-style: bold; }
    RoundPanel #detail.failed, RoundPanel #detail.aborted { color: $error; text-style: bold; }
    RoundPanel #detail.lost { color: $error; text-style: bold; }
    RoundPanel #round.stale, RoundPanel #detail.stale { text-style: dim; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "Round"
        yield Static(id="round")
        yield ProgressBar(total=100, show_eta=False, id="progress")
        # step · loss · ETA, or the last transfer, or cross-site validation, or the outcome
        yield Static(id="detail")
        yield Static(id="metrics")
        yield Sparkline([], id="spark")
        # Homomorphic encryption only: shown once (a federation without it keeps five rows).
        yield Static(id="he")

    def on_resize(self) -> None:
        last = getattr(self, "_last", None)
        if last is not None:
            self.refresh_from(*last)

    def refresh_from(self, state: SiteState, now: float | None = None) -> None:
        self._last = (state, now)
        now = getattr(self.app, "clock", time.time)() if now is None else now
        # How sure the console is: a stale service's round is its last word, with its age; a
        # lost one's is unknown (no bar, no ETA: nothing is known to be moving).
        service, service_age = state.service_freshness(now)
        if state.num_rounds:
            head = f"round {state.round} of {state.num_rounds}"
        else:
            head = "waiting for the first round"
        phase = f" · {state.phase}" if state.phase else ""
        round_row = self.query_one("#round", Static)
        if service == "lost":
            set_text(round_row, f"{head} · state unknown")
        else:
            set_text(round_row, head + phase)
        round_row.set_classes("stale" if service in ("stale", "lost") else "")
        bar = self.query_one("#progress", ProgressBar)
        if state.total_steps:
            bar.update(total=state.total_steps, progress=state.step)
        else:
            bar.update(total=100, progress=0)
        running = state.worker_pid is not None or state.status in (
            ClientStatus.TRAINING_STARTING,
            ClientStatus.TRAINING_STARTED,
        )
        _show(bar, running and bool(state.total_steps) and service == "fresh")
        metric = _metric_name(state)
        values = [float(m[metric]) for _, m in state.round_metrics if m.get(metric) is not None]
        detail = self.query_one("#detail", Static)
        if service == "lost":
            step = f"{state.step}/{state.total_steps}" if state.total_steps else ""
            last = " ".join(x for x in (state.phase, step) if x)
            text = f"last seen {ago(service_age)} ago" + (f": {last}" if last else "")
            detail.set_classes("lost")
        elif service == "stale":  # the last word, its age; no ETA (nothing is known to move)
            step = f"step {state.step}/{state.total_steps}" if running and state.total_steps else ""
            text = f"{step or 'unconfirmed'} · {ago(service_age)} ago" + (
                ", unconfirmed" if step else ""
            )
            detail.set_classes("stale")
        elif state.validation and not running:  # the newest news: validation follows a run
            text = _validation_line(state.validation, metric)
            detail.set_classes("")
        elif state.outcome and not running:
            last = f" ({metric} {values[-1]:.3f})" if values else ""
            # a traceback is its last line here (the whole: the Client panel's e)
            why = f": {summary_line(state.outcome_detail)}" if state.outcome_detail else ""
            if state.outcome == "aborted":  # this site's abort: the federation goes on
                text = "this site stopped (abort)"  # the metric row below has the rest
            else:
                text = f"federation {state.outcome}{last}{why}"
            detail.set_classes(state.outcome)
        else:
            eta = state.eta_seconds(now)
            loss = f" · loss {state.loss:.4f}" if state.loss is not None else ""
            text = ""
            if running and state.total_steps and state.phase in ("training", ""):
                text = f"step {state.step}/{state.total_steps}{loss}" + (
                    f" · ETA {ago(eta)}" if eta is not None else ""
                )
            elif running and state.transfer:
                text = state.transfer
            detail.set_classes("")
        set_text(detail, text)
        set_text(self.query_one("#metrics", Static), self._metric_line(metric, values))
        he = self.query_one("#he", Static)
        he_line = _he_line(state)
        set_text(he, he_line)
        if he.styles.display != ("block" if he_line else "none"):
            he.styles.display = "block" if he_line else "none"  # once per federation
        spark = self.query_one("#spark", Sparkline)
        if list(spark.data or []) != values:
            spark.data = values  # type: ignore[misc]
        _show(spark, len(values) > 2)

    def _metric_line(self, metric: str, values: list[float]) -> str:
        """The latest values that fit the panel's width, oldest first."""
        if not values:
            return "no training yet"
        room = max(self.size.width - 2, 20) if self.size.width else 10_000
        head = f"global {metric}: "
        shown: list[str] = []
        for v in reversed(values):
            more = "… " if len(shown) + 1 < len(values) else ""
            candidate = head + more + " → ".join([f"{v:.3f}", *shown])
            if shown and len(candidate) > room:
                break
            shown.insert(0, f"{v:.3f}")
        more = "… " if len(shown) < len(values) else ""
        return head + more + " → ".join(shown)


def _show(widget: Widget, visible: bool) -> None:
    """Shows or hides ``widget`` in place: it keeps its row, so nothing moves (a repaint only)."""
    opacity = 1.0 if visible else 0.0
    if widget.styles.opacity != opacity:
        widget.styles.opacity = opacity


def _he_line(state: SiteState) -> str:
    """``updates encrypted (CKKS) · encrypt 0.4 s · decrypt 0.1 s`` (empty without HE)."""
    if not state.he_scheme:
        return ""
    parts = [f"updates encrypted ({state.he_scheme})"]
    if state.he_encrypt_s is not None:
        parts.append(f"encrypt {state.he_encrypt_s:.1f} s")
    if state.he_decrypt_s is not None:
        parts.append(f"decrypt {state.he_decrypt_s:.1f} s")
    return " · ".join(parts)


def _validation_line(results: dict[str, dict[str, float]], metric: str) -> str:
    """``cross-site accuracy: server 0.795 · site-1 0.809``: each model on this site's data."""
    names = {name for metrics in results.values() for name in metrics}
    if metric not in names:
        metric = sorted(names)[0] if names else metric
    owners = sorted(results, key=lambda owner: (owner != "server", owner))
    shown = [
        f"{owner} {results[owner][metric]:.3f}"
        if isinstance(results[owner].get(metric), (int, float))
        else f"{owner} –"
        for owner in owners
    ]
    return f"cross-site {metric}: " + " · ".join(shown)


def _metric_name(state: SiteState) -> str:
    if state.key_metric and any(state.key_metric in m for _, m in state.round_metrics):
        return state.key_metric
    for _, metrics in state.round_metrics:
        if "accuracy" in metrics:
            return "accuracy"
        if metrics:
            return sorted(metrics)[0]
    return "accuracy"
