"""Cross-site validation reports progress: the site's event, the server's count, ctl's line."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from engine.events import ValidationProgress, event_from_dict
from engine.server.admin_console import format_validation_progress
from engine.server.cross_site import SERVER_OWNER, CrossSiteStore
from fltui.ctl import _status_lines


def test_the_event_says_how_far_and_survives_the_wire() -> None:
    running = ValidationProgress(
        site="site-1",
        received=3,
        expected=3,
        validated=1,
        current="site-2",
        elapsed=12.4,
        timeout=600,
    )
    assert running.summary() == (
        "cross-site validation: 1 of 3 models validated, on site-2's model · 12 s of 600 s"
    )
    assert event_from_dict(running.to_dict()) == running
    unknown = ValidationProgress(site="site-1", received=2, expected=0, validated=2, timeout=60)
    assert "2 of 2+ models" in unknown.summary()
    late = ValidationProgress(
        site="site-1",
        received=1,
        expected=0,
        validated=1,
        elapsed=61,
        timeout=60,
        outcome="timed out",
    )
    assert late.summary().startswith("cross-site validation timed out: 1 of 1+")


def test_the_server_counts_models_received_expected_and_validated(tmp_path: Path) -> None:
    store = CrossSiteStore(tmp_path, threading.Condition())
    model = {"w": np.ones(2, np.float32)}
    store.put_best("site-1", model)
    store.put_best("site-2", model)
    delivered, owners, _, _ = store.due("site-1", True, model, ["site-1", "site-2"])
    store.delivered(delivered, owners)
    assert owners == ["site-1", "site-2", SERVER_OWNER]
    store.add_results("site-1", {"site-1": {"acc": 0.9}})
    progress = store.progress(["site-1", "site-2"], finished=True)
    assert progress["site-1"] == {
        "received": 3,
        "expected": 3,
        "validated": 1,
        "current": "server",
    }
    assert progress["site-2"]["received"] == 0 and progress["site-2"]["expected"] == 3
    line = format_validation_progress(
        {"outcome": "running", "elapsed": 5, "timeout": 600, "sites": progress}
    )
    assert line == (
        "validation: site-1 1/3 validated, 3 received, on server's; "
        "site-2 0/3 validated, 0 received · 5 s of 600 s"
    )
    store.reset(["site-1"])  # the admin's next validate: counted afresh
    assert store.progress(["site-1"], finished=True)["site-1"]["validated"] == 0


def test_ctl_status_says_validation_not_round_0_of_0() -> None:
    status = {
        "site": "site-1",
        "status": "cross site validation",
        "phase": "cross-site validation",
        "round": 0,
        "num_rounds": 0,
        "validation": {"site-2": {"acc": 0.8}},
    }
    text = "\n".join(_status_lines(status))
    assert "round 0/0" not in text
    assert "cross-site validation, 1 model validated (site-2)" in text
    idle = "\n".join(_status_lines({"site": "site-1", "round": 0, "num_rounds": 0}))
    assert "round 0/0" not in idle and "no round yet" in idle
