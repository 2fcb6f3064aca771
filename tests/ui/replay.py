"""A bridge that replays a recorded engine event stream (for deterministic snapshots).

Not a fake of anything the console talks to: the events are the engine's own event types, as a
real site publishes them, with fixed times; actions are refused (a snapshot takes none).
"""

from __future__ import annotations

from engine.events import (
    AdminRequestHandled,
    ConnectionChanged,
    Event,
    FederationFinished,
    GpuSampled,
    HeartbeatAcknowledged,
    LogRecord,
    ModelTransferred,
    PhaseChanged,
    ProgressUpdated,
    RoundCompleted,
    RoundStarted,
    RunChanged,
    SiteConfigured,
    StatusChanged,
)
from engine.gpu import REASON_NO_DRIVER
from engine.status import ClientStatus
from fltui.bridge import BridgeError, SiteBridge

T0 = 1_795_000_000.0  # a fixed moment: every time on screen is relative to it
SITE = "site-1"


class ReplayBridge(SiteBridge):
    """Hands the console a fixed list of events once."""

    mode = "site"

    def __init__(self, events: list[Event]) -> None:
        self.events = list(events)
        self.site = SITE

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def _refuse(self, *args: object) -> str:
        raise BridgeError("a recorded stream takes no actions")

    deploy = start_training = abort = restart = validate = _refuse  # type: ignore[assignment]


class NoSampler:
    """No GPU sampling at all (the GPU panel has tests of its own)."""

    def start(self, bus: object, site: str) -> None:
        pass

    def stop(self) -> None:
        pass


def clock() -> float:
    return T0 + 60.0


def _log(dt: float, message: str, level: str = "INFO", site: str = SITE) -> LogRecord:
    return LogRecord(site=site, ts=T0 + dt, level=level, logger="engine.client", message=message)


def not_started(gpu: GpuSampled | None = None) -> list[Event]:
    return [
        SiteConfigured(
            site=SITE,
            ts=T0,
            server="fl.example.org:8002",
            tls=True,
            workspace="/srv/fl/site-1",
            executor="process",
        ),
        ConnectionChanged(site=SITE, ts=T0 + 1, state="connecting", server="fl.example.org:8002"),
        ConnectionChanged(
            site=SITE,
            ts=T0 + 2,
            state="registered",
            server="fl.example.org:8002",
            detail="Welcome site-1",
        ),
        _log(2, "site-1 registered with fl.example.org:8002"),
        HeartbeatAcknowledged(site=SITE, ts=T0 + 55, rtt_ms=3.4),
        gpu or GpuSampled(site=SITE, ts=T0 + 3, available=False, reason=REASON_NO_DRIVER),
    ]


def training(gpu: GpuSampled | None = None) -> list[Event]:
    return [
        *not_started(gpu),
        AdminRequestHandled(
            site=SITE,
            ts=T0 + 5,
            origin="admin@example.org",
            topic="train.start",
            outcome="ok",
            detail="Start the client app...",
        ),
        RunChanged(
            site=SITE,
            ts=T0 + 5,
            running=True,
            run_number=3,
            mmar="brain_seg",
            executor="process",
            pid=4242,
        ),
        StatusChanged(
            site=SITE, ts=T0 + 6, status=ClientStatus.TRAINING_STARTED, message="training started"
        ),
        RoundStarted(site=SITE, ts=T0 + 7, round=1, num_rounds=5),
        RoundCompleted(
            site=SITE, ts=T0 + 20, round=1, num_rounds=5, metrics={"accuracy": 0.53, "loss": 1.43}
        ),
        RoundCompleted(
            site=SITE, ts=T0 + 35, round=2, num_rounds=5, metrics={"accuracy": 0.65, "loss": 1.0}
        ),
        RoundStarted(site=SITE, ts=T0 + 36, round=3, num_rounds=5),
        ModelTransferred(
            site=SITE,
            ts=T0 + 36,
            direction="download",
            round=3,
            nbytes=52_000_000,
            seconds=0.09,
            what="global model",
        ),
        PhaseChanged(site=SITE, ts=T0 + 40, phase="training", round=3),
        ProgressUpdated(
            site=SITE, ts=T0 + 50, round=3, step=120, total_steps=313, epoch=1, loss=0.8123
        ),
        _log(36, "site-1: round 2 contribution sent (n_iter=313)"),
        _log(37, "GetModel to fl.example.org:8002 failed (UNAVAILABLE); retrying", "WARNING"),
    ]


def aborted(gpu: GpuSampled | None = None) -> list[Event]:
    return [
        *training(gpu),
        AdminRequestHandled(
            site=SITE,
            ts=T0 + 52,
            origin="local",
            topic="train.abort",
            outcome="ok",
            detail="training aborted",
        ),
        StatusChanged(
            site=SITE,
            ts=T0 + 53,
            status=ClientStatus.TRAINING_STOPPED,
            message="training stopped",
            detail="aborted",
        ),
        RunChanged(
            site=SITE,
            ts=T0 + 53,
            running=False,
            run_number=3,
            mmar="",
            executor="process",
            detail="aborted",
        ),
        FederationFinished(
            site=SITE,
            ts=T0 + 53,
            outcome="aborted",
            rounds=2,
            metrics={"accuracy": 0.65},
            detail="stopped by request",
        ),
        _log(53, "site-1: training aborted: worker stopped after the abort command"),
    ]
