"""`fltui check-config` from the command line: every problem at once, exit 1; clean, exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fltui", "check-config", *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_config_from_the_command_line() -> None:
    clean = _run("engine/training/demo_mmar")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no problems" in clean.stdout
    tf = _run("tests/fixtures/clara31/mmar_tf")
    assert tf.returncode == 1
    lines = tf.stdout.splitlines()
    assert any("TFModelReaderWriter" in line and "PTModelReaderWriter" in line for line in lines)
    # the two TensorFlow reader/validator lines (ModelEncryptor is built in since HE)
    assert len([line for line in lines if "config_fed_client.json: client." in line]) >= 2
    missing = _run("does/not/exist")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
