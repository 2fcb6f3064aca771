"""What the operator sees: refused kits in words, exit codes, and no retries."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.events import EventBus
from engine.server import FederatedServer
from engine.site.site_service import SiteService
from engine.site.state import SiteState
from engine.tls import EXIT_REFUSED
from fltui.admin import run_admin
from fltui.headless import HeadlessPrinter
from tests.security.conftest import TASK, Kit, model, server_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _site_workspace(root: Path, name: str, kit: Kit | None, port: int) -> Path:
    """A site workspace whose startup/ holds copies of ``kit``'s files (0600 key)."""
    startup = root / "startup"
    startup.mkdir(parents=True)
    client: dict = {"client_name": name, "retry_timeout": 30, "heartbeat_interval": 60}
    if kit is not None:
        for src, dst in (
            (kit.root_cert, "rootCA.pem"),
            (kit.cert, "client.crt"),
            (kit.key, "client.key"),
        ):
            shutil.copy(src, startup / dst)
        os.chmod(startup / "client.key", 0o600)
        client.update(
            ssl_root_cert="rootCA.pem", ssl_cert="client.crt", ssl_private_key="client.key"
        )
    else:
        client["secure_train"] = False
    (startup / "fed_client.json").write_text(
        json.dumps(
            {
                "servers": [{"name": TASK, "service": {"target": f"127.0.0.1:{port}"}}],
                "client": client,
            }
        )
    )
    return root


def _admin_kit(root: Path, kit: Kit | None, port: int, name: str = "admin@test") -> Path:
    admin: dict = {"name": name, "target": f"127.0.0.1:{port}"}
    if kit is not None:
        admin.update(
            ssl_root_cert=str(kit.root_cert), ssl_cert=str(kit.cert), ssl_private_key=str(kit.key)
        )
    (root / "startup").mkdir(parents=True)
    (root / "startup" / "fed_admin.json").write_text(json.dumps({"admin": admin}))
    return root


