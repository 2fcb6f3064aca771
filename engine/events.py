"""Engine events (frozen dataclasses) and the thread-safe EventBus that the UI and printer read."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AdminRequestHandled",
    "ConnectionChanged",
    "ContributionRefused",
    "ContributionResent",
    "CrossSiteValidated",
    "Event",
    "EventBus",
    "EventLogHandler",
    "FederationFinished",
    "GpuSampled",
    "HeartbeatAcknowledged",
    "HomomorphicEncryptionApplied",
    "LogRecord",
    "MetricsReported",
    "ModelTransferred",
    "PhaseChanged",
    "PrivacyApplied",
    "ProgressUpdated",
    "RoundCompleted",
    "RoundStarted",
    "RunChanged",
    "ServerResumed",
    "ServerRoundAggregated",
    "ServerRoundRetaken",
    "ServiceLink",
    "SessionRenewed",
    "SiteConfigured",
    "SiteJoined",
    "SiteLeft",
    "SitePulse",
    "StatusChanged",
    "ValidationProgress",
    "event_from_dict",
]

_REGISTRY: dict[str, type[Event]] = {}


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every engine event.

    Attributes:
        site: whom the event is about: a site name, or "server".
        ts: wall-clock time (seconds since the epoch) when it happened.
    """

    site: str = ""
    ts: float = field(default_factory=time.time)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def summary(self) -> str:
        """One human line about the event, without time and site."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in self._own_fields())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with an ``event`` field naming the event."""
        return {"event": type(self).__name__, **dataclasses.asdict(self)}

    @classmethod
    def _own_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.name not in ("site", "ts")]


@dataclass(frozen=True, kw_only=True)
class StatusChanged(Event):
    """The client's ClientStatus changed."""

    status: int
    message: str
    detail: str = ""

    def summary(self) -> str:
        return f"status: {self.message}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, kw_only=True)
class ConnectionChanged(Event):
    """The link to the server: connecting, registered, retrying, disconnected, failed."""

    state: str
    server: str
    detail: str = ""

    def summary(self) -> str:
        return f"connection {self.state}: {self.server}" + (
            f" ({self.detail})" if self.detail else ""
        )


@dataclass(frozen=True, kw_only=True)
class RoundStarted(Event):
    """This site received the global model of a round and begins to work on it."""

    round: int
    num_rounds: int

    def summary(self) -> str:
        return f"round {self.round}/{self.num_rounds} started"


@dataclass(frozen=True, kw_only=True)
class PhaseChanged(Event):
    """The phase within a round (pulling model, training, privacy, submitting, waiting...)."""

    phase: str
    round: int = 0

    def summary(self) -> str:
        return f"phase: {self.phase}" + (f" (round {self.round})" if self.round else "")


@dataclass(frozen=True, kw_only=True)
class ProgressUpdated(Event):
    """Local training progress (coalesced)."""

    round: int
    step: int
    total_steps: int
    epoch: int
    loss: float

    def summary(self) -> str:
        return (
            f"round {self.round} training step {self.step}/{self.total_steps} "
            f"epoch {self.epoch} loss={self.loss:.4f}"
        )


@dataclass(frozen=True, kw_only=True)
class MetricsReported(Event):
    """Metrics of a training epoch (scope "train") or of the local model ("local model")."""

    round: int
    scope: str
    metrics: dict[str, float]
    epoch: int = 0

    def summary(self) -> str:
        where = f"epoch {self.epoch}" if self.scope == "train" else self.scope
        return f"round {self.round} {where} metrics: {_fmt_metrics(self.metrics)}"


@dataclass(frozen=True, kw_only=True)
class ModelTransferred(Event):
    """A model went over the wire (download or upload)."""

    direction: str
    round: int
    nbytes: int
    seconds: float  # 0.0: not measured (a model that went in one message)
    what: str = "model"

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def rate(self) -> str:
        """The rate in words: "at 420 MB/s", or "in one message" when too small to time."""
        return f"at {self.mb_per_s:.0f} MB/s" if self.seconds > 0 else "in one message"

    def summary(self) -> str:
        took = (
            f"in {self.seconds:.2f} s ({self.mb_per_s:.0f} MB/s)"
            if self.seconds > 0
            else "in one message (too small to time)"
        )
        return f"{self.what} {self.direction}ed: {self.nbytes / 1e6:.2f} MB {took}" + (
            f", round {self.round}" if self.round else ""
        )


@dataclass(frozen=True, kw_only=True)
class PrivacyApplied(Event):
    """A privacy protocol ran on this round's Δ before it was shared."""

    round: int
    protocol: str
    shared_values: int
    total_values: int
    seconds: float

    def summary(self) -> str:
        return (
            f"round {self.round} privacy {self.protocol}: shared {self.shared_values} of "
            f"{self.total_values} values in {self.seconds * 1000:.1f} ms"
        )


