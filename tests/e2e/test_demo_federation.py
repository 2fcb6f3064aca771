"""The demo federation in-process: a peer that dies stops the demo instead of hanging it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.demo import DemoFederation, prepare_workspace
from engine.events import EventBus, FederationFinished, LogRecord
from engine.site.paths import SitePaths
from tests.conftest import Recorder


@pytest.mark.slow
def test_a_peer_that_dies_stops_the_demo_with_its_reason(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=2, num_rounds=2)
    broken = SitePaths(tmp_path / "site-2").mmar(1, "site-2") / "config" / "config_fed_client.json"
    broken.write_text("{not json")
    bus = EventBus()
    rec = Recorder(bus)
    result = DemoFederation(tmp_path, bus, num_sites=2, num_rounds=2).run(timeout=60)
    assert not result.ok
    assert result.outcomes["site-2"] == "failed (exit code 2)"
    assert result.outcomes["site-1"] == "aborted"
    errors = [e.message for e in rec.of(LogRecord) if e.level == "ERROR"]
    assert any("site-2 exited with code 2" in m and "not valid JSON" in m for m in errors), errors
    assert [e.outcome for e in rec.of(FederationFinished) if e.site == "site-1"] == ["aborted"]
