"""A TCP proxy for fault tests: forwards loopback connections and breaks them on request.

Sites talk to the proxy's port; the proxy forwards each connection to the server's port (which
may change: a restarted server listens elsewhere). Faults, counted per connection in bytes
forwarded after the fault was armed:

- ``cut_after(direction, n)``: the first connection to forward ``n`` bytes that way is broken
  right there, by a close (FIN) or a reset (RST);
- ``stall_after(direction, n)``: connections stop forwarding that way after ``n`` bytes, holding
  the rest, until ``release()``;
- ``delay(seconds)``: every chunk waits before it is forwarded;
- ``cut_all()`` / ``reset_all()``: break every open connection now.

``direction`` is ``"up"`` (site to server) or ``"down"`` (server to site). Plain threads and
sockets; nothing here knows gRPC.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 64 * 1024
DIRECTIONS = ("up", "down")


@dataclass
class _Rule:
    kind: str  # "cut" or "stall"
    direction: str
    nbytes: int
    how: str = "close"
    base: dict[int, int] = field(default_factory=dict)  # link id -> its count when armed
    fired: threading.Event = field(default_factory=threading.Event)
    links: list[int] = field(default_factory=list)  # the links it broke or stalled


class _Link:
    """One proxied connection: a client socket, an upstream socket, two pump threads."""

    def __init__(self, proxy: FaultProxy, ident: int, client: socket.socket) -> None:
        self.proxy, self.id, self.client = proxy, ident, client
        self.upstream: socket.socket | None = None
        self.count = {"up": 0, "down": 0}
        self.closed = threading.Event()

    def start(self, target: tuple[str, int]) -> None:
        try:
            self.upstream = socket.create_connection(target, timeout=5)
            self.upstream.settimeout(None)
        except OSError:
            self.break_(how="close")  # the server is down: the site sees the connection drop
            return
        for direction, src, dst in (
            ("up", self.client, self.upstream),
            ("down", self.upstream, self.client),
        ):
            threading.Thread(
                target=self._pump,
                args=(direction, src, dst),
                name=f"proxy-{self.id}-{direction}",
                daemon=True,
            ).start()

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                self.break_(how="close")
                return
            if not self.proxy._forward(self, direction, data, dst):
                return

    def send(self, dst: socket.socket, data: bytes) -> bool:
        try:
            dst.sendall(data)
        except OSError:
            self.break_(how="close")
            return False
        return True

    def break_(self, how: str) -> None:
        """Closes both sides: ``close`` sends FIN, ``reset`` sends RST."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                if how == "reset":
                    # Linger on, timeout 0: the last close discards the buffers and sends RST.
                    # SHUT_RD sends nothing; it wakes the pump blocked in recv(), whose hold on
                    # the socket would otherwise delay the close (and the RST) indefinitely.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, with faults on request.

    Args:
        target_port: where connections go (``set_target`` changes it for new connections).
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._rules: list[_Rule] = []
        self._delay = 0.0
        self._released = threading.Event()
        self._released.set()
        self._next_id = 0
        self._stopped = threading.Event()
        self.accepted = 0
        self.bytes = {"up": 0, "down": 0}
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stopped.set()
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut_all()

    def set_target(self, port: int) -> None:
        """New connections go to ``port`` (a restarted server); open ones stay as they are."""
        with self._lock:
            self._target = ("127.0.0.1", port)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._next_id += 1
                link = _Link(self, self._next_id, client)
                self._links[link.id] = link
                self.accepted += 1
                target = self._target
            link.start(target)

    # ------------------------------------------------------------------ faults

    def _arm(self, rule: _Rule) -> _Rule:
        if rule.direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {rule.direction!r}")
        with self._lock:
            rule.base = {i: link.count[rule.direction] for i, link in self._links.items()}
            self._rules.append(rule)
        return rule

    def cut_after(self, direction: str, nbytes: int, how: str = "close") -> threading.Event:
        """Breaks the first connection that forwards ``nbytes`` more bytes in ``direction``.

        Returns:
            an event set once it happened (one connection, once).
        """
        if how not in ("close", "reset"):
            raise ValueError(f"how must be 'close' or 'reset', got {how!r}")
        return self._arm(_Rule("cut", direction, nbytes, how)).fired

    def stall_after(self, direction: str, nbytes: int) -> threading.Event:
        """Connections stop forwarding ``direction`` after ``nbytes`` more, until ``release``.

        Returns:
            an event set once a connection stalled.
        """
        self._released.clear()
        return self._arm(_Rule("stall", direction, nbytes)).fired

    def release(self) -> None:
        """Stalled connections forward what they held and carry on; stall rules end."""
        with self._lock:
            self._rules = [r for r in self._rules if r.kind != "stall"]
        self._released.set()

    def delay(self, seconds: float) -> None:
        """Every chunk from now on waits ``seconds`` before it is forwarded (0: none)."""
        self._delay = seconds

    def cut_all(self, how: str = "close") -> int:
        """Breaks every open connection; returns how many."""
        with self._lock:
            links = [link for link in self._links.values() if not link.closed.is_set()]
        for link in links:
            link.break_(how)
        return len(links)

    def reset_all(self) -> int:
        return self.cut_all("reset")

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(not link.closed.is_set() for link in self._links.values())

    # ------------------------------------------------------------------ forwarding

    def _forward(self, link: _Link, direction: str, data: bytes, dst: socket.socket) -> bool:
        """Forwards one chunk under the rules; False once the link is broken."""
        if self._delay:
            time.sleep(self._delay)
        action: tuple[_Rule, int] | None = None
        with self._lock:
            seen_total = link.count[direction]
            for rule in self._rules:
                if rule.direction != direction or (rule.kind == "cut" and rule.fired.is_set()):
                    continue
                seen = seen_total - rule.base.get(link.id, 0)
                if seen + len(data) >= rule.nbytes:
                    split = max(0, rule.nbytes - seen)
                    if action is None or split < action[1]:
                        action = (rule, split)
            if action is not None and action[0].kind == "cut":
                action[0].fired.set()  # claimed by this link: one connection per cut
                action[0].links.append(link.id)
            count = len(data) if action is None else action[1]
            link.count[direction] += count
            self.bytes[direction] += count
        if action is None:
            return link.send(dst, data)
        rule, split = action
        if split and not link.send(dst, data[:split]):
            return False
        if rule.kind == "cut":
            link.break_(rule.how)
            return False
        if link.id not in rule.links:
            rule.links.append(link.id)
        rule.fired.set()
        while not self._released.wait(0.05):
            if link.closed.is_set() or self._stopped.is_set():
                return False
        rest = data[split:]
        with self._lock:
            link.count[direction] += len(rest)
            self.bytes[direction] += len(rest)
        return link.send(dst, rest) if rest else True
