#!/usr/bin/env python
"""A federation at scale: the reference server with 5 to 50 simulated sites, 20 rounds each.

Usage::

    python bench/federation.py [--sites 5,10,25,50] [--rounds 20] [--model-mb 1] [--train-s 0.2]
                               [--site-procs 2] [--floor] [--json-only] [--profile FILE]

For each number of sites N, a fresh server child process runs the real reference server
(``engine.server.FederatedServer``, the default long-poll, every round saved to disk as in
production) with ``min_num_clients = N``. The N sites are threads spread over ``--site-procs``
child processes; each is a real ``DirectFederatedClient`` (the real communicator: retries,
long-poll handling, streamed models) with its heartbeat on. Every round each site pulls the
global model, "trains" by sleeping ``--train-s`` (no CPU, so the training is exactly known),
and pushes its own Δ of the model's size.

Measured per round: the wall time from the last site receiving round r-1's model to the last
site receiving round r's model. The **overhead beyond training** is that minus ``--train-s``:
the last upload, the aggregation, the save, and N downloads. Also: the server process's CPU
seconds per round and its peak RSS (VmHWM), and the server's close time per round (FedAvg
apply + the atomic saves, from ``ServerRoundAggregated`` and the save timer). Round 1 is
warm-up and is left out of the medians.

Output: one JSON object per N, then (unless ``--json-only``) a Markdown table, the growth from
the smallest N to the largest (per-site cost ratio; 1.0 = linear), and the target: overhead under
100 ms at 50 sites for a 1 MB model. ``--profile FILE`` writes a cProfile of the server's
request threads (pstats format) for the largest N.

``--floor`` also runs, for each N, the same traffic over bare gRPC: a server of two generic
methods (pull: one message of the model's bytes, held until every site's push of the previous
round arrived; push: one message) and the same N site threads in the same processes, measured the
same way. No FL logic, no protobuf, no disk: what gRPC in Python alone costs on this machine, the
floor under any server built on it. Reported as the ratio ours / floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
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

TASK = "bench_federation"
TARGET_MS = 100.0
TARGET_SITES = 50


def _model(nbytes: int) -> dict[str, np.ndarray]:
    # A few variables like a small network: one big weight, its bias, a counter.
    rng = np.random.default_rng(0)
    n = max(1, (nbytes - 4096) // 4)
    return {
        "fc.weight": rng.standard_normal(n).astype(np.float32),
        "fc.bias": rng.standard_normal(1024).astype(np.float32),
        "steps": np.array(0, np.int64),
    }


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------- server child


class _ProfiledPool:
    """A ThreadPoolExecutor whose tasks run under one cProfile profiler per thread."""

    profilers: list[Any] = []
    base: Any = None  # the real ThreadPoolExecutor (the module attribute is replaced)

    @classmethod
    def make(cls, *args: Any, **kwargs: Any) -> Any:
        import cProfile

        local = threading.local()

        class Pool(cls.base):  # type: ignore[name-defined,misc]
            def submit(self, fn: Any, /, *a: Any, **kw: Any) -> Any:
                def run() -> Any:
                    prof = getattr(local, "prof", None)
                    if prof is None:
                        prof = local.prof = cProfile.Profile()
                        cls.profilers.append(prof)
                    prof.enable()
                    try:
                        return fn(*a, **kw)
                    finally:
                        prof.disable()

                return super().submit(run)

        return Pool(*args, **kwargs)


def server_main(conn: Any, sites: int, rounds: int, model_mb: float, profile: str | None) -> None:
    try:
        from engine.config import ServerConfig
        from engine.events import EventBus, ServerRoundAggregated
        from engine.server import FederatedServer
        from engine.server import fed_server as fs

        if profile:
            _ProfiledPool.base = fs.futures.ThreadPoolExecutor
            fs.futures.ThreadPoolExecutor = _ProfiledPool.make  # type: ignore[attr-defined,assignment,misc]
        saves: list[float] = []
        persist = fs.FederatedServer._persist

        def timed_persist(self: Any, *args: Any) -> None:
            t0 = time.perf_counter()
            persist(self, *args)
            saves.append(time.perf_counter() - t0)

        fs.FederatedServer._persist = timed_persist  # type: ignore[method-assign,assignment]
        bus = EventBus()
        closes: list[float] = []
        bus.subscribe(
            lambda e: closes.append(e.seconds) if isinstance(e, ServerRoundAggregated) else None
        )
        config = ServerConfig(
            task_name=TASK,
            target="127.0.0.1:0",
            min_num_clients=sites,
            max_num_clients=sites,
            num_rounds=rounds,
            heart_beat_timeout=600,
            wait_after_min_clients=600,
        )
        with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
            server = FederatedServer(config, Path(tmp), _model(int(model_mb * 1e6)), bus)
            port = server.start()
            rss0 = _rss_kb("VmRSS")
            cpu0 = _cpu()
            conn.send({"port": port})
            conn.recv()  # the sites are done
            cpu = _cpu() - cpu0
            result = {
                "server_cpu_s": cpu,
                "server_rss_start_mb": rss0 / 1024,
                "server_rss_peak_mb": _rss_kb("VmHWM") / 1024,
                "server_rss_end_mb": _rss_kb("VmRSS") / 1024,
                "aggregate_ms": [s * 1000 for s in closes],
                "save_ms": [s * 1000 for s in saves],
                "finished": server.finished,
                "rounds_done": len(server.history),
                "contributors_min": min(
                    (len(h["contributors"]) for h in server.history), default=0
                ),
            }
            server.stop(grace=0)
        if profile:
            import pstats

            stats = pstats.Stats(_ProfiledPool.profilers[0])
            for prof in _ProfiledPool.profilers[1:]:
                stats.add(prof)
            stats.dump_stats(profile)
        conn.send(result)
    except BaseException:
        conn.send({"error": traceback.format_exc()})


# ---------------------------------------------------------------------------- sites child


def _run_sites(conn: Any, names: list[str], site: Any) -> None:
    """Runs ``site(name, index, barrier, times)`` on a thread per site; sends what they saw.

    ``times`` gets when the site received each round's model; a failing site aborts the barrier
    so that the others stop waiting for it.
    """
    try:
        got: dict[str, list[float]] = {}
        errors: list[str] = []
        barrier = threading.Barrier(len(names))

        def run(name: str, index: int) -> None:
            try:
                site(name, index, barrier, got.setdefault(name, []))
            except BaseException:
                errors.append(f"{name}: {traceback.format_exc()}")
                barrier.abort()

        cpu0 = _cpu()
        threads = [threading.Thread(target=run, args=(n, i), name=n) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send({"got": got, "errors": errors, "cpu_s": _cpu() - cpu0})
    except BaseException:
        conn.send({"got": {}, "errors": [traceback.format_exc()], "cpu_s": 0.0})


def sites_main(
    conn: Any, port: int, names: list[str], rounds: int, model_mb: float, train_s: float
) -> None:
    from engine.client import DirectFederatedClient
    from engine.config import ServerEndpoint

    model = _model(int(model_mb * 1e6))
    endpoint = ServerEndpoint(name=TASK, target=f"127.0.0.1:{port}")

    def site(name: str, index: int, barrier: threading.Barrier, times: list[float]) -> None:
        rng = np.random.default_rng(index + 1)
        delta = {
            k: (rng.standard_normal(v.shape) * 0.01).astype(v.dtype)
            if v.dtype.kind == "f"
            else np.zeros_like(v)
            for k, v in model.items()
        }
        client = DirectFederatedClient(
            name, {"heartbeat_interval": 5.0}, False, [endpoint], retry_timeout=60
        )
        client.connect_to_server({"heart_beat": True})
        barrier.wait()
        for _ in range(rounds):
            client.pull_models_from_server()
            times.append(time.time())
            time.sleep(train_s)
            client.push_models_to_server(delta, {"n_iter": 1})
        client.pull_models_from_server()  # the final model
        times.append(time.time())
        client.close()

    _run_sites(conn, names, site)


# ---------------------------------------------------------------------------- bare gRPC floor

_FLOOR = "/bench.Floor/"
FLOOR_WAIT_S = 120.0  # a lost site fails the floor run instead of hanging it


def _floor_options(model_mb: float) -> list[tuple[str, int]]:
    # The floor sends the whole model as one message: allow it, whatever its size.
    limit = max(8 << 20, int(model_mb * 1e6) + (1 << 20))
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def floor_server_main(conn: Any, sites: int, model_mb: float) -> None:
    """Pull returns the model (one message) once the previous round's N pushes are in."""
    try:
        from concurrent import futures

        import grpc

        payload = bytes(int(model_mb * 1e6))
        cond = threading.Condition()
        pushes = [0]  # pushes received, all rounds

        def pull(request: bytes, context: Any) -> Any:
            wanted = int(request or b"0")  # round r needs the N pushes of rounds 0..r-1
            with cond:
                if not cond.wait_for(lambda: pushes[0] >= wanted * sites, FLOOR_WAIT_S):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {wanted} never came")
            yield payload

        def push(frames: Any, context: Any) -> bytes:
            n = sum(len(f) for f in frames)
            with cond:
                pushes[0] += 1
                cond.notify_all()
            return str(n).encode()

        handler = grpc.method_handlers_generic_handler(
            "bench.Floor",
            {
                "Pull": grpc.unary_stream_rpc_method_handler(pull),
                "Push": grpc.stream_unary_rpc_method_handler(push),
            },
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=min(256, 16 + 3 * sites)),
            options=_floor_options(model_mb),
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        cpu0 = _cpu()
        conn.send({"port": port})
        conn.recv()
        conn.send({"server_cpu_s": _cpu() - cpu0})
        server.stop(0)
    except BaseException:
        conn.send({"error": traceback.format_exc()})


