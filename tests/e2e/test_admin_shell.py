"""`fltui admin` in a real terminal (tmux): Tab completion, history, "did you mean", Ctrl-C.

A real server and one real site service over loopback; the console runs in a private tmux
server, so readline sees a terminal as an admin's would.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.demo import _set_admin_port, _set_port, prepare_workspace
from engine.site.paths import SitePaths

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TMUX = shutil.which("tmux")


def _admin(ws: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fltui", "admin", "--workspace", str(ws / "admin"), *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A server and site-1 (a service waiting for commands); yields the demo root."""
    ws = tmp_path_factory.mktemp("admin-shell")
    prepare_workspace(ws, num_sites=1, num_rounds=1, heartbeat_interval=1)
    server = subprocess.Popen(
        [sys.executable, "-m", "fltui", "server", "--no-ui", "--workspace", str(ws / "server")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    site = None
    try:
        assert server.stdout is not None
        port = None
        for line in server.stdout:
            if m := re.search(r"server listening on port (\d+)", line):
                port = int(m.group(1))
                break
        assert port
        threading.Thread(target=server.stdout.read, daemon=True).start()
        _set_admin_port(ws / "admin", port)
        _set_port(SitePaths(ws / "site-1").kit, port)
        site = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fltui",
                "--no-ui",
                "--serve",
                "--workspace",
                str(ws / "site-1"),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        deadline = time.monotonic() + 60
        while "sites: site-1" not in _admin(ws, "check_status", "server").stdout:
            assert time.monotonic() < deadline, "site-1 did not register"
            time.sleep(0.3)
        yield ws
    finally:
        for proc in (site, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_one_command_errors_say_what_is_wrong(federation: Path) -> None:
    ws = federation
    typo = _admin(ws, "chek_status", "server")
    assert typo.returncode == 2 and "did you mean check_status?" in typo.stderr, typo
    # A site that is not registered is no usage error: no usage line, but the closest name.
    gone = _admin(ws, "check_status", "client", "site1")
    assert gone.returncode == 1
    assert "not registered: site1 (did you mean site-1?)" in gone.stdout, gone.stdout
    assert "usage:" not in gone.stdout
    # A wrong form is a usage error: its usage line follows.
    wrong = _admin(ws, "set_run_number", "x")
    assert wrong.returncode == 1 and "usage: set_run_number N" in wrong.stdout, wrong.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "fltui", "admin", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert helped.returncode == 0
    for name in ("check_status", "deploy", "validate", "validation_progress", "tail", "bye"):
        assert re.search(rf"^  {name}\b.+\w", helped.stdout, re.M), (name, helped.stdout)
    assert "--no-ui" not in helped.stdout


class _Tmux:
    def __init__(self, tmp: Path) -> None:
        self.socket = f"fltui-admin-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\nset -g status off\n")

    def __call__(self, *args: str) -> str:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "admin")

    def wait(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen, re.M):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} on the screen within {timeout} s:\n{self.screen()}")


@pytest.mark.skipif(TMUX is None, reason="tmux is not on PATH (needed for a real terminal)")
def test_completion_history_did_you_mean_and_ctrl_c(federation: Path, tmp_path: Path) -> None:
    ws = federation
    tmux = _Tmux(tmp_path)
    status = tmp_path / "exit-status"
    command = (
        f"cd {shlex.quote(str(ROOT))} && env PYTHONPATH={shlex.quote(str(ROOT))} "
        f"XDG_STATE_HOME={shlex.quote(str(tmp_path / 'state'))} "
        f"{shlex.quote(sys.executable)} -m fltui admin --workspace {shlex.quote(str(ws / 'admin'))}"
        f" 2>&1; echo exit=$? > {shlex.quote(str(status))}"
    )
    try:
        tmux("new-session", "-d", "-s", "admin", "-x", "100", "-y", "30", command)
        tmux.wait(r"^>$")
        # (the screen drops trailing blanks: "^>$" is the prompt "> ")
        # Tab completes the command, then the target, then the site's name (asked of the server).
        tmux("send-keys", "-t", "admin", "check_st", "Tab")
        tmux.wait(r"^> check_status$")
        tmux("send-keys", "-t", "admin", "cl", "Tab", "si", "Tab")
        tmux.wait(r"^> check_status client site-1$")
        tmux("send-keys", "-t", "admin", "Enter")
        tmux.wait(r"^site-1: client name: site-1")
        # History: Up brings the last command back (not ^[[A).
        tmux("send-keys", "-t", "admin", "Up")
        screen = tmux.wait(r"^> check_status client site-1$")
        assert "^[[A" not in screen
        tmux("send-keys", "-t", "admin", "C-u", "vaildate all", "Enter")
        tmux.wait(r"unknown command 'vaildate' \(did you mean validate\?\)")
        # Ctrl-C leaves at once, with no traceback.
        tmux("send-keys", "-t", "admin", "C-c")
        deadline = time.monotonic() + 15
        while not status.exists():
            assert time.monotonic() < deadline, f"Ctrl-C did not end it:\n{tmux.screen()}"
            time.sleep(0.1)
        assert status.read_text().strip() == "exit=130"
        assert "Traceback" not in tmux.screen()
        history = (tmp_path / "state" / "fltui" / "admin_history").read_text()
        assert "check_status client site-1" in history
        assert (tmp_path / "state" / "fltui" / "admin_history").stat().st_mode & 0o077 == 0
    finally:
        tmux("kill-server")


def test_ctrl_d_leaves_cleanly(federation: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fltui", "admin", "--workspace", str(federation / "admin")],
        cwd=ROOT,
        input="check_status server\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sites: site-1" in proc.stdout and "Traceback" not in proc.stderr
