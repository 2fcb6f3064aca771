"""A network failure is not a TLS refusal: it is retried, never reported as a refused site.

A TCP proxy or SSH tunnel whose far end is down accepts the connection and hangs up; a slow
peer accepts and says nothing. gRPC calls both "Socket closed"; neither may become a refusal
(exit 3, which the systemd unit does not restart). A real TLS refusal is the opposite: retrying
cannot help, so it is reported at once.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from engine.client import DirectFederatedClient, FLCommunicationError
from engine.client.communicator import _BACKOFF_BASE
from engine.config import ServerEndpoint
from engine.events import ConnectionChanged, Event, EventBus
from engine.tls import security_failure
from tests.faults.proxy import FaultProxy
from tests.security.conftest import TASK, Kit

CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:{t}: Socket closed"


def _listener(behaviour: str) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            if behaviour == "hang up":
                conn.close()
            else:  # "silent": keep it open, say nothing
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        sock.close()


@pytest.fixture(params=["hang up", pytest.param("silent", marks=pytest.mark.slow)])
def broken_peer(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _listener(request.param)


def test_a_peer_that_hangs_up_or_stalls_is_diagnosed_as_a_network_error(  # type: ignore[no-untyped-def]
    pki, broken_peer: str
) -> None:
    """The diagnosis alone, of the error text gRPC gave for such a peer, against a real one
    (the silent one costs the diagnosis its 2 s timeouts); the retry itself is shown below."""
    kit = pki.sites["site-a"]
    t0 = time.monotonic()
    failure = security_failure(
        grpc.StatusCode.UNAVAILABLE,
        CLOSED.format(t=broken_peer),
        broken_peer,
        secure=True,
        cert=kit.cert,
        private_key=kit.key,
    )
    assert failure is None, failure
    assert time.monotonic() - t0 < 10  # the diagnosis gives up; it does not hang the client
    # A plaintext client against the same peer: not "a TLS server" either.
    assert (
        security_failure(
            grpc.StatusCode.UNAVAILABLE, CLOSED.format(t=broken_peer), broken_peer, secure=False
        )
        is None
    )


def _free_port() -> int:
    """A loopback port nothing listens on (the far end of the proxy, down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Timeline:
    """The client's ConnectionChanged events, each with the monotonic time it was published."""

    def __init__(self, bus: EventBus) -> None:
        self.items: list[tuple[float, ConnectionChanged]] = []
        bus.subscribe(self._on)

    def _on(self, event: Event) -> None:
        if isinstance(event, ConnectionChanged):
            self.items.append((time.monotonic(), event))

    def states(self) -> list[str]:
        return [e.state for _, e in self.items]

    def times(self, state: str) -> list[float]:
        return [t for t, e in self.items if e.state == state]


def _client(kit: Kit, port: int, bus: EventBus, retry_timeout: float) -> DirectFederatedClient:
    return DirectFederatedClient(
        "site-a",
        {"ssl_args": kit.ssl_args},
        True,
        [ServerEndpoint(name=TASK, target=f"127.0.0.1:{port}")],
        retry_timeout=retry_timeout,
        bus=bus,
    )


RETRY_TIMEOUT = 20.0
DOWN_FOR = 1.0  # the proxy's far end comes back after this long


@pytest.mark.slow  # it waits DOWN_FOR, then for the backoff and gRPC's reconnection
def test_a_proxy_whose_far_end_is_down_is_retried_with_backoff_until_it_is_back(  # type: ignore[no-untyped-def]
    pki, start_secure_server
) -> None:
    server = start_secure_server()
    with FaultProxy(_free_port()) as proxy:
        # The site's TLS connection is accepted by the proxy, whose far end refuses it: the
        # proxy hangs up ("Socket closed"). The server is reached once the proxy forwards to it.
        bus = EventBus()
        timeline = _Timeline(bus)
        site = _client(pki.sites["site-a"], proxy.port, bus, RETRY_TIMEOUT)
        back = threading.Timer(DOWN_FOR, proxy.set_target, (server.port,))
        t0 = time.monotonic()
        back.start()
        try:
            # gRPC says "Handshake read failed (Socket closed)": once our own handshake with the
            # same certificate finds no refusal, that is the network's fault, retried.
            site.connect_to_server({"heart_beat": False})
            took = time.monotonic() - t0
            # Retried, not refused: registered once the far end was back, within retry_timeout.
            assert "site-a" in server.sites
        finally:
            back.cancel()
            site.close()
    states = timeline.states()
    assert "failed" not in states, timeline.items
    assert "registered" in states, states
    assert DOWN_FOR <= took < RETRY_TIMEOUT / 2, took
    tries = timeline.times("retrying")
    assert len(tries) >= 2, states
    assert proxy.accepted >= len(tries)  # each try was a real connection to the proxy
    # With backoff: each pause at least the base backoff, doubled per try; not a busy loop.
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    for i, gap in enumerate(gaps):
        assert gap >= _BACKOFF_BASE * 2**i * 0.5 * 0.9, gaps
    assert len(tries) <= 8, gaps


def test_a_tls_refusal_through_the_same_proxy_is_not_retried(  # type: ignore[no-untyped-def]
    pki, start_secure_server
) -> None:
    """The other side of the line: another federation's kit, through a proxy that forwards to
    the real server, is refused at once (no retries within the same retry_timeout)."""
    server = start_secure_server()
    with FaultProxy(server.port) as proxy:
        bus = EventBus()
        timeline = _Timeline(bus)
        stranger = _client(pki.other_ca_site, proxy.port, bus, RETRY_TIMEOUT)
        t0 = time.monotonic()
        try:
            with pytest.raises(FLCommunicationError) as info:
                stranger.connect_to_server({"heart_beat": False})
        finally:
            stranger.communicator.close()
        took = time.monotonic() - t0
        assert proxy.accepted >= 1  # it did go over the network, to the real server
    assert info.value.security and info.value.kind == "wrong_ca", info.value
    assert took < 5, took
    states = timeline.states()
    assert "retrying" not in states and states[-1] == "failed", states
    assert not server.sites
