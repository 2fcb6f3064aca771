"""Big models over loopback, corrupt streams at both ends, retries, compression."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from engine import serde
from engine.client import DirectFederatedClient, FLCommunicationError
from engine.config import ServerEndpoint
from engine.events import ConnectionChanged, EventBus
from engine.rpc import SERVICE, FederatedStub
from protos import federated_pb2 as pb
from tests.conftest import TASK, DictModel, Recorder, direct_client, endpoint

ROOT = Path(__file__).resolve().parents[2]

# One phase of the 300 MB test, in a fresh process: a server and a client sharing it, as a site
# and the reference server share nothing but this test. Its peak memory is the kernel's own
# high-water mark (VmHWM), reset to the current RSS just before the phase where the kernel lets
# us (/proc/self/clear_refs "5"); where it does not, the peak since the process started is
# counted, which only overstates what the phase took.
PHASE = r"""
import json
import sys
from pathlib import Path

import numpy as np

from engine.client import DirectFederatedClient
from engine.config import ServerConfig, ServerEndpoint
from engine.server import FederatedServer


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no " + key)


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


phase, workspace, task = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
size = 300 * 1000 * 1000
rng = np.random.default_rng(0)
model = {
    "big": rng.standard_normal(size // 4 - 1000, dtype=np.float32),
    "small": rng.standard_normal(1000, dtype=np.float32),
}
config = ServerConfig(task_name=task, target="127.0.0.1:0", min_num_clients=1, num_rounds=2)
server = FederatedServer(config, workspace, model, long_poll=0.5)
server.start()
try:
    endpoint = ServerEndpoint(name=task, target=f"127.0.0.1:{server.port}")
    client = DirectFederatedClient("site-a", {}, False, [endpoint], retry_timeout=30)
    client.connect_to_server({"heart_beat": False})
    if phase == "pull":
        exact = reset_peak()
        before = status("VmRSS")
        got = client.pull_models_from_server()
        growth = status("VmHWM") - before
        result = {"same": bool(np.array_equal(got["big"], model["big"]))}
    else:
        delta = {"big": np.ones_like(model["big"]), "small": np.ones_like(model["small"])}
        exact = reset_peak()
        before = status("VmRSS")
        client.push_models_to_server(delta, {"n_iter": 1})
        growth = status("VmHWM") - before
        small = server.global_model["small"]
        result = {
            "round": server.current_round,
            "small": bool(np.allclose(small, model["small"] + 1, rtol=1e-6)),
        }
finally:
    server.stop(grace=0)
print(json.dumps({"growth": growth, "exact": exact, **result}))
"""


def _phase(phase: str, workspace: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        # glibc's default mmap threshold, kept fixed: a freed 1 MiB frame goes back to the system
        # at once. (By default the threshold rises after the first frees, and how many freed
        # frames each thread's arena then keeps varies from run to run: 30 to 90 MB more peak.)
        # The peak is then what the code holds: the model, one buffer per tensor, the frames
        # in flight.
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    out = subprocess.run(
        [sys.executable, "-c", PHASE, phase, str(workspace), TASK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _grew(phase: str, result: dict[str, Any]) -> str:
    since = "its start" if result["exact"] else "the process started (no clear_refs here)"
    return f"{phase} grew the peak RSS by {result['growth'] / 1e6:.0f} MB since {since}"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_300_mb_model_streams_both_ways_with_bounded_memory(tmp_path: Path) -> None:
    size = 300 * 1000 * 1000
    pull = _phase("pull", tmp_path / "pull")
    assert pull["same"]
    # server and client share the process: what grew is the client's one buffer per tensor
    # plus the frames in flight on both sides
    assert pull["growth"] < 1.3 * size, _grew("pull", pull)
    push = _phase("push", tmp_path / "push")
    assert push["growth"] < 1.3 * size, _grew("push", push)
    assert push["round"] == 1 and push["small"]


def test_the_reply_to_the_last_upload_of_a_round_comes_after_the_round_closed(
    start_server, monkeypatch
) -> None:
    """The server's monitor thread may take the round's close between an upload's fold and its
    reply; the reply still waits for the close (it came first, then a site saw round 0)."""
    server = start_server({"w": np.zeros(1000, np.float32)}, min_num_clients=1, num_rounds=2)
    client = direct_client(server, "site-a")
    client.pull_models_from_server()
    real_close, real_persist = server._maybe_close_round, server._persist

    def slow_persist(*args):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # a big model's fsync
        return real_persist(*args)

    def monitor_first() -> None:  # the race, made certain: another thread closes first
        if threading.current_thread().name == "fl-monitor":
            return real_close()
        rnd = server._round
        other = threading.Thread(target=real_close, name="monitor-stand-in")
        other.start()
        deadline = time.monotonic() + 60
        while not rnd.closing and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rnd.closing, "the stand-in never took the round's close"
        real_close()  # sees the round closing: returns at once
        threads.append(other)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(server, "_persist", slow_persist)
    monkeypatch.setattr(server, "_maybe_close_round", monitor_first)
    client.push_models_to_server({"w": np.ones(1000, np.float32)}, {"n_iter": 1})
    assert server.current_round == 1
    for thread in threads:
        thread.join(5)
    np.testing.assert_array_equal(server.global_model["w"], 1)


def _raw_contribution(token: str, frames: list[bytes]) -> Iterator[bytes]:
    yield from frames


def test_corrupt_upload_is_refused_by_variable_and_the_global_model_is_untouched(
    start_server,
) -> None:
    init = {"w": np.zeros(300_000, np.float32), "b": np.zeros(3, np.float32)}
    server = start_server(init, min_num_clients=1, num_rounds=2)
    client = direct_client(server, "site-a")
    client.pull_models_from_server()
    header = pb.Contribution(
        client=pb.ClientState(
            client_name="site-a", token=client.token, meta=pb.ModelMetaData(task=TASK)
        ),
        n_iter=1,
        type="delta_w",
        contribution_id="c-1",
    )
    frames = list(
        serde.encode_model_stream(
            header, {"w": np.ones(300_000, np.float32), "b": np.ones(3, np.float32)}
        )
    )
    stub = FederatedStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    cases = [
        (frames[:2], r"'w'.*truncated"),  # cut inside "w"
        ([frames[0], frames[2], frames[1], *frames[3:]], r"'w'.*offset"),
        (frames[:2] + frames[3:], r"'w'.*incomplete"),
        (frames[:-1], r"truncated"),  # every tensor complete, the end frame missing
    ]
    for broken, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitUpdate(iter(broken))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, info.value.details()), info.value.details()
    assert server.current_round == 0
    np.testing.assert_array_equal(server.global_model["w"], 0)
    # the intact stream with the same contribution id is then accepted, once
    assert "Received" in stub.SubmitUpdate(iter(frames)).comment
    assert server.current_round == 1


class _HostileServer:
    """A real gRPC server answering GetModel with a broken stream (test double of a bad peer)."""

    def __init__(self, frames: list[bytes], stall: bool = False) -> None:
        self.calls = 0
        self.stalled = threading.Semaphore(0)  # released each time a download has its frames

        def get_model(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self.calls += 1
            yield from frames
            if stall:
                self.stalled.release()
            while stall and context.is_active():  # a download that never finishes
                time.sleep(0.01)

        def register(request: bytes, context: grpc.ServicerContext) -> bytes:
            return pb.FederatedSummary(token="t").SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetModel": grpc.unary_stream_rpc_method_handler(get_model),
                "Register": grpc.unary_unary_rpc_method_handler(register),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_corrupt_download_is_refused_and_the_local_model_is_untouched() -> None:
    model = {"w": np.full(400_000, 5, np.float32), "b": np.ones(2, np.float32)}
    good = list(serde.encode_model_stream(pb.CurrentModel(meta=pb.ModelMetaData(task=TASK)), model))
    hostile = _HostileServer(good[:2] + good[3:])  # a chunk of "w" goes missing
    local = DictModel({"w": np.zeros(400_000, np.float32), "b": np.zeros(2, np.float32)})
    client = DirectFederatedClient(
        "site-a",
        {},
        False,
        [ServerEndpoint(name=TASK, target=f"127.0.0.1:{hostile.port}")],
        retry_timeout=1,
        model_reader_writer=local,
    )
    try:
        client.connect_to_server({"heart_beat": False})
        with pytest.raises(FLCommunicationError, match=r"refused: variable 'w': incomplete"):
            client.pull_models()
        np.testing.assert_array_equal(local.weights["w"], 0)
        np.testing.assert_array_equal(local.weights["b"], 0)
    finally:
        hostile.server.stop(0)


def test_an_abort_cancels_a_download_in_flight_and_does_so_again_after_a_new_start() -> None:
    model = {"w": np.ones(600_000, np.float32)}
    header = pb.CurrentModel(meta=pb.ModelMetaData(task=TASK))
    frames = list(serde.encode_model_stream(header, model))
    hostile = _HostileServer(frames[:2], stall=True)  # the header and one chunk, then nothing
    client = DirectFederatedClient(
        "site-a",
        {},
        False,
        [ServerEndpoint(name=TASK, target=f"127.0.0.1:{hostile.port}")],
        retry_timeout=60,
    )
    try:
        client.connect_to_server({"heart_beat": False})
        for attempt in (1, 2):  # the second after the site cleared stop for its next run
            client.stop_event.clear()
            done: list[BaseException] = []

            def pull(done: list[BaseException] = done) -> None:
                try:
                    client.pull_models_from_server()
                except BaseException as exc:
                    done.append(exc)

            puller = threading.Thread(target=pull)
            puller.start()
            # in the stream now: the server sent what it will and holds the call open
            assert hostile.stalled.acquire(timeout=60), f"download {attempt} never started"
            assert puller.is_alive() and hostile.calls == attempt
            client.stop_event.set()
            # the download never ends by itself (nor within retry_timeout): only the abort
            # can end it; how fast it does is a speed target for bench/, not a test
            puller.join(30)
            assert not puller.is_alive(), f"abort {attempt} did not cancel the download"
            assert isinstance(done[0], FLCommunicationError) and "aborted" in str(done[0])
    finally:
        hostile.server.stop(0)


class _Clock:
    """A clock the test moves by hand (for ``time.perf_counter``/``time.monotonic``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _TimeWith:
    """The ``time`` module as a module under test sees it, with some functions replaced."""

    def __init__(self, **fakes: Any) -> None:
        self.__dict__.update(fakes)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_download_is_timed_from_its_messages_and_one_message_is_not_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.client import communicator
    from engine.client.communicator import _Timed

    clock = _Clock()  # the transfer and the consumer take exactly what the test says
    monkeypatch.setattr(communicator, "time", _TimeWith(perf_counter=clock))
    one = _Timed(iter([b"x" * 100]))
    assert list(one) == [b"x" * 100] and one.seconds == 0.0  # "in one message", no speed

    def paced(messages: list[bytes], gap: float) -> Iterator[bytes]:
        """The network: ``gap`` seconds between messages."""
        for i, message in enumerate(messages):
            if i:
                clock.now += gap
            yield message

    timed = _Timed(paced([b"a" * 100, b"b" * 300], 0.05))
    list(timed)
    # 300 bytes took 50 ms after the first message: the 400 took 50 * 4/3 ms
    assert timed.seconds == pytest.approx(0.05 * 400 / 300)
    assert _Timed(iter([])).seconds == 0.0

    # The consumer's work on the first message is not in the span (it carries none of the
    # bytes counted); a big first message and a tiny tail is not extrapolated at all.
    def slow_consumer(messages: list[bytes]) -> _Timed:
        timed = _Timed(paced(messages, 0.01))
        for message in timed:
            if len(message) > 1000:
                clock.now += 0.2  # decoding a big message
        return timed

    assert slow_consumer([b"x" * 1_114_076, b"y" * 10]).seconds == 0.0
    even = slow_consumer([b"x" * 1100, b"y" * 900])
    # the second message came 10 ms after the first: the 2000 bytes took 10 * 2000/900 ms; were
    # the first one's 200 ms of decoding in, this were 0.21 * 2000 / 900 = 0.47 s
    assert even.seconds == pytest.approx(0.01 * 2000 / 900)


class _SleepOnClock(threading.Event):
    """A stop event whose waits move ``clock`` instead of taking time (stop is never set)."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "an unbounded wait while retrying"
        self.waits.append(timeout)
        self.clock.now += timeout
        return self.is_set()


def test_unreachable_server_is_retried_with_backoff_then_given_up_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.client import communicator

    # The retry budget is spent on the communicator's clock, which only the back-off moves:
    # however long a refused connection takes here, the same attempts are made.
    clock = _Clock()
    monkeypatch.setattr(communicator, "time", _TimeWith(monotonic=clock))
    bus = EventBus()
    rec = Recorder(bus)
    with socket_port() as port:
        pass  # a port nobody listens on
    client = DirectFederatedClient(
        "site-a",
        {},
        False,
        [ServerEndpoint(name=TASK, target=f"127.0.0.1:{port}")],
        retry_timeout=1.5,
        bus=bus,
    )
    stop = _SleepOnClock(clock)
    monkeypatch.setattr(client.communicator, "stop", stop)
    with pytest.raises(
        FLCommunicationError, match=r"gave up after (\d+) attempts.*retry_timeout 1.5 s"
    ) as info:
        client.connect_to_server({"heart_beat": False})
    attempts = int(re.search(r"gave up after (\d+) attempts", str(info.value))[1])  # type: ignore[index]
    retries = [e for e in rec.of(ConnectionChanged) if e.state == "retrying"]
    assert len(retries) >= 2 and len(retries) == attempts - 1 == len(stop.waits)
    # with back-off: each wait longer than the one before, all within the budget
    assert stop.waits == sorted(stop.waits)
    assert sum(stop.waits) <= 1.5
    assert rec.of(ConnectionChanged)[-1].state == "failed"


def test_refusals_are_not_retried(start_server) -> None:
    server = start_server({"w": np.zeros(2, np.float32)}, max_num_clients=1)
    direct_client(server, "site-a")
    bus = EventBus()
    rec = Recorder(bus)
    second = DirectFederatedClient(
        "site-b", {}, False, [endpoint(server)], retry_timeout=30, bus=bus
    )
    with pytest.raises(FLCommunicationError, match="Maximum number of clients"):
        second.connect_to_server({"heart_beat": False})
    assert not [e for e in rec.of(ConnectionChanged) if e.state == "retrying"]


@pytest.mark.parametrize("compression", ["Gzip", "Deflate"])
def test_compressed_channels_carry_models(start_server, compression: str) -> None:
    init = {"w": np.arange(500_000, dtype=np.float32)}
    server = start_server(init, min_num_clients=1, num_rounds=1, compression=compression)
    client = direct_client(server, "site-a", compression=compression)
    got = client.pull_models_from_server()
    np.testing.assert_array_equal(got["w"], init["w"])
    client.push_models_to_server({"w": np.ones(500_000, np.float32)})
    np.testing.assert_array_equal(server.global_model["w"], init["w"] + 1)


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_small_model_is_one_message_each_way_and_every_site_gets_the_same_bytes(
    start_server, monkeypatch
) -> None:
    from engine.server import fed_server

    encoded: list[int] = []
    real_encode = serde.encode_model_stream

    def counting(header, params, **kw):  # type: ignore[no-untyped-def]
        if isinstance(header, pb.CurrentModel):  # the server's, not this test's uploads
            encoded.append(int(header.meta.current_round))
        return real_encode(header, params, **kw)

    monkeypatch.setattr(fed_server.serde, "encode_model_stream", counting)
    init = {"w": np.arange(50_000, dtype=np.float32), "b": np.zeros(3, np.float32)}
    server = start_server(init, min_num_clients=2, num_rounds=2)
    a, b = direct_client(server, "site-a"), direct_client(server, "site-b")
    stub = FederatedStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))

    def download(client) -> list[bytes]:
        state = pb.ClientState(
            client_name=client.client_name, token=client.token, meta=pb.ModelMetaData(task=TASK)
        )
        return list(stub.GetModel(state))

    got_a, got_b = download(a), download(b)
    assert len(got_a) == 1  # header, two chunks and the end in one batch
    assert pb.ModelChunk.FromString(got_a[0]).WhichOneof("part") == "batch"
    assert got_a == got_b
    assert download(a) == got_a
    assert encoded == [0]  # three downloads of round 0's model, one encoding
    _, params = serde.decode_model_stream(got_a, pb.CurrentModel)
    np.testing.assert_array_equal(params["w"], init["w"])
    # an upload in one batch message is received and counted
    for client, value in ((a, 1.0), (b, 3.0)):
        header = pb.Contribution(
            client=pb.ClientState(
                client_name=client.client_name,
                token=client.token,
                meta=pb.ModelMetaData(task=TASK),
            ),
            n_iter=1,
            type="delta_w",
            contribution_id=f"c-{client.client_name}",
        )
        delta = {k: np.full_like(v, value) for k, v in init.items()}
        messages = list(serde.encode_model_stream(header, delta, batch=True))
        assert len(messages) == 1
        assert "Received" in stub.SubmitUpdate(iter(messages)).comment
    assert server.current_round == 1
    np.testing.assert_allclose(server.global_model["w"], init["w"] + 2.0)
    # the next round's model is a new encoding (new meta, new values)
    again = download(a)
    assert again != got_a and encoded == [0, 1]
    _, params = serde.decode_model_stream(again, pb.CurrentModel)
    np.testing.assert_allclose(params["w"], init["w"] + 2.0)
