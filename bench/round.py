#!/usr/bin/env python
"""Memory of one whole round: peak RSS of the server and of each site's training process.

Usage::

    python bench/round.py [--size-mb 250] [--optimizers sgd,adam] [--steps 3] [--rounds 1]
                          [--privacy percentile|none] [--json-only] [--timeout S]

One federated round of the real engine with a big model, in real processes over loopback gRPC:
a **server** child process that does what ``fltui server`` does (``load_server_config``,
``load_npz`` of ``models/initial_model.npz``, ``FederatedServer``, ``start``, wait until every
site has left), and two **site** child processes that each do what a site's training worker
does (``SiteEngine(workspace).build()`` then ``run()``: register, pull, train, validate, Δ,
privacy, push, wait, pull the final model, validate it, quit). The workspaces are laid out by
``engine.demo.prepare_workspace`` (2 sites, plaintext, ``--rounds`` rounds: 1 by default) with
the demo MMAR's ``config_train.json`` swapped for a big ``MLP`` (64 inputs, 4 equal hidden layers
sized so that the float32 model is ``--size-mb`` MB) trained ``--steps`` optimizer steps of
batch 32 a round, and ``PercentileProtocol`` as the privacy filter (``--privacy none`` to leave
it out). Each optimizer of ``--optimizers`` is a fresh federation: ``sgd`` is plain SGD without
momentum (its inherent state: weights + gradients = 2x the model), ``adam`` is Adam (weights +
gradients + two moment buffers = 4x).

What is measured, in every process alike: ``baseline`` = VmRSS right after the process imported
what it runs (numpy, gRPC, protobuf, the engine; in a site also torch, the fitter's modules, and
torch's first-use costs paid on a 4x2 linear layer: one SGD and one Adam step, as constructing
the first optimizer imports ~70 MB of modules whatever the model) and before it read any model
or config, and ``peak`` = the kernel's VmHWM over the rest of the process's life. The
ratio is ``(peak - baseline) / model bytes``, model bytes = the size of ``initial_model.npz``'s
arrays. VmHWM is reset (``/proc/self/clear_refs``) at each step boundary, so each step's own
peak is reported too (site steps: the engine's own events; server steps: start, round, end).

Targets (issue 17): a training process at most its optimizer's inherent state + 2x the model;
the server at most 3x the model. Output: one JSON object per process per federation, then
(unless ``--json-only``) a Markdown table of peaks against targets, and each process's steps.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1e6
SITES = ("site-1", "site-2")
IN_FEATURES = 64
HIDDEN_LAYERS = 4
CLASSES = 10
SERVER_TARGET = 3.0
# Inherent state of the optimizer, in models: weights + gradients (+ Adam's two moments).
INHERENT = {"sgd": 2.0, "adam": 4.0}
OPTIMIZERS = {
    "sgd": {"name": "SGD", "args": {"lr": 0.001, "momentum": 0.0}},
    "adam": {"name": "Adam", "args": {"lr": 0.0001}},
}


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- memory


def _status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in bytes."""
    rss = hwm = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


class StepMeter:
    """Peak and end RSS (above ``baseline``) of each step of a process, steps marked by events.

    ``mark(next)`` closes the current step (its peak is VmHWM since the last mark) and resets
    VmHWM for the next one; the process's peak is the largest step peak.
    """

    def __init__(self, first: str) -> None:
        gc.collect()
        self.baseline, _ = _status()
        _reset_hwm()
        self.steps: list[dict[str, Any]] = []
        self._label = first
        self._t0 = time.perf_counter()

    def mark(self, label: str) -> None:
        rss, hwm = _status()
        now = time.perf_counter()
        self.steps.append(
            {
                "step": self._label,
                "peak_mb": (max(hwm, rss) - self.baseline) / MB,
                "end_mb": (rss - self.baseline) / MB,
                "seconds": round(now - self._t0, 3),
            }
        )
        _reset_hwm()
        self._label, self._t0 = label, now

    def result(self) -> dict[str, Any]:
        return {
            "baseline_mb": self.baseline / MB,
            "peak_mb": max(s["peak_mb"] for s in self.steps),
            "steps": self.steps,
        }


# ---------------------------------------------------------------------------- the MMAR


