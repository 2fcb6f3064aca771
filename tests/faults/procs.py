"""Real processes for fault tests: `fltui server` and `fltui --no-ui` sites, their JSON output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.demo import _set_port

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``check`` until it is truthy; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


class Proc:
    """A child ``python -m fltui ...`` with ``--no-ui --json``; its JSON lines are collected.

    Every line also goes to ``<log>`` so that a failing test can show what the process said.
    """

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fltui", "--no-ui", "--json", *args],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("a", encoding="utf-8") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                out.flush()
                try:
                    item = json.loads(raw)
                except ValueError:
                    item = {"event": "Text", "message": raw.rstrip()}
                with self._lock:
                    self.lines.append(item)

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        """The events called ``name`` whose fields equal ``match``."""
        with self._lock:
            lines = list(self.lines)
        return [
            e
            for e in lines
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def logs(self, text: str) -> list[str]:
        """Log messages (and plain lines) that contain ``text``."""
        with self._lock:
            lines = list(self.lines)
        return [
            str(e.get("message", ""))
            for e in lines
            if e.get("event") in ("LogRecord", "Notice", "Text") and text in str(e.get("message"))
        ]

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8").splitlines()[-n:])
        except OSError:
            return "(no output)"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not end within {timeout:g} s; its last lines:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)

    def stop(self) -> None:
        """Ends it for good (test teardown): SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_server(workspace: Path, log: Path) -> tuple[Proc, int]:
    """``fltui server`` on ``workspace``; returns it and the port it listens on."""
    server = Proc("server", ["server", "--workspace", str(workspace)], log)
    line = wait_for(
        lambda: (
            server.logs("server listening on port")
            or (server.proc.poll() is not None and ["exited"])
        ),
        60,
        "the server to listen",
    )
    assert line != ["exited"], f"the server exited: {server.tail()}"
    return server, int(line[0].rsplit(" ", 1)[1])


def start_site(site: Path, port: int, log: Path, *extra: str) -> Proc:
    """A site service (``fltui --no-ui``) that talks to ``port`` (a proxy's, usually)."""
    _set_port(site / "startup" / "fed_client.json", port)
    return Proc(site.name, ["--workspace", str(site), *extra], log)


def workers(workspace: Path) -> list[int]:
    """Live training worker processes of a site workspace."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"engine.site.worker" in cmd and str(workspace).encode() in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
