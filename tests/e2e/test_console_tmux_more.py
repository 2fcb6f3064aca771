"""More of the console in a real terminal (tmux), with real processes.

1. The server (``fltui server``, a process of its own) SIGKILLed under a site service that the
   console is attached to: the header shows the server stale, then lost, within the thresholds
   the help screen states (``engine.site.state``: 1.5 and 4 heartbeat intervals), in the theme's
   colours; the server started again on the same port and workspace: the header is normal again.
2. The log panel during a demo run: a search applied then cleared (Esc), and the terminal
   resized to 80x24 and back: the newest log line is at the bottom each time (follow resumed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.demo import _set_port, prepare_workspace
from engine.site.state import LOST_AFTER, STALE_AFTER
from tests.e2e.test_console_stale_tmux import _service_up
from tests.e2e.test_console_tmux import ROOT, TMUX, Tmux, _processes_using, _wait_for
from tests.e2e.test_service import ENV, _service

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TMUX is None, reason="tmux is not on PATH (needed to drive the console)"),
]

HEARTBEAT_S = 1.0  # the site's heartbeat_interval in its kit (short: the test waits on it)
_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _console(*args: str) -> str:
    """The shell command that runs the console (``fltui`` with ``args``) from the project.

    Without COLUMNS and LINES: under pytest they are 80 and 24, and Textual would take them
    over the pane's own size (a resize would not reach the console)."""
    return (
        f"cd {shlex.quote(str(ROOT))} && env -u COLUMNS -u LINES "
        f"PYTHONPATH={shlex.quote(str(ROOT))} "
        f"{shlex.quote(sys.executable)} -m fltui {shlex.join(args)}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fltui_server(workspace: Path) -> subprocess.Popen[str]:
    """``fltui server --no-ui`` as an operator runs it: a process of its own."""
    log = (workspace / f"server-{time.monotonic_ns()}.out").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "fltui", "server", "--no-ui", "--workspace", str(workspace)],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _listening(server: subprocess.Popen[str], workspace: Path, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "fltui server exited:\n" + "".join(
            p.read_text() for p in workspace.glob("server-*.out")
        )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"fltui server did not listen on port {port}")


def _header(tmux: Tmux, escapes: bool = False) -> str:
    """The console's header: its first two rows (one, or two on a narrow terminal)."""
    args = ["capture-pane", "-p", *(["-e"] if escapes else []), "-t", tmux.session]
    return "\n".join(tmux(*args, check=False).splitlines()[:2])


def _styles(header: str) -> set[str]:
    """The SGR parameter strings used on the header rows (colours, bold, dim)."""
    return {m.group(1) for m in _SGR.finditer(header)} - {"", "0", "39", "49"}


def test_killed_server_is_shown_stale_then_lost_and_recovered(tmp_path: Path) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=500, heartbeat_interval=HEARTBEAT_S)
    port = _free_port()
    server_dir, site = tmp_path / "server", tmp_path / "site-1"
    config = server_dir / "config_fed_server.json"
    data = json.loads(config.read_text())
    data["servers"][0]["service"]["target"] = f"127.0.0.1:{port}"
    config.write_text(json.dumps(data, indent=2))
    _set_port(site / "startup" / "fed_client.json", port)

    servers = [_fltui_server(server_dir)]
    services: list[subprocess.Popen[str]] = []
    tmux = Tmux(tmp_path / "tmux.conf")
    try:
        _listening(servers[0], server_dir, port)
        services.append(_service(site, "--serve", "--run", "1"))
        _service_up(site)
        tmux.start(_console("--workspace", str(site)))

        def normal() -> bool:
            """Registered (or connected), the last heartbeat answered within 2 intervals, and
            nothing stale or lost."""
            header = _header(tmux)
            hb = re.search(r"heartbeat (\d+) s ago \([\d.]+ ms\)", header)
            conn = re.search(r"│ TLS o(?:n|ff) │ ([a-z ]+)", header)
            return (
                hb is not None
                and int(hb.group(1)) <= 2 * HEARTBEAT_S
                and conn is not None
                and conn.group(1).strip() in ("registered", "registered again", "connected")
                and not any(w in header for w in ("unanswered", "server lost", "last heard"))
            )

        _wait_for(
            "training, with heartbeats answered",
            lambda: "worker pid" in tmux.screen() and normal(),
            tmux,
            90,
        )
        time.sleep(2 * HEARTBEAT_S)  # a few answered heartbeats: the normal header's colours
        assert normal(), tmux.screen()
        normal_styles = _styles(_header(tmux, escapes=True))

        # 1. SIGKILL: stale past 1.5 intervals, lost past 4 (+ a refresh, and slack for the CPUs)
        os.kill(servers[0].pid, signal.SIGKILL)
        servers[0].wait(timeout=10)
        killed = time.monotonic()
        _wait_for(
            "the server shown stale",
            lambda: "unanswered" in _header(tmux),
            tmux,
            STALE_AFTER * HEARTBEAT_S + 2.5,
            interval=0.1,
        )
        stale_s = time.monotonic() - killed
        stale_header = _header(tmux)
        stale_styles = _styles(_header(tmux, escapes=True))
        _wait_for(
            "the server shown lost",
            lambda: "server lost: no heartbeat answered" in _header(tmux),
            tmux,
            LOST_AFTER * HEARTBEAT_S + 3,
            interval=0.1,
        )
        lost_s = time.monotonic() - killed
        lost_header = _header(tmux)
        lost_styles = _styles(_header(tmux, escapes=True))
        print(f"server SIGKILLed: stale after {stale_s:.1f} s, lost after {lost_s:.1f} s")
        assert stale_s < lost_s, (stale_header, lost_header)
        # the last answer came at most an interval before the kill: not lost before 3 of them
        assert lost_s >= (LOST_AFTER - 1) * HEARTBEAT_S, f"lost too soon ({lost_s:.1f} s)"
        # In colour: stale dimmed, lost in the error style (bold, another background).
        if normal_styles:  # capture-pane -e gave escape codes
            assert stale_styles != normal_styles, (normal_styles, stale_styles)
            assert lost_styles != normal_styles, (normal_styles, lost_styles)
            assert "1" in {p for s in lost_styles for p in s.split(";")}, lost_styles

        # 2. the server starts again, same port and workspace: the header is normal again
        servers.append(_fltui_server(server_dir))
        restarted = time.monotonic()
        _listening(servers[-1], server_dir, port)
        _wait_for("the header back to normal", normal, tmux, 45)
        back = time.monotonic()
        print(f"server restarted: header normal after {back - restarted:.1f} s: {_header(tmux)!r}")
        while time.monotonic() - back < 3 * HEARTBEAT_S:  # and it stays so
            assert normal(), f"the header after the restart: {_header(tmux)!r}"
            time.sleep(0.2)
        back_styles = _styles(_header(tmux, escapes=True))
        assert back_styles == normal_styles, (normal_styles, back_styles)
    finally:
        tmux.kill()
        for proc in [*services, *servers]:
            with contextlib.suppress(OSError):
                proc.kill()
        for leftover in _processes_using(tmp_path):
            with contextlib.suppress(OSError):
                os.kill(leftover, signal.SIGKILL)


_STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) ")


def _log_rows(screen: str) -> list[str]:
    """The text rows inside the Logs panel's border (the scrollbar's columns left out)."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if "─ Logs ≥" in line)
    col = lines[top].index("╭─ Logs")
    rows = []
    for line in lines[top + 1 :]:
        cell = line[col:]
        if not cell.startswith("│"):
            break
        rows.append(cell[1:-3].rstrip())  # │ text … scrollbar (2 columns) │
    return rows


def _entries(rows: list[str]) -> list[tuple[int, str]]:
    """The log lines shown, each (its time of day in s, its text unwrapped)."""
    entries: list[tuple[int, str]] = []
    for row in rows:
        if m := _STAMP.match(row):
            h, mi, s = (int(g) for g in m.groups())
            entries.append((h * 3600 + mi * 60 + s, row))
        elif entries and row.strip():
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {row.strip()}")
    return entries


def _newest_at_bottom(tmux: Tmux, after: str | None = None) -> str | None:
    """The last log line shown if it is at the panel's bottom row, written in the last few
    seconds, with no "new lines below" marker (and, given ``after``, another line than it)."""
    screen = tmux.screen()
    rows = _log_rows(screen)
    entries = _entries(rows)
    if not rows or not rows[-1].strip() or not entries or "new lines below" in screen:
        return None
    stamp, text = entries[-1]
    now = time.localtime()
    age = (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec - stamp) % 86400  # past midnight
    if age > 6 or (after is not None and text == after):
        return None
    return text


def _follows(tmux: Tmux, what: str) -> None:
    """The newest line is at the bottom, and a newer one takes its place: the panel follows."""
    first = _wait_for(
        f"the newest log line at the bottom ({what})", lambda: _newest_at_bottom(tmux), tmux, 8
    )
    _wait_for(
        f"a newer log line at the bottom ({what})",
        lambda: _newest_at_bottom(tmux, after=str(first)),
        tmux,
        8,
    )


def test_logs_follow_after_a_search_and_a_resize(tmp_path: Path) -> None:
    workspace = tmp_path / "demo"
    tmux = Tmux(tmp_path / "tmux.conf")
    try:
        tmux(
            "new-session",
            "-d",
            "-s",
            tmux.session,
            "-x",
            "120",
            "-y",
            "40",
            _console("demo", "--workspace", str(workspace), "--sites", "1", "--rounds", "400"),
        )
        tmux("resize-window", "-t", tmux.session, "-x", "120", "-y", "40")
        _wait_for("training", lambda: "training started" in tmux.screen(), tmux, 60)
        _follows(tmux, "at start")

        # 1. a search applied: only its lines, the title says so
        tmux.keys("/")
        _wait_for("the search box", lambda: "search the logs" in tmux.screen(), tmux, 10)
        tmux.keys("-l", "contribution sent")
        tmux.keys("Enter")
        _wait_for(
            "the search applied",
            lambda: "search 'contribution sent'" in tmux.screen(),
            tmux,
            10,
        )
        _follows(tmux, "searching")
        shown = _entries(_log_rows(tmux.screen()))[1:]  # the first may be cut at the top
        assert shown and all("contribution sent" in text for _, text in shown), shown

        # 2. Esc clears it: every line again, and the newest keeps coming in at the bottom
        tmux.keys("/")
        tmux.keys("Escape")
        _wait_for(
            "the search cleared",
            lambda: "search '" not in tmux.screen() and "search the logs" not in tmux.screen(),
            tmux,
            10,
        )
        _follows(tmux, "after Esc")
        assert any("contribution sent" not in t for _, t in _entries(_log_rows(tmux.screen())))

        # 3. a smaller terminal, then the first size again: still the newest at the bottom
        for cols, rows in ((80, 24), (120, 40)):
            tmux("resize-window", "-t", tmux.session, "-x", str(cols), "-y", str(rows))
            _wait_for(
                f"the console at {cols}x{rows}",
                lambda c=cols: max(map(len, tmux.screen().splitlines())) == c,  # type: ignore[misc]
                tmux,
                10,
            )
            _follows(tmux, f"at {cols}x{rows}")
    finally:
        tmux.kill()
        for leftover in _processes_using(workspace):
            with contextlib.suppress(OSError):
                os.kill(leftover, signal.SIGKILL)
