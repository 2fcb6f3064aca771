"""The control socket in-process: snapshot then events, bad requests, refused users, the lock."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.events import (
    CrossSiteValidated,
    EventBus,
    LogRecord,
    RoundCompleted,
    RoundStarted,
    SiteConfigured,
    StateSnapshot,
    StatusChanged,
)
from engine.site.actions import SiteActions
from engine.site.control_client import ControlClient
from engine.site.control_server import ControlServer
from engine.site.lock import (
    ActionError,
    NoService,
    ServiceError,
    WorkspaceBusy,
    WorkspaceLock,
    control_socket_path,
    find_service,
)
from engine.site.runner import ServiceHost
from engine.site.state import SiteState
from engine.status import ClientStatus

SITE = "site-7"


class Messages:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.cond:
            self.items.append(message)
            self.cond.notify_all()

    def wait_for(self, check: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not check(self.items):
                left = deadline - time.monotonic()
                assert left > 0, f"not received in time; got {self.items!r:.500}"
                self.cond.wait(left)
            return list(self.items)


def _server(tmp_path: Path, bus: EventBus, **kw: Any) -> ControlServer:
    stopped = threading.Event()
    actions = SiteActions(tmp_path, lambda: None, lambda: SITE)
    server = ControlServer(
        tmp_path / "ctl" / "control.sock",
        bus,
        actions,
        {"pid": os.getpid(), "site": SITE, "mode": "service"},
        stopped.set,
        site=SITE,
        **kw,
    )
    server.stopped = stopped  # type: ignore[attr-defined]
    server.start()
    return server


def _events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["event"] for m in messages if m["type"] == "event"]


def test_a_client_gets_the_state_so_far_then_every_later_event_once(tmp_path: Path) -> None:
    bus = EventBus()
    server = _server(tmp_path, bus)
    try:
        bus.publish(
            SiteConfigured(site=SITE, server="h:1", tls=True, workspace="/w", executor="process")
        )
        bus.publish(
            StatusChanged(site=SITE, status=ClientStatus.TRAINING_STARTED, message="started")
        )
        bus.publish(RoundStarted(site=SITE, round=3, num_rounds=10))
        bus.publish(RoundCompleted(site=SITE, round=3, num_rounds=10, metrics={"acc": 0.5}))
        bus.publish(CrossSiteValidated(site=SITE, model_owner="server", metrics={"acc": 0.7}))
        bus.publish(RoundStarted(site="site-9", round=8, num_rounds=10))  # another site: not sent
        first, second = Messages(), Messages()
        a = ControlClient(server.path, first)
        hello = a.connect()
        assert hello["site"] == SITE and hello["pid"] == os.getpid()
        snapshot = first.wait_for(lambda m: m)[0]
        assert snapshot["type"] == "snapshot"
        state = SiteState.from_dict(json.loads(json.dumps(snapshot["state"])))
        assert (state.round, state.num_rounds, state.tls) == (3, 10, True)
        assert state.status == ClientStatus.TRAINING_STARTED
        assert state.round_metrics == [(3, {"acc": 0.5})]
        assert state.validation == {"server": {"acc": 0.7}}  # the last cross-site validation
        # the console folds the snapshot in as one event: every part redraws
        console = SiteState(site=SITE)
        assert console.apply(StateSnapshot(site=SITE, state=snapshot["state"])) >= {
            "header",
            "client",
            "round",
        }
        assert console.round == 3
        bus.publish(RoundStarted(site=SITE, round=4, num_rounds=10))
        b = ControlClient(server.path, second)
        b.connect()
        for n in range(50):
            bus.publish(LogRecord(site=SITE, level="INFO", logger="t", message=f"line {n}"))
        bus.publish(RoundStarted(site="site-9", round=9, num_rounds=10))
        first.wait_for(lambda m: len(_events(m)) == 51)
        got_b = second.wait_for(lambda m: len(_events(m)) == 50)
        assert got_b[0]["type"] == "snapshot" and got_b[0]["state"]["round"] == 4
        # both see every event after they attached, in the same order, none twice
        assert _events(first.items)[1:] == _events(got_b)
        assert [e["message"] for e in _events(got_b)] == [f"line {n}" for n in range(50)]
        assert server.connections == 2
        a.close()
        b.close()
    finally:
        server.close()
    assert not server.path.exists()


def test_bad_requests_get_clear_errors_and_the_connection_stays_usable(tmp_path: Path) -> None:
    bus = EventBus()
    server = _server(tmp_path, bus)
    try:
        client = ControlClient(server.path)
        client.connect()
        with pytest.raises(ActionError, match="unknown action 'rm_rf'"):
            client.call("rm_rf")
        with pytest.raises(ActionError, match="still starting"):
            client.call("abort")
        with pytest.raises(ActionError, match="bad arguments for abort"):
            client.call("abort", 1, 2, 3)
        with pytest.raises(ActionError, match="run number must be a whole number"):
            client.call("deploy", "demo_mmar", "seven")
        with pytest.raises(ActionError, match="no config/ folder"):
            client.call("deploy", "nothing_here", 2)
        assert client.call("transfer_mmars") == []
        status = client.call("status")
        assert status["site"] == SITE and status["status"] == "training not started"
        # raw garbage on the wire: a reply that says what was wrong, and the service goes on
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(server.path))
        reader = raw.makefile("rb")
        assert json.loads(reader.readline())["type"] == "hello"
        assert json.loads(reader.readline())["type"] == "snapshot"
        raw.sendall(b"{not json\n")
        reply = json.loads(reader.readline())
        assert reply["ok"] is False and "bad request" in reply["error"]
        raw.sendall(b'{"op": "action", "id": 1, "name": "abort", "args": "x"}\n')
        assert "'args' must be a list" in json.loads(reader.readline())["error"]
        raw.close()
        assert client.call("shutdown") == "the site service is stopping"
        assert server.stopped.wait(5)  # type: ignore[attr-defined]
    finally:
        server.close()


def test_the_socket_is_owner_only_and_other_users_are_refused(tmp_path: Path) -> None:
    bus = EventBus()
    # A server that admits nobody but uid 4242: this process is then "another user".
    server = _server(tmp_path, bus, allowed_uids={4242})
    try:
        assert os.stat(server.path).st_mode & 0o777 == 0o600
        assert os.stat(server.path.parent).st_mode & 0o777 == 0o700
        with pytest.raises(ServiceError, match=rf"uid {os.getuid()} may not control it"):
            ControlClient(server.path).connect()
        assert server.refused == 1
        # on the wire: the refusal, then the service hangs up (no snapshot, no events)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(5)
        raw.connect(str(server.path))
        reader = raw.makefile("rb")
        assert json.loads(reader.readline())["type"] == "refused"
        bus.publish(RoundStarted(site=SITE, round=1, num_rounds=2))
        assert reader.readline() == b""
        raw.close()
    finally:
        server.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_a_real_other_user_is_refused_by_the_file_mode_and_by_its_credentials(
    tmp_path: Path,
) -> None:
    bus = EventBus()
    # pytest's own tmp folders are root-only: nobody could not even reach the socket's folder.
    base = Path(tempfile.mkdtemp(prefix="fltui-ctl-", dir="/tmp"))
    base.chmod(0o755)
    server = _server(base, bus)

    def as_nobody() -> str:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody, try to attach, report what happened
            os.close(read)
            try:
                os.setgid(65534)
                os.setuid(65534)
                ControlClient(server.path).connect()
                result = "attached"
            except ServiceError as exc:
                result = str(exc)
            except BaseException as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(write, result.encode())
            os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 20
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "the child hung"
            time.sleep(0.05)
        with os.fdopen(read, "rb") as f:
            return f.read().decode()

    try:
        assert "belongs to another user" in as_nobody()  # 0700 folder, 0600 socket
        server.path.parent.chmod(0o777)
        server.path.chmod(0o777)
        assert "uid 65534 may not control it" in as_nobody()  # the credentials check
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


# A real holder: takes the lock, says so, describes itself when told to, then waits to be killed.
_HOLDER = """
import sys
from engine.site.lock import WorkspaceLock

