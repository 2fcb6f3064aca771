"""The demo federation end to end with secure on: certificates, mutual TLS, no token in logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.client.fed_client_base import SESSION_FILE
from engine.demo import DemoFederation
from engine.events import EventBus, FederationFinished, SiteConfigured
from engine.server import fed_server
from engine.site.paths import TOKEN_FILE
from tests.conftest import Recorder


@pytest.mark.slow
def test_the_demo_runs_end_to_end_with_secure_on_and_no_token_reaches_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens: list[str] = []
    register = fed_server.FederatedServer._register

    def recording(self, request, context):  # the tokens the server hands out, to look for them
        reply = register(self, request, context)
        tokens.append(reply.token)
        return reply

    monkeypatch.setattr(fed_server.FederatedServer, "_register", recording)
    bus = EventBus()
    rec = Recorder(bus)
    lines: list[str] = []
    bus.subscribe(lambda e: lines.append(json.dumps(e.to_dict(), default=str)))
    result = DemoFederation(tmp_path, bus, num_sites=2, num_rounds=2, secure=True).run(timeout=240)
    assert result.ok, result
    assert [h["contributors"] for h in result.history] == [["site-1", "site-2"]] * 2
    configured = {e.site: e.tls for e in rec.of(SiteConfigured)}
    assert configured == {"site-1": True, "site-2": True}
    assert {e.site: e.outcome for e in rec.of(FederationFinished)} == {
        "site-1": "completed",
        "site-2": "completed",
    }
    server_config = json.loads((tmp_path / "server" / "config_fed_server.json").read_text())
    assert server_config["servers"][0]["secure_train"] is True
    assert server_config["servers"][0]["fl_clients"] == ["site-1", "site-2"]
    for name in ("site-1", "site-2", "admin"):
        kit = tmp_path / name / "startup"
        assert (kit / "client.key").stat().st_mode & 0o077 == 0
    # Each site registered (its service; workers reuse the session) and no token was logged.
    assert len(tokens) >= 2 and all(tokens)
    texts = {"events on the bus": "\n".join(lines)}
    for path in tmp_path.rglob("*"):
        if path.name in (TOKEN_FILE, SESSION_FILE):
            # The service's hand-over to its worker (as in the lineage), and the session the two
            # share after a renewal: owner-only files, not logs.
            assert path.stat().st_mode & 0o077 == 0
            continue
        if path.is_file() and path.suffix in (".log", ".jsonl", ".json", ".txt"):
            texts[str(path)] = path.read_text(errors="replace")
    assert any("registered" in t for t in texts.values())
    for where, text in texts.items():
        for token in tokens:
            assert token not in text, f"a session token appears in {where}"