def mlp_layout(size_mb: float) -> tuple[int, int]:
    """(hidden width, parameter count) of the bench's MLP closest to ``size_mb`` MB float32."""
    want = size_mb * MB / 4

    def params(h: int) -> int:
        return IN_FEATURES * h + h + (HIDDEN_LAYERS - 1) * (h * h + h) + h * CLASSES + CLASSES

    width = max(8, int(math.sqrt(want / (HIDDEN_LAYERS - 1))))
    while params(width) > want and width > 8:
        width -= 1
    return width, params(width)


def write_configs(config_dir: Path, width: int, optimizer: str, steps: int, privacy: bool) -> None:
    """The big MLP's config_train.json and a one-round config_fed_client.json in ``config_dir``."""
    data = {
        "num_classes": CLASSES,
        "num_features": IN_FEATURES,
        "alpha": 0.5,
        "world_seed": 2024,
        "clusters_per_class": 2,
    }
    train = {
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "model": {
            "name": "MLP",
            "args": {
                "in_features": IN_FEATURES,
                "hidden": [width] * HIDDEN_LAYERS,
                "num_classes": CLASSES,
            },
        },
        "train_data": {
            "name": "SyntheticClassification",
            "args": {**data, "samples": 32 * steps, "split": "train"},
        },
        "validation_data": {
            "name": "SyntheticClassification",
            "args": {**data, "samples": 64, "split": "validation"},
        },
        "loss": {"name": "CrossEntropyLoss", "args": {}},
        "optimizer": OPTIMIZERS[optimizer],
        "validation": {"metric": "accuracy", "batch_size": 64},
    }
    (config_dir / "config_train.json").write_text(json.dumps(train, indent=2))
    path = config_dir / "config_fed_client.json"
    fed = json.loads(path.read_text())
    fed["client"].update(
        {
            "steps_aggregation": steps,
            "cross_site_validate": False,
            "privacy": (
                {"name": "PercentileProtocol", "args": {"percentile": 10, "gamma": 0.01}}
                if privacy
                else {}
            ),
        }
    )
    path.write_text(json.dumps(fed, indent=2))


def prepare(root: Path, width: int, optimizer: str, steps: int, privacy: bool, rounds: int) -> int:
    """Lays out the federation under ``root``; returns the model's bytes."""
    # The parent's own imports: each child imports only what it runs, before its baseline.
    from engine.demo import prepare_workspace  # deferred: the parent's (see above)
    from engine.training import demo_mmar_path  # deferred: the parent's

    scratch = root / "scratch_mmar"
    shutil.copytree(demo_mmar_path(), scratch)
    write_configs(scratch / "config", width, optimizer, steps, privacy)
    initial = root / "server" / "models" / "initial_model.npz"
    # The initial model is built by a child, as `fltui demo` does: this process never holds it.
    subprocess.run(
        [sys.executable, "-m", "engine.training.initial_model", str(scratch), str(initial)],
        check=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    prepare_workspace(root, num_sites=len(SITES), num_rounds=rounds, torch_in_subprocess=True)
    for site in SITES:
        deployed = root / site / "run_1" / f"mmar_{site}" / "config"
        for name in ("config_train.json", "config_fed_client.json"):
            shutil.copy(scratch / "config" / name, deployed / name)
    import numpy as np  # deferred: the parent's

    with np.load(initial) as npz:
        return sum(int(npz[k].nbytes) for k in npz.files)


# ---------------------------------------------------------------------------- children


def server_main(conn: Any, root: str) -> None:
    try:
        # What `fltui server` imports, in this child only, before its baseline.
        from engine.config import load_server_config  # deferred: the server child's
        from engine.events import EventBus, ServerRoundAggregated  # deferred: the server child's
        from engine.fileio import load_npz  # deferred: the server child's
        from engine.server import FederatedServer  # deferred: the server child's

        meter = StepMeter("load model, start")
        workspace = Path(root) / "server"
        # As `fltui server` does (fltui/cli.py _run_server): `initial` stays referenced.
        config = load_server_config(workspace / "config_fed_server.json")
        initial = load_npz(workspace / "models" / "initial_model.npz")
        bus = EventBus()

        def on_event(e: Any) -> None:
            if isinstance(e, ServerRoundAggregated):
                last = e.round >= e.num_rounds
                meter.mark("final downloads, quit" if last else f"round {e.round + 1}: the same")

        bus.subscribe(on_event)
        server = FederatedServer(config, workspace, initial, bus)
        port = server.start()
        meter.mark("round 1: send model, receive 2 uploads, screen, FedAvg, save")
        conn.send({"port": port})
        try:
            if not server.wait_all_left(timeout=float(conn.recv())):
                raise BenchError("the sites did not finish in time")
        finally:
            server.stop(grace=1)
        meter.mark("end")
        conn.send({"ok": True, "process": "server", **meter.result()})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})


