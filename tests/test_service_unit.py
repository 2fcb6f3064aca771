"""docs/fltui.service is a unit systemd accepts, and it runs the site as a service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "docs" / "fltui.service"


def test_the_unit_runs_the_headless_service_and_restarts_only_what_a_restart_can_fix() -> None:
    text = UNIT.read_text()
    assert "--no-ui --serve --workspace" in text
    assert "Restart=on-failure" in text
    assert "RestartPreventExitStatus=2 3\n" in text  # config, TLS/auth; busy (4) is retried
    assert "SuccessExitStatus=130" in text  # systemctl stop (SIGTERM) is not a failure
    assert "StandardOutput=journal" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    fltui = Path(sys.executable).parent / "fltui"
    if not fltui.exists():
        pytest.skip("the fltui script is not installed next to this Python")
    unit = tmp_path / "fltui.service"
    unit.write_text(UNIT.read_text().replace("/opt/fltui/.venv/bin/fltui", str(fltui)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "fltui.service" in line  # systemd also talks about units of this machine
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
