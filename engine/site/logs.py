"""A site's workspace logs: ``logs/fltui.log`` (human) and ``logs/events.jsonl`` (events)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import IO, Any

from engine.events import Event, EventBus, EventLogHandler

__all__ = ["attach_workspace_logs"]


class _JsonlWriter:
    """Appends every event as one JSON line to a file (``logs/events.jsonl``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_dict(), default=str)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _NotServer(logging.Filter):
    # A site's handlers sit on "engine"; the embedded server's records have their own files.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("engine.server")


def attach_workspace_logs(root: Path, bus: EventBus, site: str) -> Any:
    """Writes ``logs/fltui.log`` (human) and ``logs/events.jsonl`` (events) under ``root``.

    For site "server" the records of ``engine.server`` and the events of the server are kept;
    for a site, every other engine record and the site's own events. Engine log records also
    become LogRecord events on ``bus``.

    Returns:
        a function that detaches and closes everything.
    """
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(logs / "fltui.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    event_handler = EventLogHandler(bus, site)
    logger = logging.getLogger("engine.server" if site == "server" else "engine")
    logging.getLogger("engine").setLevel(logging.INFO)
    for handler in (file_handler, event_handler):
        if site != "server":
            handler.addFilter(_NotServer())
        logger.addHandler(handler)
    writer = _JsonlWriter(logs / "events.jsonl")

    def mine(event: Event) -> None:
        if event.site == site:
            writer(event)

    unsubscribe = bus.subscribe(mine)

    def detach() -> None:
        logger.removeHandler(file_handler)
        logger.removeHandler(event_handler)
        file_handler.close()
        unsubscribe()
        writer.close()

    return detach