def site_main(conn: Any, workspace: str) -> None:
    try:
        # What a site's worker imports, in this child only, before its baseline.
        import torch  # deferred: a site child's

        from engine.events import (  # deferred: a site child's
            EventBus,
            FederationFinished,
            MetricsReported,
            ModelTransferred,
            PhaseChanged,
            ProgressUpdated,
        )
        from engine.site.site_engine import SiteEngine  # deferred: a site child's

        # What the run imports later, imported now, so the baseline has it: the fitter and its
        # torch modules, the built-in model and data, the privacy filter's work; and torch's
        # first-use costs, which no model size changes (constructing the first optimizer
        # imports ~70 MB of modules; the first backward starts autograd), paid on a tiny model.
        for name in (
            "engine.training.fitter",
            "engine.training.models",
            "engine.training.data",
            "engine.privacy._ops",
        ):
            importlib.import_module(name)
        torch.set_num_threads(1)  # two sites share two cores
        _warm_up_torch(torch)
        meter = StepMeter("build fitter and client")
        outcome: dict[str, str] = {}

        def on_event(e: Any) -> None:
            if isinstance(e, PhaseChanged):
                meter.mark(f"{e.phase} (r{e.round})")
            elif isinstance(e, ModelTransferred):
                meter.mark("load global into model" if e.direction == "download" else "reply")
            elif isinstance(e, ProgressUpdated) and e.step == e.total_steps:
                meter.mark("validate local model (best model kept)")
            elif isinstance(e, MetricsReported) and e.scope == "local model":
                meter.mark("Δ (here without privacy; else in the next step)")
            elif isinstance(e, FederationFinished):
                outcome["outcome"], outcome["detail"] = e.outcome, e.detail

        bus = EventBus()
        bus.subscribe(on_event)
        engine = SiteEngine(Path(workspace), bus)
        engine.build()
        engine.run()
        meter.mark("end")
        if outcome.get("outcome") != "completed":
            raise BenchError(f"site ended {outcome}")
        conn.send({"ok": True, "process": Path(workspace).name, **meter.result()})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})


