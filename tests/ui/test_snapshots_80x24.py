"""SVG snapshots at 80x24 (issue 18): a refused request with its outcome on screen, and a failed
run whose long error is summarised in one line.

Regenerate after a deliberate change: ``pytest tests/ui/test_snapshots_80x24.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.events import (
    AdminRequestHandled,
    Event,
    FederationFinished,
    RunChanged,
    StatusChanged,
)
from engine.status import ClientStatus
from fltui.app import create_app
from tests.ui import replay

WHY = 'refused by site policy (startup/site_policy.json): "deploy" is not in allowed_commands'
TRACE = "\n".join(
    ["Traceback (most recent call last):"]
    + [
        f'  File "/srv/fl/site-1/run_3/mmar_site-1/custom/train.py", line {n}, in step'
        for n in range(12)
    ]
    + ["ConfigError: servers[0].name 'fed-b' is not this kit's federation 'fed-a'"]
)


def refused() -> list[Event]:
    return [
        *replay.training(),
        AdminRequestHandled(
            site=replay.SITE,
            ts=replay.T0 + 54,
            origin="admin@hospital.example.org",
            topic="train.deploy",
            outcome="refused",
            detail=WHY,
        ),
    ]


def failed_run() -> list[Event]:
    return [
        *replay.training(),
        StatusChanged(
            site=replay.SITE,
            ts=replay.T0 + 53,
            status=ClientStatus.TRAINING_EXCEPTION,
            message="training exception",
            detail=TRACE,
        ),
        RunChanged(
            site=replay.SITE,
            ts=replay.T0 + 53,
            running=False,
            run_number=3,
            mmar="brain_seg",
            executor="process",
            detail="failed",
        ),
        FederationFinished(
            site=replay.SITE, ts=replay.T0 + 53, outcome="failed", rounds=2, detail=TRACE
        ),
    ]


STATES = {"refused_request": refused, "failed_run": failed_run}


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


def test_e_opens_the_whole_error_of_a_failed_run(tmp_path: Path) -> None:
    """The Client panel shows the error's one summary line; ``e`` opens all 14 lines."""
    import asyncio

    from fltui.screens.detail import DetailScreen
    from fltui.widgets.client_panel import ClientPanel

    app = create_app(
        tmp_path,
        gpu_sampler=replay.NoSampler(),
        bridge=replay.ReplayBridge(failed_run()),
        clock=replay.clock,
    )

    async def go() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            shown = str(app.screen.query_one(ClientPanel).query_one("#error").render())
            assert "is not this kit's federation" in shown and "e: whole" in shown
            assert "Traceback" not in shown
            await pilot.press("e")
            await pilot.pause(0.2)
            assert isinstance(app.screen, DetailScreen)
            assert "line 11, in step" in str(app.screen.query_one("#text").render())

    asyncio.run(go())
