#!/usr/bin/env python
"""Moving a whole model over loopback gRPC: the streamed protocol against one unary message.

Usage::

    python bench/transfer.py [--size-mb 1024] [--repeat 1] [--modes stream,unary] [--json-only]
                             [--timeout S] [--warm-pages] [--profile DIR]

Two modes, each in a fresh pair of child processes (server and client, ``spawn``), so that each
side's memory is measured on its own:

``stream``
    the real reference server (``engine.server.FederatedServer``) and the real client
    (``engine.client.DirectFederatedClient``): pull = ``pull_models_from_server()`` (the GetModel
    stream), push = ``push_models_to_server(delta, {"n_iter": 1})`` (the SubmitUpdate stream).
    The server holds round closing (FedAvg apply and the ``global_model.npz`` write) until the
    measurement of the push is over, then closes the round untimed: only the transfer is timed.
``unary``
    the baseline, the obvious implementation: a generic gRPC handler with bytes in and out, where
    pull returns one serialized ``CurrentModel`` and push sends one ``Contribution``, with every
    tensor inline (``engine.serde.ndarray_to_proto``), decoded with ``FromString`` and
    ``proto_to_ndarray``; message size limits raised.

Measured per transfer on each side: wall seconds of the call, MB/s (MB = 10^6 bytes of tensor
payload), CPU seconds, and peak RSS above the RSS just before the transfer. The peak is the
larger of the kernel's high-water mark (VmHWM, reset through ``/proc/self/clear_refs`` just
before the transfer) and a 5 ms VmRSS sampler. Everything listens on and connects to 127.0.0.1.

Output: one JSON object per line per measurement, then (unless ``--json-only``) a Markdown table,
stream/unary throughput ratios and the issue's targets (streamed >= 5x unary throughput,
>= 450 MB/s each way, peak RSS <= 1.3x model size above the pre-transfer RSS on each side).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TASK = "bench_transfer"
HOST = "127.0.0.1"
UNARY_SERVICE = "bench.Transfer"
MB = 1e6
TARGET_RATIO = 5.0
TARGET_MB_S = 450.0
TARGET_PEAK = 1.3
RPC_TIMEOUT = 600.0
# Never go through a proxy, whatever the environment says: loopback only.
NO_PROXY_OPTIONS = [("grpc.enable_http_proxy", 0)]
UNLIMITED_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    *NO_PROXY_OPTIONS,
]


# ---------------------------------------------------------------------------- model


def model_layout(size_mb: int) -> list[tuple[str, tuple[int, ...]]]:
    """A network-like dict of float32 tensors totalling exactly ``size_mb`` MiB.

    32 small tensors (biases, norms; 1024 floats each) and four large matrices of 1024 columns.
    """
    if size_mb < 1:
        raise ValueError("--size-mb must be >= 1")
    small: list[tuple[str, tuple[int, ...]]] = [
        (f"block{i // 2}.{'bias' if i % 2 == 0 else 'norm.weight'}", (1024,)) for i in range(32)
    ]
    rows = size_mb * 256 - len(small)  # rows of 1024 float32 = 4 KiB each
    parts = [0.40, 0.25, 0.20]
    big_rows = [int(rows * p) for p in parts]
    big_rows.append(rows - sum(big_rows))
    names = ["embed.weight", "block0.attn.weight", "block1.mlp.weight", "head.weight"]
    big: list[tuple[str, tuple[int, ...]]] = [
        (n, (r, 1024)) for n, r in zip(names, big_rows, strict=True) if r > 0
    ]
    return big[:1] + small[:16] + big[1:3] + small[16:] + big[3:]


def make_model(size_mb: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors, every page written (committed) before anything is measured."""
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray] = {}
    for name, shape in model_layout(size_mb):
        arr = np.empty(shape, dtype=np.float32)
        flat = arr.reshape(-1)
        step = 16 << 20  # generate in 64 MiB slices: no second full-size temporary
        for start in range(0, flat.size, step):
            rng.random(out=flat[start : start + step], dtype=np.float32)
        model[name] = arr
    return model


