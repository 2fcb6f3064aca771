"""A validation worker is shown as what it is (issue 18): the Client panel names its pid and its
progress, the run's rounds stay; a wrong deploy path from the console is an audited request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.events import RoundCompleted, RunChanged, ValidationProgress
from engine.site.state import SiteState


def test_a_validation_worker_keeps_the_rounds_and_shows_its_progress() -> None:
    state = SiteState()
    state.apply(
        RunChanged(site="s", running=True, run_number=2, mmar="m", executor="process", pid=7)
    )
    state.apply(RoundCompleted(site="s", round=1, num_rounds=1, metrics={"accuracy": 0.8}))
    state.apply(RunChanged(site="s", running=False, run_number=2, mmar="", executor="process"))
    assert state.worker_pid is None
    state.apply(
        RunChanged(
            site="s",
            running=True,
            run_number=2,
            mmar="m",
            executor="process",
            pid=9,
            mode="validate",
        )
    )
    assert state.worker_pid == 9 and state.phase == "cross-site validation"
    assert state.round_metrics == [(1, {"accuracy": 0.8})]  # the run's rounds stay
    state.apply(
        ValidationProgress(
            site="s",
            received=2,
            expected=3,
            validated=1,
            current="site-2",
            elapsed=4.0,
            timeout=60.0,
        )
    )
    assert "1 of 3 models validated, on site-2's model" in state.validation_progress
    assert (
        "validation of run 2"
        in RunChanged(
            site="s", running=True, run_number=2, mmar="m", executor="p", mode="validate"
        ).summary()
    )


def test_a_wrong_deploy_path_from_the_console_is_audited(tmp_path: Path) -> None:
    from engine.demo import prepare_workspace
    from engine.events import EventBus
    from engine.site.actions import SiteActions
    from engine.site.lock import ActionError
    from engine.site.site_service import SiteService

    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    svc = SiteService(tmp_path / "site-1", EventBus(), executor="thread")
    try:
        actions = SiteActions(tmp_path / "site-1", lambda: svc.interface, lambda: "site-1")
        with pytest.raises(ActionError, match="is not an MMAR"):
            actions.deploy(str(tmp_path / "nowhere"), 2)
        lines = (tmp_path / "site-1" / "logs" / "audit.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        assert last["topic"] == "train.deploy" and last["outcome"] == "error"
        assert "nowhere" in last["detail"]
    finally:
        svc.interface.close()