def _warm_up_torch(torch: Any) -> None:
    tiny = torch.nn.Linear(4, 2)
    for cls in (torch.optim.SGD, torch.optim.Adam):
        opt = cls(tiny.parameters(), lr=0.1)
        tiny(torch.ones(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- one federation


def run_federation(args: argparse.Namespace, optimizer: str, deadline: float) -> list[dict]:
    from engine.demo import _set_port  # deferred: the parent's
    from engine.site.paths import SitePaths  # deferred: the parent's

    width, params = mlp_layout(args.size_mb)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_round_") as tmp:
        root = Path(tmp)
        model_bytes = prepare(
            root, width, optimizer, args.steps, args.privacy != "none", args.rounds
        )
        procs: list[Any] = []
        pipes: list[Any] = []
        try:
            parent, child = ctx.Pipe()
            server = ctx.Process(target=server_main, args=(child, str(root)), daemon=True)
            server.start()
            procs.append(server)
            pipes.append(parent)
            first = _recv(parent, deadline, "server start")
            parent.send(max(1.0, deadline - time.monotonic()))
            for site in SITES:
                _set_port(SitePaths(root / site).kit, int(first["port"]))
            env_threads = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            try:
                for site in SITES:
                    p_end, c_end = ctx.Pipe()
                    proc = ctx.Process(target=site_main, args=(c_end, str(root / site)))
                    proc.start()
                    procs.append(proc)
                    pipes.append(p_end)
            finally:
                if env_threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = env_threads
            results = [_recv(p, deadline, "site") for p in pipes[1:]]
            results.append(_recv(pipes[0], deadline, "server end"))
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    rows = []
    for r in results:
        server_side = r["process"] == "server"
        inherent = 0.0 if server_side else INHERENT[optimizer]
        target = SERVER_TARGET if server_side else inherent + 2.0
        ratio = r["peak_mb"] * MB / model_bytes
        rows.append(
            {
                "bench": "round",
                "process": r["process"],
                "optimizer": optimizer,
                "privacy": args.privacy,
                "model_mb": model_bytes / MB,
                "params": params,
                "hidden": [width] * HIDDEN_LAYERS,
                "steps_trained": args.steps,
                "rounds": args.rounds,
                "baseline_mb": round(r["baseline_mb"], 1),
                "peak_mb": round(r["peak_mb"], 1),
                "ratio": round(ratio, 3),
                "inherent": inherent,
                "target": target,
                "met": ratio <= target,
                "steps": [
                    {
                        **s,
                        "peak_x": round(s["peak_mb"] * MB / model_bytes, 3),
                        "end_x": round(s["end_mb"] * MB / model_bytes, 3),
                    }
                    for s in r["steps"]
                ],
            }
        )
    return rows


def _recv(conn: Any, deadline: float, what: str) -> dict[str, Any]:
    left = deadline - time.monotonic()
    if left <= 0 or not conn.poll(left):
        raise BenchError(f"timed out waiting for the {what}")
    try:
        msg = conn.recv()
    except EOFError as exc:
        raise BenchError(f"the {what} process died without a result") from exc
    if not msg.get("ok", True):
        raise BenchError(f"the {what} process failed:\n{msg['error']}")
    return dict(msg)


# ---------------------------------------------------------------------------- report


def report(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        f"\n### Memory of one round: {first['model_mb']:.0f} MB float32 MLP "
        f"({first['params'] / 1e6:.1f}M params), 2 sites, {first['rounds']} round(s) of "
        f"{first['steps_trained']} steps, privacy: {first['privacy']}\n",
        "| process | optimizer | peak above baseline, MB | x model | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["process"] == "server":
            target = f"<= {r['target']:g}x"
        else:
            target = f"<= {r['inherent']:g}x inherent + 2x = {r['target']:g}x"
        lines.append(
            f"| {'server' if r['process'] == 'server' else r['process'] + ' (training)'} | "
            f"{r['optimizer']} | {r['peak_mb']:.0f} | {r['ratio']:.2f}x | {target} | "
            f"{'yes' if r['met'] else 'NO'} |"
        )
    lines.append("")
    lines.append(
        "Baseline: each process's VmRSS right after its imports, before any model or config "
        "was read; peak: VmHWM over the rest of its life."
    )
    for r in rows:
        if r["process"] not in ("server", SITES[0]):
            continue
        lines.append(f"\nSteps of {r['process']} ({r['optimizer']}), x model above baseline:\n")
        lines.append("| step | peak | at its end | seconds |")
        lines.append("|---|---|---|---|")
        for s in r["steps"]:
            lines.append(
                f"| {s['step']} | {s['peak_x']:.2f} | {s['end_x']:.2f} | {s['seconds']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=250.0, help="model size in MB (default 250)")
    p.add_argument("--optimizers", default="sgd,adam", help="comma-separated: sgd, adam")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per round (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the federation (default 1)")
    p.add_argument("--privacy", choices=("percentile", "none"), default="percentile")
    p.add_argument("--json-only", action="store_true", help="only the JSON lines on stdout")
    p.add_argument(
        "--timeout", type=float, default=None, help="whole-run limit (default 120 + 1.2 s/MB)"
    )
    args = p.parse_args(argv)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers:
        p.error(f"--optimizers: unknown {bad}; use {', '.join(OPTIMIZERS)}")
    if args.size_mb <= 0 or args.steps < 1 or args.rounds < 1:
        p.error("--size-mb must be > 0, --steps and --rounds >= 1")
    timeout = args.timeout or (120 + 1.2 * args.size_mb * args.rounds) * len(optimizers)
    deadline = time.monotonic() + timeout

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    rows: list[dict[str, Any]] = []
    try:
        for optimizer in optimizers:
            new = run_federation(args, optimizer, deadline)
            for row in new:
                print(json.dumps(row), flush=True)
            rows += new
    except BenchError as exc:
        print(f"bench/round.py: {exc}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(report(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
