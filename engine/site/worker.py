"""Training worker: the child process a site service starts for one run (``python -m ...``).

The service writes ``<workspace>/client_token.txt`` (owner-only) with the session's token, the
run number, the site name, the port of its local control listener and that listener's key. The
worker connects to it, sends every event up (status, phase, progress, metrics) and takes
``abort`` down. Under multi-GPU training each rank is one worker: rank 0 talks to the server and
to the service; the other ranks train and follow rank 0 through ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from engine.components import set_code_policy
from engine.events import EventBus, EventLogHandler
from engine.procs import watch_parent
from engine.site.paths import read_token_file
from engine.site.policy import load_site_policy, policy_source
from engine.site.site_engine import SiteEngine
from engine.status import ClientStatus

__all__ = ["main"]

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3


class _Uplink:
    """Sends events to the service; takes commands from it (thread-safe sends)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError, ValueError):
                self.closed = True  # the service went away; training still ends on its own


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.site.worker")
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--mode", choices=("train", "validate"), default="train")
    args = parser.parse_args(argv)

    # Watch the site service before anything slow (torch import, model build) happens.
    watcher = _watch_parent()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = read_token_file(args.workspace)
    bus = EventBus()
    uplink: _Uplink | None = None
    if rank == 0:
        conn = Client(
            ("127.0.0.1", int(info["listen_port"])), authkey=bytes.fromhex(info["authkey"])
        )
        uplink = _Uplink(conn)
        bus.subscribe(lambda event: uplink.send({"event": event.to_dict()}))  # type: ignore[union-attr]
        engine_log = logging.getLogger("engine")
        engine_log.setLevel(logging.INFO)
        engine_log.addHandler(EventLogHandler(bus, str(info["client_name"])))

    import torch  # deferred: slow, so it loads once the parent watch runs

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # One site's MMAR runs in this process: its policy gates every import a component would make
    # (engine.components.own_code), whichever config or builder the component came through.
    policy = load_site_policy(args.workspace / "startup" / "site_policy.json")
    set_code_policy(
        policy.allow_byoc,
        policy_source(policy.path),
        trusted=policy.trusted_packages,
        allow_expressions=policy.expressions_allowed,
    )
    engine = SiteEngine(args.workspace, bus, int(info["run_number"]))
    if world > 1:
        engine.distributed(rank, world)
    client = engine.build()
    client.token = str(info["token"])
    client.owns_session = False

    watcher.engine = engine
    if uplink is not None:

        def commands() -> None:
            while True:
                try:
                    message = uplink.conn.recv()
                except (EOFError, OSError):
                    # The site service went away: a worker alone must not keep a GPU busy.
                    engine.abort()
                    return
                command = message.get("command")
                if command == "abort":
                    engine.abort()
                elif command == "check_status" and engine.client is not None:
                    uplink.send(
                        {"status_reply": ClientStatus.get_status_message(engine.client.status)}
                    )

        threading.Thread(target=commands, name="worker-commands", daemon=True).start()

    outcome = engine.validate_only() if args.mode == "validate" else engine.run()
    if uplink is not None:
        uplink.send({"outcome": outcome})
    return {"completed": EXIT_COMPLETED, "aborted": EXIT_ABORTED}.get(outcome, EXIT_FAILED)


class _ParentWatch:
    engine: Any = None


def _watch_parent(period: float = 1.0, grace: float = 10.0) -> _ParentWatch:
    """Stops this worker when its site service dies (even by SIGKILL), so no orphan trains on.

    The service's pid comes from ``FLTUI_SERVICE_PID`` (set by the executor), so a service that
    died before this line ran is noticed too.
    """
    parent = int(os.environ.get("FLTUI_SERVICE_PID", os.getppid()))
    watch_state = _ParentWatch()

    def gone() -> None:
        if watch_state.engine is None:
            os._exit(EXIT_ABORTED)  # nothing built yet: nothing to stop cleanly
        watch_state.engine.abort()
        time.sleep(grace)  # time to stop cleanly; then leave regardless
        os._exit(EXIT_ABORTED)

    watch_parent(parent, gone, period, name="worker-parent-watch")
    return watch_state


if __name__ == "__main__":
    sys.exit(main())