def floor_sites_main(
    conn: Any, port: int, names: list[str], rounds: int, model_mb: float, train_s: float
) -> None:
    import grpc

    payload = bytes(int(model_mb * 1e6))
    opts = _floor_options(model_mb)

    def site(name: str, index: int, barrier: threading.Barrier, times: list[float]) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        pull = channel.unary_stream(_FLOOR + "Pull", None, None)  # bytes as they are
        push = channel.stream_unary(_FLOOR + "Push", None, None)
        grpc.channel_ready_future(channel).result(timeout=30)
        barrier.wait()
        for r in range(rounds + 1):
            for _ in pull(str(r).encode(), timeout=FLOOR_WAIT_S):
                pass
            times.append(time.time())
            if r < rounds:
                time.sleep(train_s)
                push(iter([payload]), timeout=FLOOR_WAIT_S)
        channel.close()

    _run_sites(conn, names, site)


# ---------------------------------------------------------------------------- driver


def _drive(
    server_fn: Any,
    server_args: tuple[Any, ...],
    sites_fn: Any,
    sites: int,
    rounds: int,
    model_mb: float,
    train_s: float,
    procs: int,
) -> dict[str, Any]:
    """Runs a server child and the site children; the timings every variant reports."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=server_fn, args=(child, *server_args), daemon=True)
    server.start()
    hello = parent.recv()
    if "error" in hello:
        raise RuntimeError(hello["error"])
    names = [f"site-{i + 1:03d}" for i in range(sites)]
    groups = [names[i::procs] for i in range(min(procs, sites))]
    pipes, children = [], []
    t0 = time.time()
    for group in groups:
        a, b = ctx.Pipe()
        p = ctx.Process(
            target=sites_fn, args=(b, hello["port"], group, rounds, model_mb, train_s), daemon=True
        )
        p.start()
        pipes.append(a)
        children.append(p)
    results = [a.recv() for a in pipes]
    wall = time.time() - t0
    for p in children:
        p.join(30)
    parent.send("done")
    srv = parent.recv()
    server.join(30)
    if "error" in srv:
        raise RuntimeError(srv["error"])
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise RuntimeError("sites failed:\n" + "\n".join(errors[:3]))
    got: dict[str, list[float]] = {}
    for r in results:
        got.update(r["got"])
    # got[site][r]: when the site received the model of round r (r = rounds: the final one).
    last = [max(got[s][r] for s in got) for r in range(rounds + 1)]
    round_ms = [(last[r] - last[r - 1]) * 1000 for r in range(1, rounds + 1)]
    overhead = [ms - train_s * 1000 for ms in round_ms]
    steady = overhead[1:] or overhead  # round 1 warms up (first buffers, first connections)
    return {
        "srv": srv,
        "site_procs": len(groups),
        "overhead_ms_median": statistics.median(steady),
        "overhead_ms_p90": sorted(steady)[max(0, int(len(steady) * 0.9) - 1)],
        "round_ms": round_ms,
        "server_cpu_ms_per_round": srv["server_cpu_s"] * 1000 / rounds,
        "sites_cpu_ms_per_round": sum(r["cpu_s"] for r in results) * 1000 / rounds,
        "wall_s": wall,
    }


def run(
    sites: int, rounds: int, model_mb: float, train_s: float, procs: int, profile: str | None
) -> dict[str, Any]:
    d = _drive(
        server_main,
        (sites, rounds, model_mb, profile),
        sites_main,
        sites,
        rounds,
        model_mb,
        train_s,
        procs,
    )
    srv = d.pop("srv")
    return {
        "bench": "federation",
        "sites": sites,
        "rounds": rounds,
        "model_mb": model_mb,
        "train_s": train_s,
        **d,
        "overhead_ms_per_site": d["overhead_ms_median"] / sites,
        "server_cpu_ms_per_site_round": d["server_cpu_ms_per_round"] / sites,
        "server_aggregate_ms_median": statistics.median(srv["aggregate_ms"][1:] or [0.0]),
        "server_save_ms_median": statistics.median(srv["save_ms"][1:] or [0.0]),
        "server_rss_start_mb": srv["server_rss_start_mb"],
        "server_rss_peak_mb": srv["server_rss_peak_mb"],
        "server_rss_end_mb": srv["server_rss_end_mb"],
        "finished": srv["finished"],
        "every_site_every_round": srv["contributors_min"] == sites and srv["rounds_done"] == rounds,
        "load_avg_1m": os.getloadavg()[0],
    }


def run_floor(
    sites: int, rounds: int, model_mb: float, train_s: float, procs: int
) -> dict[str, Any]:
    d = _drive(
        floor_server_main,
        (sites, model_mb),
        floor_sites_main,
        sites,
        rounds,
        model_mb,
        train_s,
        procs,
    )
    d.pop("srv")
    return {
        "bench": "federation-floor",
        "sites": sites,
        "rounds": rounds,
        "model_mb": model_mb,
        **d,
    }


def report(rows: list[dict[str, Any]], floors: dict[int, dict[str, Any]] | None = None) -> str:
    floors = floors or {}
    extra = " bare-gRPC floor | ours / floor |" if floors else ""
    lines = [
        "| sites | overhead/round (median) | p90 | per site | server CPU/round | server CPU "
        "per site·round | aggregate + save | server RSS peak |" + extra,
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if floors else ""),
    ]
    for r in rows:
        f = floors.get(r["sites"])
        lines.append(
            f"| {r['sites']} | {r['overhead_ms_median']:.0f} ms | {r['overhead_ms_p90']:.0f} ms "
            f"| {r['overhead_ms_per_site']:.2f} ms | {r['server_cpu_ms_per_round']:.0f} ms "
            f"| {r['server_cpu_ms_per_site_round']:.2f} ms "
            f"| {r['server_aggregate_ms_median']:.1f} + {r['server_save_ms_median']:.1f} ms "
            f"| {r['server_rss_peak_mb']:.0f} MB |"
            + (
                f" {f['overhead_ms_median']:.0f} ms (server CPU {f['server_cpu_ms_per_round']:.0f}"
                f" ms, sites {f['sites_cpu_ms_per_round']:.0f} ms) "
                f"| ×{r['overhead_ms_median'] / f['overhead_ms_median']:.2f} |"
                if f
                else ""
            )
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        k = b["sites"] / a["sites"]
        lines += [
            "",
            f"Growth {a['sites']} → {b['sites']} sites (×{k:g}): overhead ×"
            f"{b['overhead_ms_median'] / a['overhead_ms_median']:.1f}, server CPU ×"
            f"{b['server_cpu_ms_per_round'] / a['server_cpu_ms_per_round']:.1f}, "
            f"per-site overhead ×{b['overhead_ms_per_site'] / a['overhead_ms_per_site']:.2f} "
            "(1.0 = linear), server peak RSS "
            f"{a['server_rss_peak_mb']:.0f} → {b['server_rss_peak_mb']:.0f} MB.",
        ]
    big = [r for r in rows if r["sites"] == TARGET_SITES]
    if big:
        r = big[0]
        ok = r["overhead_ms_median"] < TARGET_MS
        lines.append(
            f"Target: overhead < {TARGET_MS:.0f} ms/round at {TARGET_SITES} sites for a "
            f"{r['model_mb']:g} MB model: {r['overhead_ms_median']:.0f} ms → "
            f"{'met' if ok else 'NOT met'}."
        )
        f = floors.get(TARGET_SITES)
        if f:
            lines.append(
                f"Bare gRPC alone (same traffic, no FL logic): {f['overhead_ms_median']:.0f} ms at "
                f"{TARGET_SITES} sites → the target is "
                f"{'above' if f['overhead_ms_median'] < TARGET_MS else 'below'} what gRPC in "
                "Python can do on this machine."
            )
    lines.append(f"(load average at the end: {rows[-1]['load_avg_1m']:.2f}; {os.cpu_count()} CPUs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="5,10,25,50", help="comma-separated site counts")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--model-mb", type=float, default=1.0, help="model size in MB (10^6 bytes)")
    p.add_argument("--train-s", type=float, default=0.2, help="simulated training per round")
    p.add_argument("--site-procs", type=int, default=2, help="processes the sites run in")
    p.add_argument("--floor", action="store_true", help="also the same traffic over bare gRPC")
    p.add_argument("--json-only", action="store_true")
    p.add_argument("--profile", default=None, help="cProfile of the server at the largest N")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.sites.split(",") if x.strip()]
    rows: list[dict[str, Any]] = []
    floors: dict[int, dict[str, Any]] = {}
    for n in counts:
        prof = args.profile if args.profile and n == max(counts) else None
        row = run(n, args.rounds, args.model_mb, args.train_s, args.site_procs, prof)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.floor:
            floors[n] = run_floor(n, args.rounds, args.model_mb, args.train_s, args.site_procs)
            print(json.dumps(floors[n]), flush=True)
    if not args.json_only:
        print(report(rows, floors), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