lock = WorkspaceLock(sys.argv[1])
lock.acquire("site-1", "service")
print("acquired", flush=True)
sys.stdin.readline()
lock.publish()
print("published", flush=True)
sys.stdin.readline()  # held until killed; it never releases the lock itself
"""


def test_one_lock_per_workspace_and_a_killed_holder_s_lock_is_freed_by_the_kernel(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "acquired\n"
        # Held, not described yet (a service starting): refused, naming the pid in the lock.
        assert find_service(tmp_path) is None  # not reachable until it publishes (socket up)
        with pytest.raises(WorkspaceBusy) as info:
            WorkspaceLock(tmp_path).acquire("site-1", "service")
        assert f"is already run by the fltui service pid {holder.pid} (starting)" in str(info.value)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "published\n"
        running = find_service(tmp_path)
        assert running is not None and running.pid == holder.pid
        # Held and described: refused with who holds it and what to do instead.
        with pytest.raises(WorkspaceBusy) as info:
            WorkspaceLock(tmp_path).acquire("site-1", "service")
        assert info.value.info == running
        message = str(info.value)
        assert message.startswith(
            f"{tmp_path.resolve()} is already run by the fltui service pid {holder.pid} "
            "(service site-1, running since "
        ), message
        assert f"`fltui --workspace {tmp_path.resolve()}`" in message
        assert f"`fltui ctl --workspace {tmp_path.resolve()} shutdown`" in message
        # SIGKILL: no release, no cleanup; its service.json and pid stay behind.
        holder.kill()
        assert holder.wait(10) == -signal.SIGKILL
        assert (tmp_path / ".fltui" / "service.json").exists()
        assert find_service(tmp_path) is None  # what it left is not taken for a service
        nxt = WorkspaceLock(tmp_path)
        taken = nxt.acquire("site-1", "service")  # at once: the kernel dropped the lock
        try:
            assert taken.pid == os.getpid()
            assert not (tmp_path / ".fltui" / "service.json").exists()  # the dead one's, gone
            nxt.publish()
            assert find_service(tmp_path) == taken
        finally:
            nxt.release()
        assert find_service(tmp_path) is None
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)
        holder.stdin.close()
        holder.stdout.close()


def test_replies_queued_before_a_close_still_arrive(tmp_path: Path) -> None:
    bus = EventBus()
    server = _server(tmp_path, bus)
    try:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(str(server.path))
        reader = raw.makefile("rb")
        assert json.loads(reader.readline())["type"] == "hello"
        assert json.loads(reader.readline())["type"] == "snapshot"
        # an oversized request: the refusal is delivered before the service hangs up
        with contextlib.suppress(BrokenPipeError):  # it stops reading once it has seen enough
            raw.sendall(b"x" * (2 << 20) + b"\n")
        refused = json.loads(reader.readline())
        assert refused["type"] == "refused" and "longer than" in refused["error"]
        assert reader.readline() == b""
        raw.close()
        # a script that sends, then half-closes at once, still gets its answer
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(str(server.path))
        raw.sendall(b'{"op": "action", "id": 7, "name": "transfer_mmars", "args": []}\n')
        raw.shutdown(socket.SHUT_WR)
        lines = [json.loads(line) for line in raw.makefile("rb")]
        assert lines[-1] == {"type": "reply", "id": 7, "ok": True, "result": []}
        raw.close()
        # a deeply nested request is refused in words, and the connection goes on
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(str(server.path))
        reader = raw.makefile("rb")
        reader.readline(), reader.readline()  # hello, snapshot
        raw.sendall(b'{"op":' + b"[" * 100_000 + b"\n")
        assert "nested too deeply" in json.loads(reader.readline())["error"]
        raw.sendall(b'{"op": "action", "id": 1, "name": "shutdown", "args": []}\n')
        assert json.loads(reader.readline())["ok"] is True
        assert server.stopped.wait(5)  # type: ignore[attr-defined]
        # once stopping: no new actions; a second shutdown is fine
        raw.sendall(b'{"op": "action", "id": 2, "name": "abort", "args": []}\n')
        assert json.loads(reader.readline())["error"] == "the service is stopping"
        raw.sendall(b'{"op": "action", "id": 3, "name": "shutdown", "args": []}\n')
        assert json.loads(reader.readline())["result"] == "already stopping"
        server.close()
        bye = json.loads(reader.readline())
        assert bye == {"type": "bye", "reason": "the site service was stopped on request"}
        raw.close()
    finally:
        server.close()


def test_deep_workspaces_get_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = control_socket_path(deep)
    assert len(os.fsencode(path)) <= 107
    assert path != deep / ".fltui" / "control.sock"
    assert control_socket_path(deep) == path  # the same for every process
    assert (
        control_socket_path(tmp_path / "w")
        == (tmp_path / "w").resolve() / ".fltui" / "control.sock"
    )


def test_a_console_that_reaches_a_dying_service_attaches_to_the_next(tmp_path: Path) -> None:
    """A killed service drops its lock and socket a moment after its pid stops answering: a
    console that connected in that moment has its connection reset, and must look again."""
    import select

    from fltui.bridge import RemoteBridge

    dying = WorkspaceLock(tmp_path)
    dying.acquire(SITE, "service")
    dying.publish()
    path = control_socket_path(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # ... and never accepts: it is being killed
    console = RemoteBridge(tmp_path, SITE)
    host = None
    try:
        console.start()
        assert select.select([listener], [], [], 5)[0], "the console never connected"
        listener.close()  # the kernel resets the connection that waited in the backlog
        dying.release()
        bus = EventBus()
        host = ServiceHost(
            tmp_path,
            bus,
            SITE,
            "service",
            SiteActions(tmp_path, lambda: None, lambda: SITE),
            on_shutdown=lambda: None,
        )
        host.open()
        assert console.ready.wait(5), console.label
        assert console.label == f"attached to service (pid {os.getpid()})"
        said = [getattr(e, "message", "") for e in console.drain()]
        assert not any("did not say hello" in m for m in said), said
    finally:
        console.stop()
        listener.close()
        if host is not None:
            host.close()
        dying.release()


def test_a_service_that_hangs_up_before_its_hello_is_no_service_and_a_stranger_is_an_error(
    tmp_path: Path,
) -> None:
    """Accepted and closed at once (a service in the moment it stops) is "no service": the
    console looks again. A process that answers something else is an error it reports."""
    path = str(tmp_path / "control.sock")
    for answer, expected, words in (
        (b"", NoService, "closed the connection before its hello"),
        (b"SSH-2.0-OpenSSH_9.2\n", ServiceError, "does not speak fltui control protocol"),
    ):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def serve(listener: socket.socket = listener, answer: bytes = answer) -> None:
            conn, _ = listener.accept()
            conn.sendall(answer)
            conn.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with pytest.raises(ServiceError, match=words) as info:
                ControlClient(path).connect(timeout=5)
            assert type(info.value) is expected
        finally:
            server.join(5)
            listener.close()
            os.unlink(path)