@dataclass(frozen=True, kw_only=True)
class HomomorphicEncryptionApplied(Event):
    """This site encrypted a model it sends, or decrypted one it received (CKKS).

    ``direction`` is "encrypt" or "decrypt"; ``what`` names the model ("round update",
    "global model", "best local model", "site-2's best model"); the sizes are of the
    variables encrypted (``plain_bytes``: their plaintext, ``cipher_bytes``: the ciphertexts).
    """

    round: int
    direction: str
    what: str
    scheme: str = "CKKS"
    variables: int = 0
    plain_bytes: int = 0
    cipher_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mb = 1 << 20
        sizes = (
            f"{self.plain_bytes / mb:.1f} MB -> {self.cipher_bytes / mb:.1f} MB"
            if self.direction == "encrypt"
            else f"{self.cipher_bytes / mb:.1f} MB -> {self.plain_bytes / mb:.1f} MB"
        )
        verb = "encrypted" if self.direction == "encrypt" else "decrypted"
        return (
            f"round {self.round} {self.what} {verb} ({self.scheme}): {self.variables} "
            f"variable{'s' if self.variables != 1 else ''}, {sizes} in {self.seconds:.2f} s"
        )


@dataclass(frozen=True, kw_only=True)
class RoundCompleted(Event):
    """A round ended: ``metrics`` are the new global model's, as this site measured them.

    ``key_metric`` names the one the MMAR's config chose (``val_mean_dice``, ``accuracy``):
    the console plots it, and the site's best local model is chosen by it.
    """

    round: int
    num_rounds: int
    metrics: dict[str, float]
    key_metric: str = ""

    def summary(self) -> str:
        return (
            f"round {self.round}/{self.num_rounds} completed: global {_fmt_metrics(self.metrics)}"
        )


@dataclass(frozen=True, kw_only=True)
class CrossSiteValidated(Event):
    """This site validated another site's (or the server's) model on its own data."""

    model_owner: str
    metrics: dict[str, float]

    def summary(self) -> str:
        return f"cross-site validation of {self.model_owner}'s model: {_fmt_metrics(self.metrics)}"


@dataclass(frozen=True, kw_only=True)
class ValidationProgress(Event):
    """How far this site's cross-site validation is (``expected`` 0: not known yet).

    ``outcome``: "running", "done" or "timed out" (``missing`` then says what never came).
    """

    received: int
    expected: int
    validated: int
    current: str = ""
    elapsed: float = 0.0
    timeout: float = 0.0
    outcome: str = "running"

    def summary(self) -> str:
        of = f"{self.expected}" if self.expected else f"{self.received}+"
        now = f", on {self.current}'s model" if self.current else ""
        head = {"running": "cross-site validation", "done": "cross-site validation done"}.get(
            self.outcome, f"cross-site validation {self.outcome}"
        )
        return (
            f"{head}: {self.validated} of {of} models validated{now} · "
            f"{self.elapsed:.0f} s of {self.timeout:g} s"
        )


@dataclass(frozen=True, kw_only=True)
class FederationFinished(Event):
    """The federation ended for this site: completed, aborted or failed."""

    outcome: str
    rounds: int
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def summary(self) -> str:
        text = f"federation {self.outcome} after {self.rounds} rounds"
        if self.metrics:
            text += f": final global {_fmt_metrics(self.metrics)}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, kw_only=True)
class AdminRequestHandled(Event):
    """An admin request (from the federation or a local key) and its outcome."""

    origin: str
    topic: str
    outcome: str
    detail: str = ""

    def summary(self) -> str:
        return f"admin {self.topic} from {self.origin}: {self.outcome}" + (
            f" ({self.detail})" if self.detail else ""
        )


def _gib(nbytes: Any) -> str:
    return f"{nbytes / 2**30:.1f}" if isinstance(nbytes, (int, float)) else "N/A"


def _fmt_gpu(gpu: dict[str, Any]) -> str:
    def num(key: str, unit: str, fmt: str = ".0f") -> str:
        value = gpu.get(key)
        return f"{value:{fmt}}{unit}" if isinstance(value, (int, float)) else "N/A"

    name = str(gpu.get("name", "?")).removeprefix("NVIDIA ")
    return (
        f"{gpu.get('index', '?')} {name} {num('utilization', '%')} "
        f"{_gib(gpu.get('memory_used'))}/{_gib(gpu.get('memory_total'))} GiB "
        f"{num('temperature', '°C')} {num('power', ' W')}"
    )


