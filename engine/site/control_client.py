"""The control socket's client: a console's or ``fltui ctl``'s connection to the site service."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.site.control_protocol import MAX_LINE, PROTOCOL
from engine.site.lock import ActionError, NoService, ServiceError

__all__ = ["ControlClient"]


class ControlClient:
    """A connection to a service's control socket (consoles and ``fltui ctl``).

    Events and the snapshot go to ``on_message``, on the client's reader thread; ``call`` sends an
    action and waits for its reply.
    """

    def __init__(
        self, path: str | Path, on_message: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path = str(path)
        self.on_message = on_message
        self.hello: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next = 0
        self.closed_reason = ""
        self.closed = threading.Event()
        self.bye = ""  # the service said it is stopping (not a lost connection)

    def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Connects and reads the hello; raises NoService or ServiceError with the reason."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ServiceError(
                    f"not allowed to use the control socket {self.path}: it belongs to another user"
                ) from None
            raise NoService(
                f"no site service answers on {self.path}: {exc.strerror or exc}"
            ) from None
        self._file = sock.makefile("rb")
        try:
            raw = self._file.readline(MAX_LINE)
            if not raw.endswith(b"\n") and len(raw) < MAX_LINE:
                # Closed before or during the hello: a service in the moment it stops.
                raise OSError("it closed the connection before its hello")
            first = json.loads(raw)
        except OSError as exc:
            sock.close()
            raise NoService(f"the site service on {self.path} did not say hello: {exc}") from None
        except ValueError:
            first = {"answer": raw[:200].decode("utf-8", "replace")}
        if not isinstance(first, dict):
            first = {"answer": first}
        if first.get("type") == "refused":
            sock.close()
            raise ServiceError(f"the site service refused this connection: {first.get('error')}")
        if first.get("type") != "hello" or first.get("protocol") != PROTOCOL:
            sock.close()
            raise ServiceError(
                f"the process on {self.path} does not speak fltui control protocol "
                f"{PROTOCOL}: {first!r:.200}"
            )
        sock.settimeout(None)
        self._sock = sock
        self.hello = first
        threading.Thread(target=self._read_loop, name="control-client", daemon=True).start()
        return first

    def _read_loop(self) -> None:
        try:
            for raw in self._file:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if message.get("type") == "bye":
                    self.bye = str(message.get("reason") or "the site service stopped")
                    continue
                if message.get("type") == "reply" and isinstance(message.get("id"), int):
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                elif self.on_message is not None:
                    self.on_message(message)
            self.closed_reason = self.bye or "the service closed the connection"
        except OSError as exc:
            self.closed_reason = f"connection lost: {exc}"
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()
            self.close()  # the service sees our end close at once

    def call(self, name: str, *args: Any, timeout: float = 120.0) -> Any:
        """Runs an action on the service; returns its result or raises ActionError."""
        if self._sock is None or self.closed.is_set():
            raise ActionError(
                f"not connected to the site service ({self.closed_reason or 'not yet connected'})"
            )
        with self._cond:
            self._next += 1
            rid = self._next
        line = json.dumps({"op": "action", "id": rid, "name": name, "args": list(args)}) + "\n"
        try:
            self._sock.sendall(line.encode())
        except OSError as exc:
            raise ActionError(f"lost the site service: {exc}") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if self.closed.is_set():
                    raise ActionError(
                        f"lost the site service before it answered {name}: {self.closed_reason}"
                    )
                if left <= 0:
                    raise ActionError(
                        f"the site service did not answer {name} within {timeout:.0f} s"
                    )
                self._cond.wait(left)
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise ActionError(str(reply.get("error") or f"{name} failed"))
        return reply.get("result")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
