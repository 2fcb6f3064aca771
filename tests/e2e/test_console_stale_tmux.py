"""A dead site is never shown healthy (real processes, a real terminal): the console attached to a
site service in tmux sees the service SIGKILLed (stale at once, then lost, within the thresholds
of ``engine.site.state``), sees it come back (fresh again), then sees its worker SIGKILLed (gone,
with that worker's own reason as the run's last error) and the server stopped (lost).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from engine.site.lock import find_service
from engine.site.state import LOST_AFTER, PULSE_S, STALE_AFTER
from tests.e2e.test_console_tmux import ROOT, TMUX, Tmux, _processes_using, _wait_for
from tests.e2e.test_service import _federation, _service

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TMUX is None, reason="tmux is not on PATH (needed to drive the console)"),
]


def _service_up(site: Path, not_pid: int | None = None) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = find_service(site)
        if info is not None and info.pid != not_pid:
            return info.pid
        time.sleep(0.2)
    raise AssertionError("the site service did not come up")


def test_killed_service_worker_and_server_are_shown_stale_then_lost(tmp_path: Path) -> None:
    server, site = _federation(tmp_path)  # heartbeat every 0.5 s
    services = [_service(site, "--serve", "--run", "1")]
    tmux = Tmux(tmp_path / "tmux.conf")
    try:
        first = _service_up(site)
        tmux.start(
            f"cd {shlex.quote(str(ROOT))} && env PYTHONPATH={shlex.quote(str(ROOT))} "
            f"{shlex.quote(sys.executable)} -m fltui --workspace {shlex.quote(str(site))}"
        )
        _wait_for(
            "training",
            lambda: "worker pid" in tmux.screen() and "training" in tmux.screen(),
            tmux,
            90,
        )

        # 1. the service is SIGKILLed: stale within 2 pulses, then lost — never "training".
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        _wait_for(
            "the service shown stale",
            lambda: "last heard" in tmux.screen(),
            tmux,
            2 * PULSE_S + 1.5,
        )
        stale_s = time.monotonic() - killed
        _wait_for(
            "the service shown lost",
            lambda: "service lost" in tmux.screen() and "state unknown" in tmux.screen(),
            tmux,
            LOST_AFTER * PULSE_S + 3,
        )
        lost_s = time.monotonic() - killed
        screen = tmux.screen()
        assert "● training started" not in screen and "ETA" not in screen, screen
        assert "unknown — service lost" in screen, screen
        print(f"service killed: stale after {stale_s:.1f} s, lost after {lost_s:.1f} s")

        # 2. it comes back (as systemd would start it): the console re-attaches, fresh again.
        services.append(_service(site, "--serve", "--run", "1"))
        _service_up(site, not_pid=first)
        _wait_for(
            "the service back to normal",
            lambda: (
                "attached to service" in tmux.screen()
                and "service lost" not in tmux.screen()
                and "last heard" not in tmux.screen()
            ),
            tmux,
            70,
        )

        # 3. its worker is SIGKILLed: gone, the reason is that worker's, with its run.
        match = _wait_for(
            "a worker pid", lambda: re.search(r"worker pid (\d+)", tmux.screen()), tmux, 90
        )
        pid = int(match.group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait_for(
            "the worker shown gone",
            lambda: (
                f"worker pid {pid} killed by SIGKILL" in tmux.screen().replace("\n", " ")
                or "killed by SIGKILL" in tmux.screen()
            ),
            tmux,
            # the promise is 2 pulses (printed below); the wait is generous for a loaded CI
            # machine, where the executor's reap of the killed worker can lag
            2 * PULSE_S + 10,
        )
        screen = tmux.screen()
        assert "last error (run 1)" in screen, screen
        print(f"worker killed: shown after {time.monotonic() - killed:.1f} s")

        # 4. the server stops answering: the header says so within 2 heartbeat intervals
        # (0.5 s here) plus a refresh, and in the error style once lost.
        server.stop(grace=0)
        _wait_for(
            "the server shown lost or retrying",
            lambda: any(w in tmux.screen() for w in ("server lost", "unanswered", "retrying")),
            tmux,
            STALE_AFTER * 0.5 + 12,  # generous for a loaded machine; measured in the tmux_more test
        )
    finally:
        tmux.kill()
        for proc in services:
            with contextlib.suppress(OSError):
                proc.kill()
        for leftover in _processes_using(site):
            with contextlib.suppress(OSError):
                os.kill(leftover, signal.SIGKILL)
        server.stop(grace=0)