def fingerprint(params: dict[str, np.ndarray]) -> list[Any]:
    """A cheap check that both sides hold the same tensors (names, shapes, sampled values)."""
    out: list[Any] = []
    for name in sorted(params):
        flat = np.asarray(params[name]).reshape(-1)
        stride = max(1, flat.size // 4096)
        out.append(
            [
                name,
                list(params[name].shape),
                float(flat[::stride].astype(np.float64).sum()),
                float(flat[-1]) if flat.size else 0.0,
            ]
        )
    return out


def nbytes_of(params: dict[str, np.ndarray]) -> int:
    return sum(int(v.nbytes) for v in params.values())


# ---------------------------------------------------------------------------- memory and CPU


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in bytes."""
    rss = hwm = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _anon_huge_mb() -> float | None:
    """Transparent huge pages in use by this process (MB), when the kernel says."""
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"AnonHugePages:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def warm_pages(nbytes: int) -> None:
    """Commits and frees ``nbytes`` of memory, so that the next allocation finds warm pages.

    On VMs that hand freed guest memory back to the host (balloon free-page reporting, as on
    the Firecracker guest this was written on), the first write to cold memory costs ~2.5 s of
    system time per GiB, memory freed moments ago ~0.1 s. ``--warm-pages`` does this in the
    receiving process just before each transfer, to measure the protocol rather than the
    host's page faults.
    """
    if nbytes > 0:
        buf = np.empty(nbytes, dtype=np.uint8)
        buf[::4096] = 1
        del buf


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class PeakMonitor:
    """Peak RSS of this process between ``start()`` and ``stop()``, above the RSS at ``start()``."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = self.peak = 0
        self.samples = 0
        self.hwm_ok = False
        self._cpu0 = 0.0

    def _loop(self) -> None:
        fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            while not self._stop.is_set():
                text = os.pread(fd, 8192, 0)
                i = text.find(b"VmRSS:")
                if i >= 0:
                    rss = int(text[i + 6 : text.index(b"kB", i)]) * 1024
                    if rss > self.peak:
                        self.peak = rss
                self.samples += 1
                self._stop.wait(self.period)
        finally:
            os.close(fd)

    def start(self) -> None:
        gc.collect()
        self.hwm_ok = _reset_hwm()
        self.base, _ = _rss_bytes()
        self.peak = self.base
        self.samples = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        self._cpu0 = _cpu_seconds()

    def stop(self) -> dict[str, Any]:
        cpu = _cpu_seconds() - self._cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss, hwm = _rss_bytes()
        peak = max(self.peak, rss, hwm if self.hwm_ok else 0)
        return {
            "base_rss_mb": self.base / MB,
            "peak_rss_mb": (peak - self.base) / MB,
            "sampled_peak_rss_mb": (self.peak - self.base) / MB,
            "hwm_peak_rss_mb": (hwm - self.base) / MB if self.hwm_ok else None,
            "end_rss_mb": (rss - self.base) / MB,
            "samples": self.samples,
            "cpu_s": cpu,
            "anon_huge_mb": _anon_huge_mb(),
        }


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class IterTimer:
    """Wraps an iterator: counts items and the time spent inside ``next()`` of the wrapped one.

    For a request stream that is time waiting on gRPC for the next frame; for a response
    generator it is the time spent producing frames (encoding), the rest being gRPC's.
    With a profiler, profiling is on only while ``next()`` runs (in whatever thread that is).
    """

    def __init__(self, it: Any, prof: Any = None) -> None:
        self._it = iter(it)
        self._prof = prof
        self.inner = 0.0
        self.n = 0

    def __iter__(self) -> IterTimer:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            if self._prof is not None:
                with self._prof:
                    item = next(self._it)
            else:
                item = next(self._it)
        finally:
            self.inner += time.perf_counter() - t0
        self.n += 1
        return item

    def stats(self, total: float) -> dict[str, Any]:
        return {
            "handler_s": round(total, 4),
            "inner_next_s": round(self.inner, 4),
            "frames": self.n,
        }


class Profiler:
    """Optional cProfile around the transfers of one side (``--profile DIR``)."""

    def __init__(self, directory: str | None, side: str, mode: str) -> None:
        self.directory = directory
        self.side, self.mode = side, mode
        self._prof: Any = None

    def reset(self) -> None:
        if self.directory:
            import cProfile

            self._prof = cProfile.Profile()

    def __enter__(self) -> Profiler:
        if self.directory:
            if self._prof is None:
                self.reset()
            self._prof.enable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            self._prof.disable()

    def dump(self, tag: str) -> None:
        if self._prof is None:
            return
        Path(self.directory).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        self._prof.dump_stats(str(Path(self.directory) / f"{self.mode}-{self.side}-{tag}.prof"))  # type: ignore[arg-type]
        self._prof = None


# ---------------------------------------------------------------------------- child plumbing


def _watch_parent() -> None:
    """Ends this child if the bench's main process goes away (no orphans holding GiBs)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _child(conn: Any, main: Any, *args: Any) -> None:
    _watch_parent()
    try:
        main(conn, *args)
    except BaseException:  # report anything to the parent, then exit
        with contextlib.suppress(Exception):
            conn.send({"error": traceback.format_exc()})
        raise SystemExit(1) from None


def child_entry(conn: Any, role: str, mode: str, *args: Any) -> None:
    """Entry point of every child process (module level, so that ``spawn`` can import it)."""
    mains = {
        ("server", "stream"): _server_stream,
        ("client", "stream"): _client_stream,
        ("server", "unary"): _server_unary,
        ("client", "unary"): _client_unary,
    }
    _child(conn, mains[(role, mode)], *args)


# ---------------------------------------------------------------------------- stream mode


def _server_stream(
    conn: Any, size_mb: int, rounds: int, workspace: str, profile: str | None
) -> None:
    from engine.config import ServerConfig
    from engine.server import FederatedServer

    class BenchServer(FederatedServer):
        """The reference server, with round closing held until the push was measured.

        SubmitUpdate and GetModel are wrapped only to time them (handler time, time spent
        waiting on gRPC for the next frame) and, with ``--profile``, to profile the handler
        thread; the server's own code runs unchanged.
        """

        hold = True
        prof: Any = None
        stats: dict[str, Any]  # set per call

        def _maybe_close_round(self) -> None:
            if not self.hold:
                super()._maybe_close_round()

        def SubmitUpdate(self, frames: Any, context: Any) -> Any:
            timed = IterTimer(frames)
            t0 = time.perf_counter()
            with self.prof or _nullcontext():
                try:
                    return super().SubmitUpdate(timed, context)
                finally:
                    self.stats = timed.stats(time.perf_counter() - t0)

        def GetModel(self, request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            timed = IterTimer(super().GetModel(request, context), self.prof)
            yield from timed
            self.stats = timed.stats(time.perf_counter() - t0)

    model = make_model(size_mb)
    fp = fingerprint(model)
    cfg = ServerConfig(
        task_name=TASK,
        target=f"{HOST}:0",
        min_num_clients=1,
        num_rounds=rounds,
        options=list(NO_PROXY_OPTIONS),
    )
    server = BenchServer(cfg, Path(workspace), model, long_poll=0.5)
    server.stats = {}
    del model  # the server keeps its own copy
    gc.collect()
    mon = PeakMonitor()
    prof = Profiler(profile, "server", "stream")
    server.prof = prof if profile else None  # the handlers run in gRPC's pool threads
    try:
        port = server.start()
        conn.send({"port": port, "fingerprint": fp, "rss_mb": _rss_bytes()[0] / MB})
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            if op == "mark":
                server.stats = {}
                warm_pages(cmd.get("warm", 0))
                prof.reset()
                mon.start()
                conn.send({"ok": True})
            elif op == "report":
                res = mon.stop()
                prof.dump(f"{cmd['direction']}{cmd.get('rep', 0)}")
                res["handler"] = server.stats
                if cmd["direction"] == "push":
                    try:  # the first contribution's buffers are the accumulator, scaled by 1.0
                        res["fingerprint"] = fingerprint(dict(server._round.accumulator._sums))
                    except Exception as exc:  # private state; informative only
                        res["fingerprint"] = f"unavailable: {exc}"
                conn.send(res)
            elif op == "close":
                t0 = time.perf_counter()
                server.hold = False
                server._maybe_close_round()
                server.hold = True
                conn.send(
                    {
                        "seconds": time.perf_counter() - t0,
                        "round": server.current_round,
                        "finished": server.finished,
                        # what the next pull must deliver: the model after FedAvg
                        "fingerprint": fingerprint(server.global_model),
                    }
                )
            elif op == "stop":
                conn.send({"ok": True})
                return
            else:
                raise ValueError(f"unknown op {op!r}")
    finally:
        server.stop(grace=0)


def _client_stream(conn: Any, port: int, profile: str | None) -> None:
    from engine.client import DirectFederatedClient
    from engine.config import ServerEndpoint
    from engine.events import ModelTransferred

    endpoint = ServerEndpoint(name=TASK, target=f"{HOST}:{port}", options=list(NO_PROXY_OPTIONS))
    client = DirectFederatedClient("bench-site", {}, False, [endpoint], retry_timeout=10)
    transfers: list[Any] = []
    client.bus.subscribe(lambda e: transfers.append(e) if isinstance(e, ModelTransferred) else None)
    client.connect_to_server({"heart_beat": False})
    mon = PeakMonitor()
    prof = Profiler(profile, "client", "stream")
    params: dict[str, np.ndarray] | None = None
    try:
        conn.send({"ready": True})
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            tag = f"{op}{cmd.get('rep', 0)}"
            if op == "pull":
                params = None  # drop the previous pull before the baseline
                client.last_model = None
                transfers.clear()
                warm_pages(cmd.get("warm", 0))
                mon.start()
                with prof:
                    t0 = time.perf_counter()
                    params = client.pull_models_from_server()
                    seconds = time.perf_counter() - t0
                res = mon.stop()
                prof.dump(tag)
                res.update(
                    seconds=seconds,
                    nbytes=nbytes_of(params),
                    fingerprint=fingerprint(params),
                    round=client.current_round,
                    stream_seconds=transfers[-1].seconds if transfers else None,
                )
                conn.send(res)
            elif op == "push":
                if params is None:
                    raise RuntimeError("push before pull")
                delta = params  # the pulled model, sent back as this round's Δ (held already)
                transfers.clear()
                mon.start()
                with prof:
                    t0 = time.perf_counter()
                    comment = client.push_models_to_server(delta, {"n_iter": 1})
                    seconds = time.perf_counter() - t0
                res = mon.stop()
                prof.dump(tag)
                res.update(
                    seconds=seconds,
                    nbytes=nbytes_of(delta),
                    fingerprint=fingerprint(delta),
                    comment=comment,
                )
                del delta
                conn.send(res)
            elif op == "stop":
                conn.send({"ok": True})
                return
            else:
                raise ValueError(f"unknown op {op!r}")
    finally:
        params = None
        try:
            client.stop_heartbeat()
            client.communicator.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------- unary baseline


def _server_unary(
    conn: Any, size_mb: int, rounds: int, workspace: str, profile: str | None
) -> None:
    from concurrent import futures

    import grpc

    from engine.serde import ndarray_to_proto, proto_to_ndarray
    from protos import federated_pb2 as pb

    model = make_model(size_mb)
    fp = fingerprint(model)
    state: dict[str, Any] = {"received": None}

    prof = Profiler(profile, "server", "unary")
    ctx = prof if profile else _nullcontext()

    def pull(request: bytes, context: Any) -> bytes:
        with ctx:
            msg = pb.CurrentModel(meta=pb.ModelMetaData(task=TASK), owner="server")
            for name, arr in model.items():
                msg.data.params.add(name=name, array=ndarray_to_proto(arr, name))
            return msg.SerializeToString()

    def push(request: bytes, context: Any) -> bytes:
        with ctx:
            msg = pb.Contribution.FromString(request)
            del request
            state["received"] = {p.name: proto_to_ndarray(p.array, p.name) for p in msg.data.params}
            del msg
            return pb.FederatedSummary(comment="received").SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        UNARY_SERVICE,
        {
            "Pull": grpc.unary_unary_rpc_method_handler(pull),  # no (de)serializers: bytes as is
            "Push": grpc.unary_unary_rpc_method_handler(push),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=UNLIMITED_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    if port == 0:
        raise OSError(f"cannot listen on {HOST}")
    server.start()
    mon = PeakMonitor()
    try:
        conn.send({"port": port, "fingerprint": fp, "rss_mb": _rss_bytes()[0] / MB})
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            if op == "mark":
                state["received"] = None
                warm_pages(cmd.get("warm", 0))
                prof.reset()
                mon.start()
                conn.send({"ok": True})
            elif op == "report":
                res = mon.stop()
                prof.dump(f"{cmd['direction']}{cmd.get('rep', 0)}")
                if cmd["direction"] == "push":
                    got = state["received"]
                    res["fingerprint"] = fingerprint(got) if got is not None else None
                conn.send(res)
            elif op == "close":
                state["received"] = None
                conn.send({"seconds": 0.0})
            elif op == "stop":
                conn.send({"ok": True})
                return
            else:
                raise ValueError(f"unknown op {op!r}")
    finally:
        server.stop(0)


def _client_unary(conn: Any, port: int, profile: str | None) -> None:
    import grpc

    from engine.serde import ndarray_to_proto, proto_to_ndarray
    from protos import federated_pb2 as pb

    channel = grpc.insecure_channel(f"{HOST}:{port}", options=UNLIMITED_OPTIONS)
    # No (de)serializers: bytes as they are.
    pull_rpc = channel.unary_unary(f"/{UNARY_SERVICE}/Pull", None, None)
    push_rpc = channel.unary_unary(f"/{UNARY_SERVICE}/Push", None, None)
    grpc.channel_ready_future(channel).result(timeout=30)
    mon = PeakMonitor()
    prof = Profiler(profile, "client", "unary")
    params: dict[str, np.ndarray] | None = None
    try:
        conn.send({"ready": True})
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            tag = f"{op}{cmd.get('rep', 0)}"
            if op == "pull":
                params = None
                warm_pages(cmd.get("warm", 0))
                mon.start()
                with prof:
                    t0 = time.perf_counter()
                    raw = pull_rpc(b"", timeout=RPC_TIMEOUT)
                    msg = pb.CurrentModel.FromString(raw)
                    del raw
                    params = {p.name: proto_to_ndarray(p.array, p.name) for p in msg.data.params}
                    del msg
                    seconds = time.perf_counter() - t0
                res = mon.stop()
                prof.dump(tag)
                res.update(
                    seconds=seconds, nbytes=nbytes_of(params), fingerprint=fingerprint(params)
                )
                conn.send(res)
            elif op == "push":
                if params is None:
                    raise RuntimeError("push before pull")
                delta = params
                mon.start()
                with prof:
                    t0 = time.perf_counter()
                    contrib = pb.Contribution(n_iter=1, type="delta_w", contribution_id="bench")
                    for name, arr in delta.items():
                        contrib.data.params.add(name=name, array=ndarray_to_proto(arr, name))
                    raw = contrib.SerializeToString()
                    del contrib
                    reply = pb.FederatedSummary.FromString(push_rpc(raw, timeout=RPC_TIMEOUT))
                    del raw
                    seconds = time.perf_counter() - t0
                res = mon.stop()
                prof.dump(tag)
                res.update(
                    seconds=seconds,
                    nbytes=nbytes_of(delta),
                    fingerprint=fingerprint(delta),
                    comment=reply.comment,
                )
                del delta
                conn.send(res)
            elif op == "stop":
                conn.send({"ok": True})
                return
            else:
                raise ValueError(f"unknown op {op!r}")
    finally:
        params = None
        channel.close()


# ---------------------------------------------------------------------------- orchestration


class BenchError(RuntimeError):
    pass


class Child:
    """One child process and its pipe, with every wait bounded by the run's deadline."""

    def __init__(self, ctx: Any, name: str, deadline: float, *args: Any) -> None:
        self.name = name
        self.deadline = deadline
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=child_entry, args=(child_conn, *args), name=name, daemon=True
        )
        self.proc.start()
        child_conn.close()

    def recv(self) -> dict[str, Any]:
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: time limit reached (see --timeout)")
            if self.conn.poll(min(left, 0.5)):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    raise BenchError(f"{self.name} exited (code {self.proc.exitcode})") from None
                if "error" in msg:
                    raise BenchError(f"{self.name} failed:\n{msg['error']}")
                return msg
            if not self.proc.is_alive():
                raise BenchError(
                    f"{self.name} exited (code {self.proc.exitcode}) without answering"
                )

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.conn.send({"op": op, **kw})
        return self.recv()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_mode(mode: str, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    children: list[Child] = []
    rows: list[dict[str, Any]] = []
    model_bytes = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as workspace:
        try:
            _log(f"[{mode}] starting server ({args.size_mb} MiB model)", args.json_only)
            server = Child(
                ctx,
                f"{mode}-server",
                deadline,
                "server",
                mode,
                args.size_mb,
                max(2, args.repeat + 1),
                workspace,
                args.profile,
            )
            children.append(server)
            info = server.recv()
            client = Child(
                ctx, f"{mode}-client", deadline, "client", mode, info["port"], args.profile
            )
            children.append(client)
            client.recv()
            for rep in range(args.repeat):
                for direction in ("pull", "push"):
                    warm = model_bytes if args.warm_pages else 0  # receiving side only
                    server.call("mark", warm=warm if direction == "push" else 0)
                    c = client.call(direction, rep=rep, warm=warm if direction == "pull" else 0)
                    s = server.call("report", direction=direction, rep=rep)
                    want = info["fingerprint"]
                    ok = c["nbytes"] == model_bytes and c["fingerprint"] == want
                    if direction == "push":  # what the server holds now (a str: unavailable)
                        sfp = s.get("fingerprint")
                        ok = ok and (sfp == want or isinstance(sfp, str))
                    if not ok:
                        raise BenchError(
                            f"[{mode} {direction}] the received model differs from the sent one"
                        )
                    row = {
                        "bench": "transfer",
                        "mode": mode,
                        "direction": direction,
                        "rep": rep,
                        "size_mib": args.size_mb,
                        "mb": model_bytes / MB,
                        "seconds": round(c["seconds"], 4),
                        "mb_per_s": round(model_bytes / MB / c["seconds"], 1),
                        "client_peak_rss_mb": round(c["peak_rss_mb"], 1),
                        "server_peak_rss_mb": round(s["peak_rss_mb"], 1),
                        "client_peak_ratio": round(c["peak_rss_mb"] * MB / model_bytes, 3),
                        "server_peak_ratio": round(s["peak_rss_mb"] * MB / model_bytes, 3),
                        "client_base_rss_mb": round(c["base_rss_mb"], 1),
                        "server_base_rss_mb": round(s["base_rss_mb"], 1),
                        "client_cpu_s": round(c["cpu_s"], 3),
                        "server_cpu_s": round(s["cpu_s"], 3),
                        "client_rss_samples": c["samples"],
                        "server_rss_samples": s["samples"],
                        "client_sampled_peak_rss_mb": round(c["sampled_peak_rss_mb"], 1),
                        "server_sampled_peak_rss_mb": round(s["sampled_peak_rss_mb"], 1),
                        "verified": True,
                        "warm_pages": bool(args.warm_pages),
                    }
                    if c.get("stream_seconds") is not None:
                        row["stream_seconds"] = round(c["stream_seconds"], 4)
                    row["client_thp_mb"] = c.get("anon_huge_mb")
                    row["server_thp_mb"] = s.get("anon_huge_mb")
                    if s.get("handler"):
                        row["server_handler"] = s["handler"]
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                closed = server.call("close")
                if "fingerprint" in closed:
                    info["fingerprint"] = closed["fingerprint"]
                if mode == "stream":
                    _log(
                        f"[{mode}] round closed untimed in {closed['seconds']:.2f} s "
                        "(FedAvg apply + global_model.npz)",
                        args.json_only,
                    )
            client.call("stop")
            server.call("stop")
            for child in children:
                child.proc.join(10)
        finally:
            for child in reversed(children):
                child.kill()
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (mode, direction): median throughput and the largest peaks over the repeats."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key in {(r["mode"], r["direction"]) for r in rows}:
        rs = [r for r in rows if (r["mode"], r["direction"]) == key]
        out[key] = {
            "mb_per_s": float(np.median([r["mb_per_s"] for r in rs])),
            "seconds": float(np.median([r["seconds"] for r in rs])),
            "client_peak_rss_mb": max(r["client_peak_rss_mb"] for r in rs),
            "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in rs),
            "client_peak_ratio": max(r["client_peak_ratio"] for r in rs),
            "server_peak_ratio": max(r["server_peak_ratio"] for r in rs),
            "client_cpu_s": float(np.median([r["client_cpu_s"] for r in rs])),
            "server_cpu_s": float(np.median([r["server_cpu_s"] for r in rs])),
            "n": len(rs),
        }
    return out


def report(rows: list[dict[str, Any]], size_mb: int, warm: bool = False) -> str:
    summ = _summary(rows)
    lines = [
        f"\n### Model transfer over loopback gRPC, {size_mb} MiB float32 model "
        f"({size_mb * 1.048576:.0f} MB){', receiver pages warmed' if warm else ''}\n",
        "| mode | direction | seconds | MB/s | client peak RSS MB (x model) | "
        "server peak RSS MB (x model) | client / server CPU s | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("stream", "unary"):
        for direction in ("pull", "push"):
            s = summ.get((mode, direction))
            if s is None:
                continue
            lines.append(
                f"| {mode} | {direction} | {s['seconds']:.2f} | {s['mb_per_s']:.0f} | "
                f"{s['client_peak_rss_mb']:.0f} ({s['client_peak_ratio']:.2f}x) | "
                f"{s['server_peak_rss_mb']:.0f} ({s['server_peak_ratio']:.2f}x) | "
                f"{s['client_cpu_s']:.2f} / {s['server_cpu_s']:.2f} | {int(s['n'])} |"
            )
    lines.append("")
    lines.append(
        "Peak RSS: above each process's RSS just before the transfer. Pull: the server "
        "sends, the client receives; push: the other way."
    )
    checks: list[tuple[str, bool | None, str]] = []
    for direction in ("pull", "push"):
        st, un = summ.get(("stream", direction)), summ.get(("unary", direction))
        if st and un:
            ratio = st["mb_per_s"] / un["mb_per_s"]
            lines.append(f"- {direction}: stream / unary throughput = {ratio:.2f}x")
            checks.append(
                (
                    f"{direction}: stream >= {TARGET_RATIO:g}x unary throughput",
                    ratio >= TARGET_RATIO,
                    f"{ratio:.2f}x",
                )
            )
        if st:
            checks.append(
                (
                    f"{direction}: stream >= {TARGET_MB_S:g} MB/s",
                    st["mb_per_s"] >= TARGET_MB_S,
                    f"{st['mb_per_s']:.0f} MB/s",
                )
            )
            for side in ("client", "server"):
                r = st[f"{side}_peak_ratio"]
                checks.append(
                    (
                        f"{direction}: stream {side} peak RSS <= {TARGET_PEAK:g}x model",
                        r <= TARGET_PEAK,
                        f"{r:.2f}x",
                    )
                )
    if checks:
        lines.append("")
        lines.append("| target | measured | met |")
        lines.append("|---|---|---|")
        for name, ok, measured in checks:
            lines.append(f"| {name} | {measured} | {'yes' if ok else 'NO'} |")
        met = all(ok for _, ok, _ in checks)
        lines.append("")
        lines.append(f"All targets met: {'yes' if met else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="model size in MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=1, help="pull+push rounds per mode (default 1)")
    p.add_argument("--modes", default="stream,unary", help="comma-separated: stream, unary")
    p.add_argument("--json-only", action="store_true", help="only the JSON lines on stdout")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="whole-run time limit in seconds (default 240 + 0.6 s per MiB per repeat)",
    )
    p.add_argument(
        "--warm-pages",
        action="store_true",
        help="before each transfer, commit and free one model's worth of memory in the "
        "receiving process (measures the protocol without the VM's cold-page cost)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="write cProfile stats of each side's transfers to DIR",
    )
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("stream", "unary")]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; use stream, unary")
    if args.size_mb < 1 or args.repeat < 1:
        p.error("--size-mb and --repeat must be >= 1")
    if args.size_mb >= 2048 and "unary" in modes:
        p.error("unary mode: protobuf refuses messages of 2 GiB or more; use --modes stream")
    timeout = args.timeout or 240 + 0.6 * args.size_mb * args.repeat * len(modes)
    deadline = time.monotonic() + timeout

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    rows: list[dict[str, Any]] = []
    try:
        for mode in modes:
            rows += run_mode(mode, args, deadline)
    except BenchError as exc:
        print(f"bench/transfer.py: {exc}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(report(rows, args.size_mb, args.warm_pages), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