@dataclass(frozen=True, kw_only=True)
class GpuSampled(Event):
    """One NVML sample of every GPU, or why there is none.

    Attributes:
        available: whether GPUs could be read.
        reason: why ``gpus`` is empty (no NVML library, no driver, no GPU, an NVML error).
        gpus: one ``engine.gpu.GpuInfo.to_dict()`` per GPU (None values mean N/A).
        simulated: the values are SIMULATED (``--simulate-gpus``), not read from hardware.
    """

    available: bool
    reason: str = ""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    simulated: bool = False

    def summary(self) -> str:
        label = "SIMULATED " if self.simulated else ""
        if not self.gpus:
            return f"{label}no GPU: {self.reason or 'unknown reason'}"
        count = len(self.gpus)
        gpus = "; ".join(_fmt_gpu(g) for g in self.gpus)
        return f"{label}{count} GPU{'s' if count != 1 else ''}: {gpus}"


@dataclass(frozen=True, kw_only=True)
class SiteConfigured(Event):
    """A site engine came up: which server it talks to, and how."""

    server: str
    tls: bool
    workspace: str
    executor: str = "process"
    heartbeat_interval: float = 0.0  # seconds between heartbeats to the server (0: unknown)

    def summary(self) -> str:
        return (
            f"site engine up: server {self.server}, TLS {'on' if self.tls else 'off'}, "
            f"{self.executor} executor, workspace {self.workspace}"
        )


@dataclass(frozen=True, kw_only=True)
class HeartbeatAcknowledged(Event):
    """The server answered a heartbeat; ``rtt_ms`` is the round trip."""

    rtt_ms: float

    def summary(self) -> str:
        return f"heartbeat ok ({self.rtt_ms:.1f} ms)"


@dataclass(frozen=True, kw_only=True)
class SitePulse(Event):
    """The site service is alive (sent to its consoles every ``engine.site.state.PULSE_S``).

    Only the control socket carries it (never the event log): it is what lets a console tell a
    quiet service from a dead or hung one, and a live worker from a gone one.

    Attributes:
        worker_pid: the worker the service runs now (None: none).
        worker_alive: that worker's process was alive at ``ts``.
        worker_seen: when the worker last sent anything (None: not known, e.g. in-process).
    """

    worker_pid: int | None = None
    worker_alive: bool = False
    worker_seen: float | None = None

    def summary(self) -> str:
        worker = f"worker pid {self.worker_pid}" if self.worker_pid else "no worker"
        return f"service alive · {worker}" + (" alive" if self.worker_alive else "")


@dataclass(frozen=True, kw_only=True)
class ServiceLink(Event):
    """The console's link to the site's engine, at ``ts`` (the console's own, never sent).

    Attributes:
        remote: the engine is a service reached over its socket (False: in this console).
        connected: the socket is open.
        seen: when the console last heard from the service (None: never yet).
    """

    remote: bool = True
    connected: bool = False
    seen: float | None = None

    def summary(self) -> str:
        return "service " + ("connected" if self.connected else "not connected")


@dataclass(frozen=True, kw_only=True)
class RunChanged(Event):
    """A training run started or ended on this site (run number, MMAR, executor, worker)."""

    running: bool
    run_number: int
    mmar: str
    executor: str
    pid: int | None = None
    detail: str = ""
    mode: str = "train"  # or "validate": a cross-site validation worker of that run

    def summary(self) -> str:
        if self.running:
            pid = f", worker pid {self.pid}" if self.pid else ""
            what = "cross-site validation of run" if self.mode == "validate" else "run"
            return (
                f"{what} {self.run_number} ({self.mmar}) started on the {self.executor} "
                f"executor{pid}"
            )
        return f"run {self.run_number} ended" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True, kw_only=True)
class LogRecord(Event):
    """A log line of the engine."""

    level: str
    logger: str
    message: str

    def summary(self) -> str:
        return f"{self.level} {self.logger}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class StateSnapshot(Event):
    """The whole state of a site at one moment (what a console gets when it attaches).

    ``state`` is ``engine.site.state.SiteState.to_dict()``.
    """

    state: dict[str, Any]

    def summary(self) -> str:
        return f"state of {self.site}: {self.state.get('status_message', '?')}"


@dataclass(frozen=True, kw_only=True)
class SiteJoined(Event):
    """Server side: a site registered (again)."""

    site_name: str
    num_sites: int

    def summary(self) -> str:
        return f"site {self.site_name} joined ({self.num_sites} registered)"


