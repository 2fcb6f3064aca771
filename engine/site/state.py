"""SiteState: a site as it is now, folded from its events (for consoles and snapshots)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from engine.events import (
    AdminRequestHandled,
    ConnectionChanged,
    ContributionResent,
    CrossSiteValidated,
    Event,
    FederationFinished,
    HeartbeatAcknowledged,
    HomomorphicEncryptionApplied,
    LogRecord,
    MetricsReported,
    ModelTransferred,
    PhaseChanged,
    ProgressUpdated,
    RoundCompleted,
    RoundStarted,
    RunChanged,
    ServiceLink,
    SessionRenewed,
    SiteConfigured,
    SitePulse,
    StateSnapshot,
    StatusChanged,
    ValidationProgress,
    event_from_dict,
)
from engine.status import ClientStatus

__all__ = [
    "LOST_AFTER",
    "PARTS",
    "PULSE_S",
    "STALE_AFTER",
    "SiteState",
    "freshness",
    "thresholds_text",
]

PARTS = ("header", "client", "round", "gpu", "requests", "logs")
MAX_REQUESTS = 200
MAX_LOGS = 2000

# Every value on the console has an age: when it was last confirmed. Past STALE_AFTER of its
# source's interval it is shown stale (dimmed, with its age); past LOST_AFTER, lost (the error
# colour, and the panels say what is unknown). A source that beats every interval is seen to stop
# within 2 intervals, as the operator is promised.
PULSE_S = 2.0  # the site service tells its consoles it is alive this often (SitePulse)
STALE_AFTER = 1.5  # intervals
LOST_AFTER = 4.0  # intervals
# Set on the console's side only: a snapshot from the service does not replace them.
_CONSOLE_FIELDS = ("service_remote", "service_connected", "service_seen")


def freshness(age: float | None, interval: float) -> str:
    """ "fresh", "stale" or "lost" for a value last confirmed ``age`` s ago by a source that
    confirms it every ``interval`` s (an unknown age or interval: "fresh", nothing to judge)."""
    if age is None or interval <= 0:
        return "fresh"
    if age > LOST_AFTER * interval:
        return "lost"
    if age > STALE_AFTER * interval:
        return "stale"
    return "fresh"


def thresholds_text(heartbeat_interval: float = 0.0) -> str:
    """The thresholds in words, for the help screen."""
    hb = (
        f"{heartbeat_interval:g} s here"
        if heartbeat_interval > 0
        else "the kit's heartbeat_interval"
    )
    return (
        f"Every value has an age. The service says it is alive every {PULSE_S:g} s; the server "
        f"answers a heartbeat every interval ({hb}).\n"
        f"Unconfirmed for {STALE_AFTER:g} intervals: stale (dimmed, with its age; "
        f"service: {STALE_AFTER * PULSE_S:g} s, or at once when its connection drops).\n"
        f"Unconfirmed for {LOST_AFTER:g} intervals: lost (error colour, state unknown; "
        f"service: {LOST_AFTER * PULSE_S:g} s). A worker that exits is shown gone at once."
    )


@dataclass
class SiteState:
    """One site's live state; ``apply`` folds an event in and says which parts changed.

    Only events about this site (and, for logs, the server) are taken; a demo bus carries the
    peers' events too.
    """

    site: str = ""
    server: str = ""
    tls: bool = False
    workspace: str = ""
    connection: str = "not connected"
    connection_detail: str = ""
    registered_at: float | None = None
    # What the site recovered from (server restarts, lost contributions), newest last.
    session_renewals: int = 0
    recovery: str = ""
    last_heartbeat: float | None = None
    heartbeat_rtt_ms: float | None = None
    heartbeat_interval: float = 0.0
    status: int = ClientStatus.TRAINING_NOT_STARTED
    last_error: str = ""
    last_error_run: int | None = None  # the run "last error" belongs to (None: no run's)
    # Liveness. The service's last SitePulse, and what it said of the worker.
    pulse_at: float | None = None
    worker_alive: bool = False
    worker_seen: float | None = None
    # The console's link to the service (ServiceLink; console-side, see _CONSOLE_FIELDS).
    service_remote: bool = False
    service_connected: bool = True
    service_seen: float | None = None
    run_number: int | None = None
    mmar: str = ""
    executor: str = ""
    worker_pid: int | None = None
    round: int = 0
    num_rounds: int = 0
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    train_started: float | None = None
    transfer: str = ""
    # Homomorphic encryption: the scheme once an update was encrypted or a model decrypted,
    # and the last round's seconds for each.
    he_scheme: str = ""
    he_encrypt_s: float | None = None
    he_decrypt_s: float | None = None
    round_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    # The metric the MMAR's config chose (RoundCompleted.key_metric): plotted, chooses best.
    key_metric: str = ""
    local_metrics: dict[str, float] = field(default_factory=dict)
    # The latest cross-site validation on this site's data: {model owner: metrics}.
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    # The latest ValidationProgress, in words ("cross-site validation: 2 of 3 models ...").
    validation_progress: str = ""
    outcome: str = ""
    outcome_detail: str = ""
    gpu: Any = None  # the last GpuSampled
    requests: deque[AdminRequestHandled] = field(default_factory=lambda: deque(maxlen=MAX_REQUESTS))
    logs: deque[LogRecord] = field(default_factory=lambda: deque(maxlen=MAX_LOGS))
    # Totals ever received: the deques drop old entries, so a panel counts what is new by these.
    logs_total: int = 0
    requests_total: int = 0

    @property
    def status_message(self) -> str:
        return ClientStatus.get_status_message(self.status)

    def token_age(self, now: float | None = None) -> float | None:
        if self.registered_at is None:
            return None
        return (now or time.time()) - self.registered_at

    # -- ages: how sure the console is of what it shows ----------------------------------------

    def service_freshness(self, now: float) -> tuple[str, float | None]:
        """The console's link to the service: ("fresh"|"stale"|"lost"|"attaching", age s).

        A dropped connection is stale at once (the service may be restarting) and lost once it
        stays away past the threshold; a connected service that stops pulsing (hung) goes the
        same way. An engine in the console itself is always fresh.
        """
        if not self.service_remote:
            return "fresh", None
        if self.service_seen is None:
            return "attaching", None
        age = max(0.0, now - self.service_seen)
        if not self.service_connected:
            return ("lost" if age > LOST_AFTER * PULSE_S else "stale"), age
        if self.pulse_at is None:  # a service that does not pulse: silence proves nothing
            return "fresh", age
        return freshness(age, PULSE_S), age

    def server_freshness(self, now: float) -> tuple[str, float | None]:
        """The server, by its last answered heartbeat (since registration before the first).

        Judged while the site has a session: registered, its calls going through ("connected",
        as a worker's first call says) or failing ("retrying": the server's silence still ages).
        """
        if self.connection not in ("registered", "registered again", "connected", "retrying"):
            return "fresh", None  # the connection's own state says what is wrong
        known = [t for t in (self.last_heartbeat, self.registered_at) if t is not None]
        if not known:
            return "fresh", None
        since = max(known)  # registered again after a restart: aged from then, not before
        age = max(0.0, now - since)
        return freshness(age, self.heartbeat_interval), age

    def worker_freshness(self, now: float) -> tuple[str, float | None]:
        """The worker: "gone" when the service found its process dead, else as the service."""
        if self.worker_pid is None:
            return "fresh", None
        if self.pulse_at is not None and not self.worker_alive:
            return "gone", max(0.0, now - self.pulse_at)
        level, age = self.service_freshness(now)
        return ("fresh" if level == "attaching" else level), age

    def _levels(self, now: float) -> tuple[str, ...]:
        return (
            self.service_freshness(now)[0],
            self.server_freshness(now)[0],
            self.worker_freshness(now)[0],
        )

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds until local training ends, from the pace so far."""
        if not self.train_started or self.step <= 0 or self.total_steps <= self.step:
            return None
        elapsed = (now or time.time()) - self.train_started
        return elapsed / self.step * (self.total_steps - self.step)

    def apply(self, event: Event) -> set[str]:
        """Folds ``event`` in; returns the parts (``PARTS``) whose display must change."""
        if isinstance(event, LogRecord):
            if not self.site or event.site in (self.site, "server"):
                self.logs.append(event)
                self.logs_total += 1
                return {"logs"}
            return set()
        if type(event).__name__ == "GpuSampled":
            self.gpu = event
            return {"gpu"}
        if self.site and event.site != self.site:
            return set()
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        return set(handler(event)) if handler is not None else set()

    # -- one handler per event type -----------------------------------------------------------

    def _on_SiteConfigured(self, e: SiteConfigured) -> set[str]:
        self.site = self.site or e.site
        self.server, self.tls, self.workspace, self.executor = (
            e.server,
            e.tls,
            e.workspace,
            e.executor,
        )
        self.heartbeat_interval = e.heartbeat_interval or self.heartbeat_interval
        return {"header", "client"}

    def _on_SitePulse(self, e: SitePulse) -> set[str]:
        before = self._levels(e.ts)
        self.pulse_at = e.ts
        self.worker_alive = e.worker_alive and e.worker_pid == self.worker_pid
        self.worker_seen = e.worker_seen
        return {"header", "client", "round"} if self._levels(e.ts) != before else {"header"}

    def _on_ServiceLink(self, e: ServiceLink) -> set[str]:
        before = getattr(self, "_shown_levels", None)
        self.service_remote, self.service_connected = e.remote, e.connected
        self.service_seen = e.seen if e.seen is not None else self.service_seen
        levels = self._levels(e.ts)
        setattr(self, "_shown_levels", levels)  # noqa: B010 - not a field: never serialised
        if levels != before or any(level != "fresh" for level in levels):
            return {"header", "client", "round"}  # ages count up: redraw each tick meanwhile
        return set()

    def _on_ConnectionChanged(self, e: ConnectionChanged) -> set[str]:
        self.connection, self.connection_detail = e.state, e.detail
        self.server = e.server or self.server
        if e.state == "registered":
            self.registered_at = e.ts
        if e.state == "failed":
            self._error(e.detail)
        return {"header", "client"} if e.state == "failed" else {"header"}

    def _on_SessionRenewed(self, e: SessionRenewed) -> set[str]:
        self.connection, self.connection_detail = "registered again", e.reason
        self.registered_at = e.ts
        self.session_renewals += 1
        self.recovery = e.summary()
        return {"header", "client"}

    def _on_ContributionResent(self, e: ContributionResent) -> set[str]:
        self.recovery = e.summary()
        return {"round"}

    def _on_HeartbeatAcknowledged(self, e: HeartbeatAcknowledged) -> set[str]:
        self.last_heartbeat, self.heartbeat_rtt_ms = e.ts, e.rtt_ms
        return {"header"}

    def _on_StatusChanged(self, e: StatusChanged) -> set[str]:
        self.status = e.status
        if e.status == ClientStatus.TRAINING_EXCEPTION:
            self._error(e.detail or e.message)
        elif e.status in (ClientStatus.TRAINING_STARTING, ClientStatus.TRAINING_STARTED):
            self.outcome = ""
        return {"client", "round"}

    def _on_RunChanged(self, e: RunChanged) -> set[str]:
        if e.running and e.mode == "validate":
            # A validation worker of a run: the run's rounds stay on screen; its progress and
            # results replace the last validation's.
            self.run_number, self.mmar, self.executor, self.worker_pid = (
                e.run_number,
                e.mmar,
                e.executor,
                e.pid,
            )
            self.phase, self.validation, self.validation_progress = "cross-site validation", {}, ""
            self.worker_alive = True
        elif e.running:
            self.run_number, self.mmar, self.executor, self.worker_pid = (
                e.run_number,
                e.mmar,
                e.executor,
                e.pid,
            )
            self.round_metrics, self.round, self.phase, self.outcome = [], 0, "", ""
            self.step, self.total_steps, self.loss, self.transfer = 0, 0, None, ""
            self.last_error, self.local_metrics, self.validation = "", {}, {}
            self.validation_progress = ""
            self.last_error_run, self.worker_alive = None, True
        else:
            self.worker_pid, self.phase = None, ""  # no worker: nothing is in progress
        return {"client", "round"}

    def _on_RoundStarted(self, e: RoundStarted) -> set[str]:
        self.round, self.num_rounds = e.round, e.num_rounds
        self.step, self.total_steps, self.loss, self.train_started = 0, 0, None, None
        return {"round"}

    def _on_PhaseChanged(self, e: PhaseChanged) -> set[str]:
        self.phase = e.phase
        if e.phase == "cross-site validation":
            self.validation = {}  # a new validation: its results replace the last one's
        if e.phase == "training":
            self.train_started = e.ts
        return {"round"}

    def _on_ProgressUpdated(self, e: ProgressUpdated) -> set[str]:
        self.round = e.round or self.round
        self.step, self.total_steps, self.epoch, self.loss = e.step, e.total_steps, e.epoch, e.loss
        return {"round"}

    def _on_ModelTransferred(self, e: ModelTransferred) -> set[str]:
        arrow = "↓" if e.direction == "download" else "↑"
        self.transfer = f"{arrow} {e.what} {e.nbytes / 1e6:.1f} MB {e.rate}"
        return {"round"}

    def _on_HomomorphicEncryptionApplied(self, e: HomomorphicEncryptionApplied) -> set[str]:
        self.he_scheme = e.scheme
        if e.what in ("round update", "global model"):  # the rounds' own, not cross-site's
            if e.direction == "encrypt":
                self.he_encrypt_s = e.seconds
            else:
                self.he_decrypt_s = e.seconds
        return {"round"}

    def _on_MetricsReported(self, e: MetricsReported) -> set[str]:
        if e.scope == "local model":
            self.local_metrics = dict(e.metrics)
            return {"round"}
        return set()

    def _on_ValidationProgress(self, e: ValidationProgress) -> set[str]:
        self.validation_progress = e.summary()
        return {"client", "round"}

    def _on_CrossSiteValidated(self, e: CrossSiteValidated) -> set[str]:
        self.validation[e.model_owner] = dict(e.metrics)
        return {"round"}

    def _on_RoundCompleted(self, e: RoundCompleted) -> set[str]:
        self.num_rounds = e.num_rounds
        self.round_metrics = [m for m in self.round_metrics if m[0] != e.round]
        self.round_metrics.append((e.round, dict(e.metrics)))
        if e.key_metric:
            self.key_metric = e.key_metric
        return {"round"}

    def _on_FederationFinished(self, e: FederationFinished) -> set[str]:
        self.outcome, self.outcome_detail = e.outcome, e.detail
        self.phase = ""
        return {"round", "client"}

    def _on_AdminRequestHandled(self, e: AdminRequestHandled) -> set[str]:
        self.requests.append(e)
        self.requests_total += 1
        return {"requests"}

    def _error(self, text: str) -> None:
        """The last error, with the run it belongs to (a RunChanged start clears both)."""
        self.last_error, self.last_error_run = text, self.run_number

    def _on_StateSnapshot(self, e: StateSnapshot) -> set[str]:
        fresh = SiteState.from_dict(e.state)
        for f in fields(self):
            if f.name not in _CONSOLE_FIELDS:
                setattr(self, f.name, getattr(fresh, f.name))
        return set(PARTS)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (events as ``Event.to_dict()``); ``from_dict`` reverses it."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("requests", "logs"):
                value = [e.to_dict() for e in value]
            elif f.name == "gpu":
                value = value.to_dict() if value is not None else None
            elif f.name == "round_metrics":
                value = [[r, dict(m)] for r, m in value]
            data[f.name] = value
        data["status_message"] = self.status_message
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteState:
        """Rebuilds a state from ``to_dict()`` output.

        Tolerant, as a console must be of a service of another version: unknown keys, unknown
        events and values of the wrong kind are left out (the field keeps its default).
        """
        state = cls()
        defaults = {f.name: getattr(state, f.name) for f in fields(cls)}

        def events(value: Any) -> list[Any]:
            out = []
            for item in value if isinstance(value, list) else []:
                try:
                    out.append(event_from_dict(item))
                except (ValueError, TypeError, AttributeError):
                    continue
            return out

        for key, value in data.items() if isinstance(data, dict) else ():
            if key not in defaults:
                continue
            try:
                if key in ("requests", "logs"):
                    getattr(state, key).extend(events(value))
                elif key == "gpu":
                    state.gpu = event_from_dict(value) if value else None
                elif key == "round_metrics":
                    state.round_metrics = [(int(r), dict(m)) for r, m in value]
                elif key == "local_metrics":
                    state.local_metrics = dict(value)
                elif key == "validation":
                    state.validation = {str(k): dict(v) for k, v in dict(value).items()}
                else:
                    default = defaults[key]
                    kinds = (int, float) if isinstance(default, (int, float)) else type(default)
                    if default is None or value is None or isinstance(value, kinds):
                        setattr(state, key, value)
            except (ValueError, TypeError, AttributeError):
                continue
        return state

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready picture of everything but the logs and requests."""
        return {
            "site": self.site,
            "server": self.server,
            "tls": self.tls,
            "connection": self.connection,
            "session_renewals": self.session_renewals,
            "recovery": self.recovery,
            "status": self.status_message,
            "run_number": self.run_number,
            "mmar": self.mmar,
            "executor": self.executor,
            "worker_pid": self.worker_pid,
            "round": self.round,
            "num_rounds": self.num_rounds,
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "round_metrics": self.round_metrics,
            "key_metric": self.key_metric,
            "validation": self.validation,
            "outcome": self.outcome,
            "last_error": self.last_error,
            "last_error_run": self.last_error_run,
        }
