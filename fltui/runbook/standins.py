"""The runbook's fixed clock, and the stand-ins for what differs on every run."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Any, TypeVar

from engine.events import (
    Event,
    GpuSampled,
    HeartbeatAcknowledged,
    ModelTransferred,
    RunChanged,
    SiteConfigured,
    SitePulse,
    StateSnapshot,
    event_from_dict,
)

E = TypeVar("E", bound=Event)

SIZE = (140, 40)  # wide enough for the requests table's four columns
T0 = 1_767_258_000.0  # 2026-01-01 09:00:00 UTC: where the fixed clock starts in every scenario
STEP_S = 5.0  # the fixed clock's default move between two steps
STAND_IN_ROOT = "/srv/fl"
STAND_IN_PORT = 8002
CONSOLE_PID = 1000
FIRST_WORKER_PID = 1101
OTHER_PID = 1201
RTT_MS = 1.0
MB_PER_S = 100.0


# ---------------------------------------------------------------------------------- the clock


class FixedClock:
    """The runbook's clock: starts at ``start`` and moves only when told."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------- stand-ins


class StandIns:
    """Replaces what differs on every run (pids, port, folder, measured times) with fixed values.

    Args:
        root: the scenario's federation folder (shown as ``/srv/fl``).
        console_pid: this process (shown as 1000).
    """

    def __init__(self, root: Path, console_pid: int | None = None) -> None:
        self.roots = sorted({str(root), os.path.realpath(root)}, key=len, reverse=True)
        self.ports: set[int] = set()
        self.pids: dict[int, int] = {console_pid or os.getpid(): CONSOLE_PID}
        self._workers = FIRST_WORKER_PID
        self._others = OTHER_PID
        self._lock = threading.Lock()

    def pid(self, pid: int, worker: bool = False) -> int:
        with self._lock:
            if pid not in self.pids:
                if worker:
                    self.pids[pid], self._workers = self._workers, self._workers + 1
                else:
                    self.pids[pid], self._others = self._others, self._others + 1
            return self.pids[pid]

    _PID = re.compile(r"\b(pids?) (\d+)")
    _WORKER = re.compile(r"worker started \(pid (\d+)")
    _GAVE_UP = re.compile(r"gave up after \d+ attempts? in [\d.]+ s")
    _RETRY_IN = re.compile(r"retrying in [\d.]+ s")
    _MBPS = re.compile(r"[\d.]+ MB in [\d.]+ s \([\d.]+ MB/s\)")
    _MS = re.compile(r"in \d+(\.\d+)? ms\b")
    _TOKEN = re.compile(r"\btoken: [0-9a-f]{8}\.\.\.")

    def text(self, text: str) -> str:
        """A message with the stand-ins in place of the real values."""
        if not text:
            return text
        for root in self.roots:
            text = text.replace(root, STAND_IN_ROOT)
        for port in self.ports:
            text = re.sub(
                rf"(127\.0\.0\.1|localhost|\[::1\]):{port}\b", rf"\1:{STAND_IN_PORT}", text
            )
        for match in self._WORKER.finditer(text):
            self.pid(int(match.group(1)), worker=True)
        text = self._PID.sub(lambda m: f"{m.group(1)} {self.pid(int(m.group(2)))}", text)
        text = self._GAVE_UP.sub("gave up after N attempts in T s", text)
        text = self._RETRY_IN.sub("retrying in T s", text)
        text = self._MBPS.sub("N MB in T s (N MB/s)", text)
        text = self._TOKEN.sub("token: 0123abcd...", text)
        return self._MS.sub("in T ms", text)

    def event(self, event: E, ts: float) -> E:
        """``event`` stamped ``ts``, with stand-ins (a new event; events are frozen)."""
        changes: dict[str, Any] = {"ts": ts}
        if isinstance(event, RunChanged) and event.pid is not None:
            changes["pid"] = self.pid(event.pid, worker=True)
        if isinstance(event, HeartbeatAcknowledged):
            changes["rtt_ms"] = RTT_MS
        if isinstance(event, ModelTransferred) and event.seconds > 0:  # 0: not measured
            changes["seconds"] = event.nbytes / (MB_PER_S * 1e6)
        if isinstance(event, GpuSampled) and event.gpus:
            changes["gpus"] = [self._gpu(g) for g in event.gpus]
        if isinstance(event, SiteConfigured):
            changes["workspace"] = self.text(event.workspace)
        if isinstance(event, SitePulse):  # a service's pulse: its worker, and when it last spoke
            if event.worker_pid is not None:
                changes["worker_pid"] = self.pid(event.worker_pid, worker=True)
            if event.worker_seen is not None:
                changes["worker_seen"] = ts
        if isinstance(event, StateSnapshot):
            changes["state"] = self.snapshot(event.state, ts)
        for name in ("message", "detail", "server"):
            value = getattr(event, name, None)
            if isinstance(value, str):
                changes[name] = self.text(value)
        return dataclasses.replace(event, **changes)

    # A site service's state, as it sends it to a console that attaches: every time in it is
    # the service's clock, every path and pid the real one.
    _TIMES = ("registered_at", "last_heartbeat", "pulse_at", "worker_seen", "train_started")
    _TEXTS = (
        "workspace",
        "server",
        "connection_detail",
        "last_error",
        "outcome_detail",
        "recovery",
        "validation_progress",
    )

    def snapshot(self, state: dict[str, Any], ts: float) -> dict[str, Any]:
        """A service's state snapshot at ``ts``: its times are ``ts``, stand-ins put in."""
        out = dict(state)
        for name in self._TIMES:
            if out.get(name) is not None:
                out[name] = ts
        for name in self._TEXTS:
            if isinstance(out.get(name), str):
                out[name] = self.text(out[name])
        if out.get("worker_pid") is not None:
            out["worker_pid"] = self.pid(int(out["worker_pid"]), worker=True)
        if out.get("heartbeat_rtt_ms") is not None:
            out["heartbeat_rtt_ms"] = RTT_MS
        out["gpu"] = None  # the runbook steps its own samples (see RunbookBridge)
        for name in ("logs", "requests"):
            events = []
            for data in out.get(name) or []:
                try:
                    events.append(self.event(event_from_dict(data), ts).to_dict())
                except (KeyError, ValueError, TypeError):
                    events.append(data)
            out[name] = events
        return out

    def _gpu(self, gpu: dict[str, Any]) -> dict[str, Any]:
        procs = [
            {**p, "pid": self.pid(int(p["pid"]))} if p.get("pid") else p
            for p in gpu.get("processes", [])
        ]
        return {**gpu, "processes": procs}

    def describe(self) -> str:
        return (
            f"process ids (this console {CONSOLE_PID}, training workers {FIRST_WORKER_PID}, "
            f"{FIRST_WORKER_PID + 1}, …, others from {OTHER_PID}), the server's port "
            f"({STAND_IN_PORT}), the workspace folder (`{STAND_IN_ROOT}`), heartbeat round trips "
            f"({RTT_MS:.1f} ms), transfer speeds ({MB_PER_S:.0f} MB/s), and retry counts and "
            "delays in messages (N, T), session token prefixes (`0123abcd...`)"
        )
