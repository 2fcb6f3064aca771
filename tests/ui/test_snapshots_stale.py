"""SVG snapshots at 80×24 of what a console must never show as healthy: a stale service, a lost
one, and a failed run (its last error with the run it belongs to).

Regenerate after a deliberate change: ``pytest tests/ui/test_snapshots_stale.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.events import (
    Event,
    FederationFinished,
    RunChanged,
    ServiceLink,
    SitePulse,
    StatusChanged,
)
from engine.status import ClientStatus
from fltui.app import create_app
from tests.ui import replay

NOW = replay.clock()


def _service(seen_ago: float, connected: bool) -> list[Event]:
    """A training site whose service was last heard ``seen_ago`` s before the clock's now."""
    seen = NOW - seen_ago
    return [
        *replay.training(),
        SitePulse(site=replay.SITE, ts=seen, worker_pid=4242, worker_alive=True),
        ServiceLink(site=replay.SITE, ts=NOW, remote=True, connected=connected, seen=seen),
    ]


def _failed_run() -> list[Event]:
    reason = (
        "gave up after 12 attempts over 60 s: GetModel to fl.example.org:8002: Connection "
        "refused (worker pid 4242 exited with code 1)"
    )
    return [
        *replay.training(),
        StatusChanged(
            site=replay.SITE,
            ts=NOW - 3,
            status=ClientStatus.TRAINING_EXCEPTION,
            message="training exception",
            detail=reason,
        ),
        RunChanged(
            site=replay.SITE,
            ts=NOW - 3,
            running=False,
            run_number=3,
            mmar="",
            executor="process",
            detail="worker exited with code 1",
        ),
        FederationFinished(site=replay.SITE, ts=NOW - 3, outcome="failed", rounds=2, detail=reason),
    ]


STATES = {
    "service_stale": lambda: _service(3, connected=False),
    "service_lost": lambda: _service(40, connected=False),
    "failed_run": _failed_run,
}


@pytest.mark.parametrize("state", list(STATES))
def test_dashboard_80x24(snap_compare, tmp_path: Path, state: str) -> None:
    app = create_app(
        tmp_path,
        gpu_sampler=replay.NoSampler(),
        bridge=replay.ReplayBridge(STATES[state]()),
        clock=replay.clock,
    )

    async def settle(pilot) -> None:
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)
