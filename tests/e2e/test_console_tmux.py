"""The full-screen console in a real terminal (tmux): watch training start, abort it, quit.

Runs the real ``fltui demo`` in a tmux server of its own (private socket), reads the screen with
``capture-pane`` and types with ``send-keys``, the way an operator would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TMUX is None, reason="tmux is not on PATH (needed to drive the console)"),
]

COLS, ROWS = 100, 30


class Tmux:
    """One private tmux server (its own socket) holding one session."""

    def __init__(self, conf: Path) -> None:
        self.socket = f"fltui-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.session = "console"
        self.conf = conf
        # remain-on-exit: the pane stays (dead) after the console exits, so the test can see
        # its exit status and its last screen; no status line: the console gets all 30 rows.
        conf.write_text("set -g remain-on-exit on\nset -g status off\n")

    def __call__(self, *args: str, check: bool = True) -> str:
        assert TMUX is not None
        proc = subprocess.run(
            [TMUX, "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, command: str) -> None:
        self("new-session", "-d", "-s", self.session, "-x", str(COLS), "-y", str(ROWS), command)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session, check=False)

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", self.session, fmt, check=False).strip()

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.session, *keys)

    def kill(self) -> None:
        self("kill-server", check=False)


def _wait_for(
    what: str, probe: Callable[[], object], tmux: Tmux, timeout: float, interval: float = 0.25
) -> object:
    """Polls ``probe`` until it returns something truthy; fails with the screen otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            dead = tmux.pane("#{pane_dead} #{pane_dead_status}")
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} "
                f"(pane dead/status: {dead!r}); the screen:\n{tmux.screen()}"
            )
        time.sleep(interval)


def _on_screen(tmux: Tmux, text: str) -> Callable[[], bool]:
    return lambda: text in tmux.screen()


def _worker_running(pid: int) -> bool:
    """True while /proc/<pid> is the site's training worker (a reused pid does not count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return b"engine.site.worker" in cmdline and state != "Z"


def _processes_using(workspace: Path) -> list[int]:
    """Pids of live processes whose command line names ``workspace`` (the demo's sites, workers)."""
    needle = str(workspace).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            # the tmux server's own command line names the workspace too: not the demo's
            if needle in cmdline and not os.path.basename(cmdline.split(b"\0")[0]).startswith(
                b"tmux"
            ):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_console_abort_in_a_real_terminal(tmp_path: Path) -> None:
    workspace = tmp_path / "demo"
    tmux = Tmux(tmp_path / "tmux.conf")
    # The shell writes the console's exit status to a file: tmux (3.3a) has been seen leaving
    # the exited console a zombie for many seconds, with the pane dead and no status to read.
    exit_file = tmp_path / "console-exit-status"
    command = (
        f"cd {shlex.quote(str(ROOT))} && env PYTHONPATH={shlex.quote(str(ROOT))} "
        f"{shlex.quote(sys.executable)} -m fltui demo "
        f"--workspace {shlex.quote(str(workspace))} --rounds 60; "
        f"echo $? > {shlex.quote(str(exit_file))}"
    )
    try:
        tmux.start(command)

        # 1. training starts on site-1, with a worker process whose pid the Client panel shows
        def worker_pid() -> int | None:
            screen = tmux.screen()
            if "training started" not in screen:
                return None
            match = re.search(r"worker pid (\d+)", screen)
            return int(match.group(1)) if match else None

        pid = _wait_for("'training started' and a worker pid", worker_pid, tmux, timeout=90)
        assert isinstance(pid, int)
        screen = tmux.screen()
        assert "fltui demo" in screen and "site-1" in screen, screen
        assert _worker_running(pid), f"worker pid {pid} on screen, but no such worker process"

        # 2. abort: the console asks first, then stops training
        tmux.keys("a")
        _wait_for("the abort question", _on_screen(tmux, "Abort training on site-1?"), tmux, 30)
        tmux.keys("y")
        _wait_for("'training stopped'", _on_screen(tmux, "training stopped"), tmux, timeout=60)

        # 3. the worker is gone (not even a zombie): allow a moment for it to be reaped
        deadline = time.monotonic() + 10
        while _worker_running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _worker_running(pid), f"site-1's worker (pid {pid}) outlived the abort"
        # the Client panel catches up on its next refresh
        _wait_for(
            "the Client panel to drop the worker",
            lambda: not re.search(rf"worker pid {pid}\b", tmux.screen()),
            tmux,
            10,
        )

        # 4. quit: the console exits (status 0) and stops the demo's processes with it
        tmux.keys("q")
        status = _wait_for(
            "the console to exit",
            lambda: exit_file.exists() and exit_file.read_text().strip(),
            tmux,
            45,
        )
        assert status == "0", f"console exit status {status!r}; the screen:\n{tmux.screen()}"
        deadline = time.monotonic() + 20
        while _processes_using(workspace) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = _processes_using(workspace)
        assert not left, f"processes of the demo outlived the console: {left}"
    finally:
        tmux.kill()
        for leftover in _processes_using(workspace):  # only processes of this test's workspace
            with contextlib.suppress(OSError):
                os.kill(leftover, signal.SIGKILL)
