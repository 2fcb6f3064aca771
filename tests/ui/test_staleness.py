"""Every value has an age: the staleness of the service, the server and the worker, on a fake
clock (SiteState alone, then the panels that show it)."""

from __future__ import annotations

from engine.events import (
    ConnectionChanged,
    HeartbeatAcknowledged,
    RunChanged,
    ServiceLink,
    SiteConfigured,
    SitePulse,
    StateSnapshot,
    StatusChanged,
)
from engine.site.state import LOST_AFTER, PULSE_S, STALE_AFTER, SiteState, freshness
from engine.status import ClientStatus

SITE = "site-1"
T0 = 1_700_000_000.0


def _attached(now: float = T0) -> SiteState:
    state = SiteState(site=SITE)
    state.apply(
        SiteConfigured(
            site=SITE, ts=now, server="s:1", tls=False, workspace="/w", heartbeat_interval=5.0
        )
    )
    state.apply(ConnectionChanged(site=SITE, ts=now, state="registered", server="s:1"))
    state.apply(
        RunChanged(
            site=SITE, ts=now, running=True, run_number=3, mmar="m", executor="process", pid=4242
        )
    )
    state.apply(
        StatusChanged(
            site=SITE, ts=now, status=ClientStatus.TRAINING_STARTED, message="training started"
        )
    )
    state.apply(SitePulse(site=SITE, ts=now, worker_pid=4242, worker_alive=True))
    state.apply(ServiceLink(site=SITE, ts=now, remote=True, connected=True, seen=now))
    return state


def test_freshness_bands() -> None:
    assert freshness(None, 5) == "fresh"
    assert freshness(100, 0) == "fresh"
    assert freshness(STALE_AFTER * 5, 5) == "fresh"
    assert freshness(STALE_AFTER * 5 + 0.01, 5) == "stale"
    assert freshness(LOST_AFTER * 5 + 0.01, 5) == "lost"
    # The promise: a source that stops is shown stale within 2 of its intervals.
    assert STALE_AFTER < 2


def test_a_quiet_service_goes_stale_then_lost_and_comes_back() -> None:
    state = _attached()
    assert state.service_freshness(T0 + 1)[0] == "fresh"
    assert state.service_freshness(T0 + STALE_AFTER * PULSE_S + 0.5)[0] == "stale"
    level, age = state.service_freshness(T0 + LOST_AFTER * PULSE_S + 0.5)
    assert (level, round(age or 0, 1)) == ("lost", LOST_AFTER * PULSE_S + 0.5)
    # It speaks again: fresh.
    later = T0 + 60
    state.apply(SitePulse(site=SITE, ts=later, worker_pid=4242, worker_alive=True))
    state.apply(ServiceLink(site=SITE, ts=later, remote=True, connected=True, seen=later))
    assert state.service_freshness(later + 1)[0] == "fresh"


def test_a_dropped_connection_is_stale_at_once_then_lost() -> None:
    state = _attached()
    parts = state.apply(ServiceLink(site=SITE, ts=T0 + 0.2, remote=True, connected=False, seen=T0))
    assert {"header", "client", "round"} <= parts
    assert state.service_freshness(T0 + 0.2)[0] == "stale"
    assert state.service_freshness(T0 + LOST_AFTER * PULSE_S + 1)[0] == "lost"
    # The worker cannot be vouched for either.
    assert state.worker_freshness(T0 + LOST_AFTER * PULSE_S + 1)[0] == "lost"


def test_the_engine_in_the_console_is_always_fresh() -> None:
    state = SiteState(site=SITE)
    state.apply(ServiceLink(site=SITE, ts=T0, remote=False, connected=True))
    assert state.service_freshness(T0 + 3600) == ("fresh", None)


def test_the_server_by_its_last_answered_heartbeat() -> None:
    state = _attached()
    state.apply(HeartbeatAcknowledged(site=SITE, ts=T0 + 5, rtt_ms=1.0))
    assert state.server_freshness(T0 + 10)[0] == "fresh"
    assert state.server_freshness(T0 + 5 + 2 * 5)[0] == "stale"  # within 2 intervals
    assert state.server_freshness(T0 + 5 + LOST_AFTER * 5 + 1)[0] == "lost"
    state.apply(HeartbeatAcknowledged(site=SITE, ts=T0 + 40, rtt_ms=1.0))
    assert state.server_freshness(T0 + 41)[0] == "fresh"


def test_a_gone_worker_is_said_so_by_the_pulse() -> None:
    state = _attached()
    state.apply(SitePulse(site=SITE, ts=T0 + 2, worker_pid=4242, worker_alive=False))
    assert state.worker_freshness(T0 + 3)[0] == "gone"


def test_last_error_carries_its_run_and_a_new_run_clears_it() -> None:
    state = _attached()
    state.apply(
        StatusChanged(
            site=SITE,
            ts=T0 + 1,
            status=ClientStatus.TRAINING_EXCEPTION,
            message="training exception",
            detail="gave up after 12 attempts",
        )
    )
    assert (state.last_error, state.last_error_run) == ("gave up after 12 attempts", 3)
    state.apply(
        RunChanged(
            site=SITE, ts=T0 + 2, running=True, run_number=4, mmar="m", executor="process", pid=4343
        )
    )
    assert (state.last_error, state.last_error_run) == ("", None)


def test_a_snapshot_keeps_the_consoles_own_link() -> None:
    state = _attached()
    service_state = SiteState(site=SITE).to_dict()  # the service knows nothing of the link
    state.apply(StateSnapshot(site=SITE, ts=T0 + 1, state=service_state))
    assert state.service_remote and state.service_seen == T0