def test_a_kit_whose_key_others_can_read_refuses_to_start_and_says_how_to_fix_it(
    pki, tmp_path: Path
) -> None:
    ws = _site_workspace(tmp_path / "site", "site-a", pki.sites["site-a"], 9)
    key = ws / "startup" / "client.key"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as info:
        SiteService(ws, EventBus())
    assert str(info.value) == (
        f"{key}: the private key is readable by others (mode 0644); refusing to use it. "
        f"Fix: chmod 600 {key}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fltui", "--no-ui", "--workspace", str(ws)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"Fix: chmod 600 {key}" in proc.stderr
    # The fix works.
    os.chmod(key, 0o600)
    SiteService(ws, EventBus()).stop()
    # The server's key and the admin's key are held to the same rule.
    loose = tmp_path / "loose.key"
    shutil.copy(pki.server.key, loose)
    os.chmod(loose, 0o640)
    with pytest.raises(ConfigError, match=f"mode 0640.*Fix: chmod 600 {loose}"):
        FederatedServer(server_config(pki, ssl_private_key=loose), tmp_path / "s", model())
    admin_key = tmp_path / "admin.key"
    shutil.copy(pki.admin.key, admin_key)
    os.chmod(admin_key, 0o604)
    kit = Kit(pki.admin.root_cert, pki.admin.cert, admin_key)
    err = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, err
    try:
        assert run_admin(_admin_kit(tmp_path / "admin", kit, 9), ["check_status", "server"]) == 2
    finally:
        sys.stderr = sys_stderr
    assert f"Fix: chmod 600 {admin_key}" in err.getvalue()


def test_a_server_without_certificates_refuses_to_start_unless_told_it_is_plaintext(
    tmp_path: Path,
) -> None:
    from engine.config import load_server_config

    path = tmp_path / "config_fed_server.json"
    path.write_text(json.dumps({"servers": [{"name": TASK, "service": {"target": "127.0.0.1:0"}}]}))
    config = load_server_config(path)
    assert config.secure_train  # the default outside the demo
    with pytest.raises(ConfigError, match="secure_train is on \\(the default\\) but"):
        FederatedServer(config, tmp_path / "s", model())
    path.write_text(
        json.dumps(
            {
                "servers": [
                    {"name": TASK, "service": {"target": "127.0.0.1:0"}, "secure_train": False}
                ]
            }
        )
    )
    assert not load_server_config(path).secure_train


def test_a_refused_site_says_why_in_the_no_ui_output_without_retrying(
    pki, start_secure_server, tmp_path: Path
) -> None:
    server = start_secure_server()
    ws = _site_workspace(tmp_path / "site", "site-a", pki.other_ca_site, server.port)
    bus = EventBus()
    out = io.StringIO()
    bus.subscribe(HeadlessPrinter(stream=out))
    state = SiteState()  # what the console's panels show
    bus.subscribe(state.apply)
    service = SiteService(ws, bus, executor="thread")
    t0 = time.monotonic()
    assert service.run(auto_start=False) == "failed"
    assert time.monotonic() - t0 < 8  # retry_timeout is 30 s: it was not retried
    assert service.failure is not None and service.failure.security
    assert service.failure.kind == "wrong_ca"
    text = out.getvalue()
    assert f"connection failed: 127.0.0.1:{server.port} (wrong certificate authority:" in text
    assert "federation failed after 0 rounds (wrong certificate authority:" in text
    assert "retrying" not in text
    assert not server.sites
    assert state.connection == "failed" and state.outcome == "failed"
    assert state.connection_detail.startswith("wrong certificate authority:")
    assert state.outcome_detail == state.connection_detail


def test_the_site_command_exits_3_when_tls_refuses_it(pki, start_secure_server, tmp_path) -> None:
    server = start_secure_server()
    ws = _site_workspace(tmp_path / "site", "site-a", pki.expired_site, server.port)
    proc = subprocess.run(
        [sys.executable, "-m", "fltui", "--no-ui", "--serve", "--workspace", str(ws)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )
    assert "expired certificate:" in proc.stdout
    assert proc.returncode == EXIT_REFUSED, proc.stdout + proc.stderr


def test_the_admin_console_authenticates_by_certificate(
    pki, start_secure_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_secure_server()
    good = _admin_kit(tmp_path / "good", pki.admin, server.port)
    assert run_admin(good, ["check_status", "server"]) == 0
    assert f"server: task {TASK}" in capsys.readouterr().out
    # A site's certificate cannot run admin commands.
    as_site = _admin_kit(tmp_path / "site", pki.sites["site-a"], server.port)
    assert run_admin(as_site, ["check_status", "server"]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "fltui admin: refused: refused by the server at" in err
    assert "wrong certificate role: 'site-a' has a certificate of role 'site'" in err
    # Another authority's admin; a plaintext console; an expired certificate.
    other = _admin_kit(tmp_path / "other", pki.other_ca_site, server.port)
    assert run_admin(other, ["check_status", "server"]) == EXIT_REFUSED
    assert "wrong certificate authority" in capsys.readouterr().err
    plain = _admin_kit(tmp_path / "plain", None, server.port)
    assert run_admin(plain, ["check_status", "server"]) == EXIT_REFUSED
    assert "plaintext client speaking to a TLS server" in capsys.readouterr().err
    expired = _admin_kit(tmp_path / "expired", pki.expired_site, server.port)
    assert run_admin(expired, ["check_status", "server"]) == EXIT_REFUSED
    assert "expired certificate:" in capsys.readouterr().err


def test_fltui_admin_command_over_mutual_tls(pki, start_secure_server, tmp_path: Path) -> None:
    server = start_secure_server()

    def admin(kit: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "fltui",
                "admin",
                "--workspace",
                str(kit),
                "check_status",
                "server",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
            stdin=subprocess.DEVNULL,
        )

    ok = admin(_admin_kit(tmp_path / "good", pki.admin, server.port))
    assert ok.returncode == 0 and f"server: task {TASK}" in ok.stdout, ok.stderr
    refused = admin(_admin_kit(tmp_path / "site", pki.sites["site-b"], server.port))
    assert refused.returncode == EXIT_REFUSED
    assert "wrong certificate role" in refused.stderr


def test_check_config_says_what_the_site_would_refuse_before_it_connects(
    pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fltui.check_config import main as check_config

    good = _site_workspace(tmp_path / "good", "site-a", pki.sites["site-a"], 8002)
    assert check_config([str(good / "startup")]) == 0
    loose = _site_workspace(tmp_path / "loose", "site-a", pki.sites["site-a"], 8002)
    os.chmod(loose / "startup" / "client.key", 0o644)
    assert check_config([str(loose / "startup")]) == 1
    out = capsys.readouterr().out
    assert "client.key" in out and "readable by others" in out and "chmod 600" in out
    expired = _site_workspace(tmp_path / "expired", "site-a", pki.expired_site, 8002)
    assert check_config([str(expired / "startup")]) == 1
    assert "client.ssl_cert: expired certificate" in capsys.readouterr().out
