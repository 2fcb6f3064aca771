"""--no-ui: prints every engine event as a human line or as one JSON object per line."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO

from engine.events import Event, LogRecord

__all__ = ["HeadlessPrinter"]

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


class HeadlessPrinter:
    """An EventBus subscriber that writes one line per event.

    Args:
        json_lines: print ``event.to_dict()`` as JSON instead of a human line.
        stream: where to write (default stdout).
        min_log_level: LogRecord events below this level are not printed.
    """

    def __init__(
        self, json_lines: bool = False, stream: IO[str] | None = None, min_log_level: str = "INFO"
    ) -> None:
        self.json_lines = json_lines
        self.stream = stream or sys.stdout
        self.min_level = _LEVELS.get(min_log_level, 20)
        self._lock = threading.Lock()

    def format(self, event: Event) -> str:
        if self.json_lines:
            return json.dumps(event.to_dict(), default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
        return f"{stamp} {event.site or '-':<8} {event.summary()}"

    def __call__(self, event: Event) -> None:
        if isinstance(event, LogRecord) and _LEVELS.get(event.level, 20) < self.min_level:
            return
        self._write(self.format(event))

    def say(self, text: str) -> None:
        """A line from the app itself (not an engine event); in JSON mode a "Notice" object."""
        line = (
            json.dumps({"event": "Notice", "message": text, "ts": time.time()})
            if self.json_lines
            else text
        )
        self._write(line)

    def _write(self, line: str) -> None:
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the reader went away (| head); the engine carries on
