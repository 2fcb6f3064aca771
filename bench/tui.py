#!/usr/bin/env python
"""The console in a real pseudo-terminal: time to first frame, and its CPU use idle and training.

Usage::

    python bench/tui.py [--rounds 30] [--window 10] [--settle 2] [--repeat 1]
                        [--scenarios demo,site] [--json-only] [--keep DIR]

Each scenario starts the real console (``python -m fltui ...``, the same Python as this script)
in a pseudo-terminal of 120x40 with ``TERM=xterm-256color``, and keeps draining what it writes
(the app would block on a full terminal otherwise). Times are taken from just before the fork.

``demo``
    ``fltui demo --workspace <tmp> --rounds N``: first output byte and first frame (the header
    text "│ TLS" on screen); once site-1 shows "training started" and ``--settle`` seconds
    passed, the console's CPU over ``--window`` seconds while the federation trains; then, once
    the federation has finished ("federation completed"), its CPU over ``--window`` seconds idle,
    the console still open.
``site``
    the site console with no server: a demo workspace made with
    ``engine.demo.prepare_workspace`` whose site kits point at a closed port, and
    ``fltui --workspace <tmp>/site-1``: first frame (the header "│ TLS"), then its CPU over
    ``--window`` seconds while it retries the server (nothing else happens: idle).

The console runs the demo as a service in a child process and only draws it; that service's
CPU over the same windows is reported as ``service_cpu_pct`` (it runs the server and site-1's
engine, as a site's service would), so nothing is hidden.

CPU is the console process's own (utime+stime from ``/proc/<pid>/stat``: every thread of the
console, none of its children - the training workers and peer sites are child processes), as %
of one core. Per-thread ticks (``/proc/<pid>/task/*/stat``) are reported too, to see where it
goes (the main thread is Textual's event loop). Output bytes per second is what the console
wrote to the terminal during the window.

Output: one JSON object per line per measurement, then (unless ``--json-only``) a Markdown table
against the issue's targets: first frame under 0.5 s, idle under 1 % of a core, training under
3 % of a core at the default refresh.

The console is quit with ``q`` (which stops the demo's processes); whatever is left is killed
(the console's process group, then any process naming the bench's temporary workspace).

Before measuring, fltui's own packages are byte-compiled (``compileall``), as ``pip install``
does for a wheel and as Python does on the first run of an editable install; without it, an
environment with ``PYTHONDONTWRITEBYTECODE`` set (this machine's) recompiles fltui on every start,
which costs about 50 ms of the first frame. ``--no-compile`` measures that case.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLS, ROWS = 120, 40
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = {"first_frame_s": 0.5, "idle_cpu_pct": 1.0, "training_cpu_pct": 3.0}
# CSI / OSC / DCS and two-byte escapes: what is left is the text the console drew.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1bP[^\x1b]*\x1b\\|\x1b[@-Z\\-_]"
    r"|\x1b[()][0-9A-Za-z]|[\x00-\x08\x0e-\x1f]"
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class Console:
    """``python -m fltui ARGS`` in a pseudo-terminal, its output drained by a thread."""

    def __init__(self, args: list[str], workspace_root: Path) -> None:
        self.args = args
        self.workspace_root = workspace_root
        self.lock = threading.Lock()
        self.raw_bytes = 0
        self.text = ""  # everything drawn, escapes stripped (kept whole: a run writes a few MB)
        self.first_byte: float | None = None
        self.marks: dict[str, float] = {}  # text -> when it first appeared
        self.watch: list[str] = []
        self.exited = threading.Event()
        self.t0 = 0.0

    def start(self, watch: list[str]) -> None:
        self.watch = list(watch)
        env = {
            **os.environ,
            "TERM": "xterm-256color",
            "COLUMNS": str(COLS),
            "LINES": str(ROWS),
            "PYTHONPATH": str(ROOT),
        }
        for key in ("NO_COLOR", "TEXTUAL", "TEXTUAL_DRIVER"):
            env.pop(key, None)
        argv = [sys.executable, "-m", "fltui", *self.args]
        self.t0 = time.monotonic()
        pid, fd = pty.fork()
        if pid == 0:  # the child: the console, in its own session with the pty as its terminal
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
                os.chdir(ROOT)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.reader = threading.Thread(target=self._drain, name="drain", daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""  # an escape sequence cut by a read
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                if not ready:
                    if self._reaped():
                        break
                    continue
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the console closed the terminal
                break
            if not chunk:
                break
            now = time.monotonic()
            decoded = pending + decoder.decode(chunk)
            cut = decoded.rfind("\x1b")
            if cut != -1 and len(decoded) - cut < 64:
                decoded, pending = decoded[:cut], decoded[cut:]
            else:
                pending = ""
            with self.lock:
                if self.first_byte is None:
                    self.first_byte = now - self.t0
                self.raw_bytes += len(chunk)
                tail_from = max(0, len(self.text) - 200)
                self.text += strip_ansi(decoded)
                for mark in self.watch:
                    if mark not in self.marks and mark in self.text[tail_from:]:
                        self.marks[mark] = now - self.t0
        self._reaped()
        self.exited.set()

    def _reaped(self) -> bool:
        if getattr(self, "status", None) is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = -1
            return True
        if pid:
            self.status = os.waitstatus_to_exitcode(status)
            return True
        return False

    def wait_for(self, mark: str, timeout: float) -> float | None:
        """Seconds from start until ``mark`` was drawn, or None after ``timeout``."""
        if mark not in self.watch:
            with self.lock:
                self.watch.append(mark)
                if mark in self.text:
                    self.marks[mark] = time.monotonic() - self.t0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.exited.is_set():
            with self.lock:
                if mark in self.marks:
                    return self.marks[mark]
            time.sleep(0.05)
        with self.lock:
            return self.marks.get(mark)

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    # -- CPU of the console process itself

    def cpu_ticks(self, pid: int | None = None) -> int:
        stat = Path(f"/proc/{pid or self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)

    def thread_ticks(self) -> dict[str, tuple[str, int]]:
        out = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                out[task.name] = (comm, int(fields[11]) + int(fields[12]))
        return out

    def measure(self, window: float, service: int | None = None) -> dict[str, Any]:
        """The console's CPU over ``window`` (and, given its pid, the demo service's)."""
        threads0 = self.thread_ticks()
        svc0 = self.cpu_ticks(service) if service else 0
        ticks0, bytes0, t0 = self.cpu_ticks(), self.raw_bytes, time.monotonic()
        time.sleep(window)
        ticks1, bytes1, t1 = self.cpu_ticks(), self.raw_bytes, time.monotonic()
        svc1 = self.cpu_ticks(service) if service else 0
        threads1 = self.thread_ticks()
        elapsed = t1 - t0
        per_thread = []
        for tid, (comm, ticks) in threads1.items():
            spent = ticks - threads0.get(tid, (comm, 0))[1]
            if spent > 0:
                main = " (main)" if int(tid) == self.pid else ""
                per_thread.append((f"{comm}{main}", round(100 * spent / TICK / elapsed, 2)))
        per_thread.sort(key=lambda item: -item[1])
        return {
            "window_s": round(elapsed, 2),
            "cpu_pct": round(100 * (ticks1 - ticks0) / TICK / elapsed, 2),
            "out_kb_s": round((bytes1 - bytes0) / 1024 / elapsed, 1),
            "threads_cpu_pct": per_thread[:8],
            "threads": len(threads1),
            **(
                {"service_cpu_pct": round(100 * (svc1 - svc0) / TICK / elapsed, 2)}
                if service
                else {}
            ),
        }

    # -- shutdown

    def quit(self, timeout: float = 30) -> dict[str, Any]:
        t = time.monotonic()
        with contextlib.suppress(OSError):
            self.send(b"q")
        clean = self.exited.wait(timeout)
        if not clean:
            self.kill()
        return {"quit_s": round(time.monotonic() - t, 2), "clean": clean}

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(OSError):
                os.killpg(self.pid, sig)
            if self.exited.wait(5):
                break
        kill_leftovers(self.workspace_root)

    def close(self) -> None:
        if not self.exited.is_set():
            self.kill()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def processes_naming(root: Path) -> list[int]:
    """Live processes whose command line names ``root`` (the demo's sites and workers)."""
    needle, pids = str(root).encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def kill_leftovers(root: Path, grace: float = 10) -> list[int]:
    deadline = time.monotonic() + grace
    while processes_naming(root) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = processes_naming(root)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


# ---------------------------------------------------------------------------------- scenarios


def demo_service_pid(ws: Path) -> int | None:
    """The demo's service process (the console runs the demo as a child service)."""
    try:
        return int(json.loads((ws / ".fltui" / "service.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def scenario_demo(tmp: Path, args: argparse.Namespace, run: int) -> list[dict[str, Any]]:
    ws = tmp / f"demo{run}"
    console = Console(["demo", "--workspace", str(ws), "--rounds", str(args.rounds)], ws)
    results: list[dict[str, Any]] = []
    base = {"scenario": "demo", "run": run, "rounds": args.rounds}
    try:
        console.start(["│ TLS", "training started"])
        frame = console.wait_for("│ TLS", 30)
        results.append(
            {
                **base,
                "metric": "first_frame",
                "first_byte_s": _r(console.first_byte),
                "first_frame_s": _r(frame),
            }
        )
        started = console.wait_for("training started", args.start_timeout)
        if started is None:
            results.append({**base, "metric": "training", "error": "training never started"})
            return results
        time.sleep(args.settle)
        service = demo_service_pid(ws)
        m = console.measure(args.window, service)
        finished_early = "federation completed" in console.text
        results.append(
            {
                **base,
                "metric": "training",
                "training_started_s": _r(started),
                **m,
                "valid": not finished_early,
                **({"note": "federation finished inside the window"} if finished_early else {}),
            }
        )
        done = console.wait_for("federation completed", args.finish_timeout)
        if done is None:
            results.append({**base, "metric": "idle", "error": "federation did not finish"})
            return results
        time.sleep(args.settle)
        results.append(
            {
                **base,
                "metric": "idle",
                "finished_s": _r(done),
                **console.measure(args.window, demo_service_pid(ws)),
            }
        )
    finally:
        q = console.quit()
        console.close()
        left = kill_leftovers(ws)
        results.append({**base, "metric": "quit", **q, "killed_leftovers": left})
    return results


def scenario_site(tmp: Path, args: argparse.Namespace, run: int) -> list[dict[str, Any]]:
    from engine.demo import _set_port, prepare_workspace
    from engine.site.paths import SitePaths

    root = tmp / f"site{run}"
    prepare_workspace(root, num_sites=1, num_rounds=1, torch_in_subprocess=True)
    port = closed_port()
    _set_port(SitePaths(root / "site-1").kit, port)
    ws = root / "site-1"
    console = Console(["--workspace", str(ws)], root)
    base = {"scenario": "site (no server)", "run": run}
    results: list[dict[str, Any]] = []
    try:
        console.start(["│ TLS"])
        frame = console.wait_for("│ TLS", 30)
        results.append(
            {
                **base,
                "metric": "first_frame",
                "first_byte_s": _r(console.first_byte),
                "first_frame_s": _r(frame),
            }
        )
        time.sleep(max(args.settle, 3))
        m = console.measure(args.window)
        screen_says = [
            w for w in ("retrying", "connecting", "failed") if w in console.text[-20000:]
        ]
        results.append({**base, "metric": "idle", **m, "connection": screen_says})
    finally:
        q = console.quit()
        console.close()
        left = kill_leftovers(root)
        results.append({**base, "metric": "quit", **q, "killed_leftovers": left})
    return results


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| scenario | run | first byte s | first frame s | idle % core | training % core "
        "| out KB/s (idle / training) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["scenario"], r["run"]) for r in results})
    for scenario, run in keys:
        by = {r["metric"]: r for r in results if (r["scenario"], r["run"]) == (scenario, run)}
        ff = by.get("first_frame", {})
        idle, train = by.get("idle", {}), by.get("training", {})

        def cpu(m: dict[str, Any]) -> str:
            if "cpu_pct" not in m:
                return m.get("error", "—")
            return f"{m['cpu_pct']:.2f}" + ("" if m.get("valid", True) else " (!)")

        rows.append(
            f"| {scenario} | {run} | {ff.get('first_byte_s', '—')} "
            f"| {ff.get('first_frame_s', '—')} "
            f"| {cpu(idle)} | {cpu(train)} "
            f"| {idle.get('out_kb_s', '—')} / {train.get('out_kb_s', '—')} |"
        )
    frames = [r["first_frame_s"] for r in results if r.get("first_frame_s") is not None]
    idles = [r["cpu_pct"] for r in results if r["metric"] == "idle" and "cpu_pct" in r]
    trains = [r["cpu_pct"] for r in results if r["metric"] == "training" and "cpu_pct" in r]

    def verdict(values: list[float], target: float) -> str:
        if not values:
            return "not measured"
        worst = max(values)
        return f"worst {worst:.2f} → {'met' if worst < target else 'MISSED'}"

    rows += [
        "",
        "| target | limit | result |",
        "|---|---|---|",
        f"| first frame | < {TARGETS['first_frame_s']} s | "
        f"{verdict(frames, TARGETS['first_frame_s'])} |",
        f"| idle CPU | < {TARGETS['idle_cpu_pct']} % of a core | "
        f"{verdict(idles, TARGETS['idle_cpu_pct'])} |",
        f"| training CPU | < {TARGETS['training_cpu_pct']} % of a core | "
        f"{verdict(trains, TARGETS['training_cpu_pct'])} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="demo rounds (training long enough)")
    parser.add_argument("--window", type=float, default=10.0, help="CPU window, seconds")
    parser.add_argument("--settle", type=float, default=2.0, help="wait before a window")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--scenarios", default="demo,site")
    parser.add_argument("--start-timeout", type=float, default=90.0)
    parser.add_argument("--finish-timeout", type=float, default=300.0)
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="workspaces here (kept)")
    parser.add_argument(
        "--no-compile", action="store_true", help="do not byte-compile fltui first (see above)"
    )
    args = parser.parse_args(argv)
    if not args.no_compile:
        import compileall

        for package in ("fltui", "engine", "protos"):
            compileall.compile_dir(ROOT / package, quiet=1)
    scenarios = {"demo": scenario_demo, "site": scenario_site}
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in chosen:
        if name not in scenarios:
            parser.error(f"unknown scenario {name!r} (choose from {', '.join(scenarios)})")
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="fltui-bench-tui-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        for run in range(1, args.repeat + 1):
            for name in chosen:
                for result in scenarios[name](tmp, args, run):
                    print(json.dumps(result), flush=True)
                    results.append(result)
    finally:
        kill_leftovers(tmp, grace=0)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.json_only:
        print()
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
