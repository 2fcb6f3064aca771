"""The fault proxy itself: it forwards bytes unchanged, and breaks exactly where it is told."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy


class EchoServer:
    """Echoes every byte back; counts what each connection received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.received.append(0)
            threading.Thread(target=self._echo, args=(conn, len(self.received) - 1)).start()

    def _echo(self, conn: socket.socket, index: int) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received[index] += len(data)
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_bytes_pass_unchanged_both_ways(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    with FaultProxy(echo.port) as proxy, _connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = _read(sock, len(payload))
        sender.join()
        assert got == payload
        assert proxy.bytes == {"up": len(payload), "down": len(payload)}


@pytest.mark.parametrize("how", ["close", "reset"])
def test_cut_after_n_bytes_up_breaks_one_connection_exactly_there(
    echo: EchoServer, how: str
) -> None:
    with FaultProxy(echo.port) as proxy:
        with _connect(proxy) as sock:
            sock.sendall(b"x" * 1000)
            assert _read(sock, 1000) == b"x" * 1000
            fired = proxy.cut_after("up", 5000, how=how)
            with pytest.raises(OSError):
                for _ in range(100):  # the proxy breaks the connection after 5000 more bytes
                    sock.sendall(b"y" * 1000)
                    if not _read(sock, 1000):
                        raise ConnectionResetError("closed")
            assert fired.is_set()
        # exactly 1000 + 5000 bytes were forwarded on that connection, not one more
        assert proxy.bytes["up"] == 6000
        assert echo.received[0] <= 6000
        # one connection per cut: the next one is not broken
        with _connect(proxy) as sock:
            sock.sendall(b"z" * 20000)
            assert _read(sock, 20000) == b"z" * 20000


def test_stall_holds_bytes_until_release_then_delivers_all(echo: EchoServer) -> None:
    with FaultProxy(echo.port) as proxy, _connect(proxy) as sock:
        stalled = proxy.stall_after("down", 3000)
        sock.sendall(b"a" * 10000)
        assert _read(sock, 3000) == b"a" * 3000
        assert stalled.wait(5)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing more comes while stalled
        proxy.release()
        sock.settimeout(5)
        assert _read(sock, 7000) == b"a" * 7000


def test_cut_all_and_a_new_target(echo: EchoServer) -> None:
    other = EchoServer()
    try:
        with FaultProxy(echo.port) as proxy:
            sock = _connect(proxy)
            sock.sendall(b"1")
            assert _read(sock, 1) == b"1"
            assert proxy.reset_all() == 1
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
            sock.close()
            proxy.set_target(other.port)
            with _connect(proxy) as sock2:
                sock2.sendall(b"22")
                assert _read(sock2, 2) == b"22"
            assert other.received == [2]
    finally:
        other.close()


def test_a_dead_target_closes_the_accepted_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = int(s.getsockname()[1])  # closed below: nothing listens there
    with FaultProxy(port) as proxy, _connect(proxy) as sock:
        assert _read(sock, 1) == b""
