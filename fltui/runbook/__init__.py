"""``fltui runbook --out DIR``: the console drives itself through scenarios and writes a runbook.

Each scenario runs against a federation of its own on this machine: the reference server in
this process, this site's engine in this process (``LocalBridge``, as ``fltui --workspace DIR``
runs it where no service runs; or, for a scenario about the service, as a service process of its
own, ``fltui --no-ui --serve``, that the console attaches to through ``RemoteBridge``), training
in worker processes, and peers as ``fltui --no-ui`` child processes. Textual's Pilot presses
the keys an operator would; at each step the screen is saved as SVG (Textual's own) and PNG
(resvg), and a Markdown page walks through the steps.

So that a run repeats and a diff of ``docs/runbook/`` shows real changes only:

- The terminal is 140×40 and the clock is fixed: it starts at 09:00:00 UTC and moves on only
  between steps. Every event the console receives is stamped with it (log lines, requests,
  registration, heartbeats), so every time on screen comes from it.
- Values that differ on every run are replaced by fixed stand-ins, listed on each page and
  named in the header: process ids (the console 1000, workers 1101, 1102, …), the server's port
  (8002), the workspace folder (``/srv/fl``), heartbeat round trips (1.0 ms), transfer speeds
  (100 MB/s) and retry counts and delays in messages.
- Steps are taken in states that do not depend on timing: a peer is paused (SIGSTOP) while this
  site waits for it, so every round is captured after this site's contribution is in, and the
  peers' contributions arrive in the same order on every run (the same float sums).
- GPUs are sampled once per step, not on a timer. Without a GPU the pictures show the honest
  no-GPU panel; ``--simulate-gpus N`` shows a simulated feed, labelled SIMULATED on screen.

The modules, each importing only those above it in this list: ``standins`` (the fixed clock,
the stand-ins and the fixed values), ``bridge`` (the console's bridge and GPU sampler as the
runbook steps them), ``pages`` (a scenario's Markdown page, the index), ``harness`` (the
federation and the run that drives the console), ``scenarios``, ``driving`` (plays scenarios
and writes the runbook) and ``cli`` (``fltui runbook``).
"""

from __future__ import annotations

from fltui.runbook.bridge import RunbookBridge, SteppedGpu
from fltui.runbook.cli import main
from fltui.runbook.driving import generate
from fltui.runbook.scenarios import SCENARIOS, Scenario
from fltui.runbook.standins import SIZE, T0, FixedClock, StandIns

__all__ = [
    "SCENARIOS",
    "SIZE",
    "T0",
    "FixedClock",
    "RunbookBridge",
    "Scenario",
    "StandIns",
    "SteppedGpu",
    "generate",
    "main",
]