@dataclass(frozen=True, kw_only=True)
class SiteLeft(Event):
    """Server side: a site quit or was dropped (no heartbeat within the timeout)."""

    site_name: str
    reason: str

    def summary(self) -> str:
        return f"site {self.site_name} left: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class ServerRoundAggregated(Event):
    """Server side: a round's contributions were averaged into a new global model."""

    round: int
    num_rounds: int
    contributors: list[str]
    missing: list[str]
    seconds: float

    def summary(self) -> str:
        text = (
            f"round {self.round}/{self.num_rounds} aggregated from {', '.join(self.contributors)}"
        )
        if self.missing:
            text += f" (missing: {', '.join(self.missing)})"
        return text + f" in {self.seconds * 1000:.0f} ms"


@dataclass(frozen=True, kw_only=True)
class ContributionRefused(Event):
    """Server side: a site's contribution was refused and is not counted for the round.

    Attributes:
        site_name: the site that sent it.
        round: the round it was for (1-based).
        reason: what was wrong: the variable and NaN / Inf, an overflow, an ``n_iter`` out of
            bounds (the same text the site gets as the call's error).
    """

    site_name: str
    round: int
    reason: str

    def summary(self) -> str:
        return f"contribution of {self.site_name} to round {self.round} refused: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class ServerRoundRetaken(Event):
    """Server side: a round's average came out NaN or Inf, so it was neither saved nor sent; the
    round is taken again without the contributions that caused it (the other sites send theirs
    again, same ids). When no contribution stood out, ``excluded`` is empty and those variables
    keep the previous round's values.

    Attributes:
        round: the round (1-based).
        variables: the variables whose average was not finite.
        excluded: the sites whose contributions are left out of the round.
        detail: what happened, in words.
    """

    round: int
    variables: list[str]
    excluded: list[str]
    detail: str = ""

    def summary(self) -> str:
        names = ", ".join(self.variables)
        if self.excluded:
            text = (
                f"round {self.round} taken again without {', '.join(self.excluded)}: its average "
                f"of {names} was not finite"
            )
        else:  # no contribution stood out: the round closed, those variables kept their values
            text = f"round {self.round}: the average of {names} was not finite and was not used"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, kw_only=True)
class ServerResumed(Event):
    """Server side: the server started again from its saved state (after a crash or a stop).

    Attributes:
        round: the round it resumes at (1-based: the round being trained next).
        num_rounds: the federation's rounds.
        sites: the sites registered before; each must register again (new token).
        detail: what was restored, or what was given up (a round saved only in part).
    """

    round: int
    num_rounds: int
    sites: list[str] = field(default_factory=list)
    detail: str = ""

    def summary(self) -> str:
        text = f"server resumed from its saved state at round {self.round}/{self.num_rounds}"
        if self.sites:
            text += f"; waiting for {', '.join(self.sites)} to register again"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, kw_only=True)
class SessionRenewed(Event):
    """The server no longer knew this site's session (it restarted, or dropped the site), so the
    site registered again and got a new token; nothing of the round is lost."""

    server: str
    reason: str

    def summary(self) -> str:
        return f"session lost ({self.reason}); registered again with {self.server}, new token"


@dataclass(frozen=True, kw_only=True)
class ContributionResent(Event):
    """A contribution the server had received but lost (it restarted before aggregating the
    round) was sent again, same id and same bytes, instead of training the round again."""

    round: int
    contribution_id: str

    def summary(self) -> str:
        return (
            f"round {self.round} contribution sent again (the server restarted before "
            f"aggregating it; id {self.contribution_id})"
        )


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuilds an event from ``Event.to_dict()`` output (for example a child's JSON line).

    Raises:
        ValueError: the dict names no known event or has wrong fields.
    """
    name = data.get("event")
    cls = _REGISTRY.get(str(name))
    if cls is None:
        raise ValueError(f"unknown event {name!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"bad fields for event {name}: {exc}") from exc


Subscriber = Callable[[Event], None]


class EventBus:
    """Publishes events to subscribers, synchronously, from any thread.

    A subscriber that raises is logged and keeps its subscription; publishing never fails.
    """

    _log: ClassVar[logging.Logger] = logging.getLogger("engine.events")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Adds a subscriber; returns a function that removes it."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Delivers ``event`` to every subscriber, in subscription order."""
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event)
            except Exception:  # a broken subscriber must not stop the engine
                if not isinstance(event, LogRecord):
                    self._log.exception("event subscriber %r failed", fn)


class EventLogHandler(logging.Handler):
    """A logging handler that publishes records as ``LogRecord`` events."""

    def __init__(self, bus: EventBus, site: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._bus = bus
        self._site = site

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._bus.publish(
                LogRecord(
                    site=self._site,
                    ts=record.created,
                    level=record.levelname,
                    logger=record.name,
                    message=record.getMessage(),
                )
            )
        except Exception:
            self.handleError(record)
