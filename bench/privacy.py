#!/usr/bin/env python
"""Privacy filters on large model diffs: engine.privacy against the published numpy algorithms.

Usage::

    python bench/privacy.py [--sizes 10,100] [--tensors 50] [--repeat 5] [--device cpu|cuda]
                            [--protocols percentile,svt] [--steps 10] [--no-reference]
                            [--json-only]

For each size (millions of float32 parameters, spread over ``--tensors`` tensors of mixed sizes,
like a network's weights and biases) and each protocol, in the same process:

``engine``
    ``PercentileProtocol()`` / ``SVTProtocol()`` with their default arguments, one instance
    applied ``--repeat`` times after one warm-up round (the instance keeps its buffers across
    rounds, as a site's does); the diff is numpy arrays on CPU, or torch tensors with
    ``--device cuda``.
``numpy``
    the reference, written here from the published algorithm the way NVFlare's numpy filters
    do it (``np.percentile`` over the concatenated |Δ/T|; SVT on a float64 vector with legacy
    ``np.random.laplace``, ``np.random.choice`` with replacement), on the same diff (on CPU).

Measured per run: wall seconds (median over the repeats), effective GB/s (diff bytes / s), and
peak memory above the process's RSS before the first round of that run (kernel VmHWM, reset
through ``/proc/self/clear_refs``, and a 2 ms RSS sampler; on CUDA, torch's peak allocated
bytes): the output, the buffers a protocol keeps, and every temporary are all counted. Each
measurement runs in a fresh child process (``--one``), so no earlier one's freed memory is
reused unseen; the table compares numbers from the same invocation.

Output: one JSON object per line per measurement, then (unless ``--json-only``) a Markdown table
with engine/numpy speed ratios and the targets: each protocol >= 3x faster than numpy at 100M
parameters (aim 5x), peak extra memory <= 2x the diff's size.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GB = 1e9
MB = 1e6

# -------------------------------------------------------------------------- numpy references


def numpy_percentile(
    model_diff: dict[str, np.ndarray], total_steps: float, percentile: float = 10, gamma=0.01
) -> dict[str, np.ndarray]:
    """NVFlare's PercentilePrivacy (numpy), as published."""
    diff = {k: v / total_steps for k, v in model_diff.items()}
    abs_delta = np.concatenate([np.abs(v).ravel() for v in diff.values()])
    cutoff = np.percentile(abs_delta, q=percentile)
    out = {}
    for name, d in diff.items():
        if np.ndim(d) == 0:
            out[name] = d * total_steps
            continue
        d[(d > -cutoff) & (d < cutoff)] = 0.0
        out[name] = np.clip(d, -gamma, gamma) * total_steps
    return out


def numpy_svt(
    model_diff: dict[str, np.ndarray],
    total_steps: float,
    fraction: float = 0.1,
    epsilon: float = 0.1,
    noise_var: float = 0.1,
    gamma: float = 1e-5,
    tau: float = 1e-6,
) -> dict[str, np.ndarray]:
    """NVFlare's SVTPrivacy (numpy, legacy ``np.random``), as published (quirk included)."""
    names = sorted(model_diff)
    delta_w = np.concatenate([model_diff[k].ravel() / np.float64(total_steps) for k in names])
    n = delta_w.size
    n_upload = int(min(math.ceil(n * fraction), n))
    lambda_rho = gamma * 2.0 / epsilon
    threshold = tau + np.random.laplace(scale=lambda_rho)
    eps_2 = epsilon * (2 * n_upload) ** (2.0 / 3.0)
    lambda_nu = 4.0 * gamma * n_upload / eps_2
    abs_delta = np.abs(np.clip(delta_w, -gamma, gamma))
    accepted = np.empty(0, dtype=np.int64)
    candidates = np.arange(n)
    while accepted.size < n_upload:
        nu = np.random.laplace(scale=lambda_nu, size=candidates.shape)
        above = abs_delta[candidates] + nu >= threshold
        accepted = np.concatenate([accepted, candidates[above]])
        candidates = candidates[~above]
    accepted = np.random.choice(accepted, size=n_upload)
    noise = np.random.laplace(scale=gamma * 2.0 / noise_var, size=accepted.shape)
    delta_w[accepted] = np.clip(delta_w[accepted] + noise, -gamma, gamma)
    delta_w[candidates] = 0
    out, start = {}, 0
    for k in names:
        v = model_diff[k]
        if np.ndim(v) == 0:
            out[k] = v
            start += 1
            continue
        out[k] = (delta_w[start : start + v.size].reshape(v.shape) * total_steps).astype(v.dtype)
        start += v.size
    return out


# ------------------------------------------------------------------------------- the diffs


def make_diff(params: int, tensors: int, seed: int = 0) -> dict[str, np.ndarray]:
    """~``params`` float32 values over ``tensors`` tensors: a few big matrices, many small ones."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.2, tensors) + 0.02
    sizes = np.maximum((weights / weights.sum() * params).astype(np.int64), 1)
    sizes[np.argmax(sizes)] += params - sizes.sum()
    return {
        f"layer{i:02d}.{'weight' if s > 4096 else 'bias'}": (
            rng.standard_normal(int(s), dtype=np.float32) * np.float32(1e-3)
        )
        for i, s in enumerate(sizes)
    }


# ------------------------------------------------------------------------------ measurement


def _rss() -> tuple[int, int]:
    rss = hwm = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Sampler:
    """Peak VmRSS, sampled every 2 ms (a fallback where VmHWM cannot be reset)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss()[0])
            time.sleep(0.002)

    def __enter__(self) -> _Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss()[0])


def measure(
    run: Callable[[], Any], repeat: int, cuda: bool
) -> tuple[float, float, float, list[float]]:
    """(median seconds, first-round seconds, peak extra bytes, all round times).

    Peak extra memory is taken over all rounds, above the RSS (or CUDA allocation) before the
    first; each round's result is dropped before the next round starts.
    """
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _reset_hwm()
    base_rss = _rss()[0]
    times: list[float] = []
    with _Sampler() as sampler:
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            out = run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(_rss()[1], sampler.peak) - base_rss
    steady = times[1:] or times
    return statistics.median(steady), times[0], float(peak), times


# ------------------------------------------------------------------------------------ main


def run_one(proto: str, impl: str, params: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this process: build the diff, run ``repeat`` + 1 rounds."""
    import torch

    from engine.privacy import PercentileProtocol, SVTProtocol

    cuda = args.device == "cuda" and impl == "engine"
    diff = make_diff(params, args.tensors)
    nbytes = sum(v.nbytes for v in diff.values())
    ctx = {"total_steps": args.steps}
    run: Callable[[], Any]
    if impl == "engine":
        data: Any = {k: torch.from_numpy(v).cuda() for k, v in diff.items()} if cuda else diff
        p: Any = PercentileProtocol() if proto == "percentile" else SVTProtocol(seed=0)
        run = lambda: p.apply(data, ctx)  # noqa: E731
        device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} thr)"
    else:
        np.random.seed(0)
        ref = numpy_percentile if proto == "percentile" else numpy_svt
        run = lambda: ref(diff, args.steps)  # noqa: E731
        device = "cpu (numpy)"
    seconds, first, peak, times = measure(run, args.repeat, cuda)
    return {
        "bench": "privacy",
        "protocol": proto,
        "impl": impl,
        "device": device,
        "params": params,
        "tensors": len(diff),
        "diff_mb": round(nbytes / MB, 1),
        "seconds": round(seconds, 4),
        "first_round_s": round(first, 4),
        "gb_per_s": round(nbytes / seconds / GB, 3),
        "peak_extra_mb": round(peak / MB, 1),
        "peak_x_diff": round(peak / nbytes, 2),
        "rounds_s": [round(t, 4) for t in times],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100", help="millions of parameters, comma-separated")
    ap.add_argument("--tensors", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--protocols", default="percentile,svt")
    ap.add_argument("--steps", type=float, default=10.0, help="total_steps (local steps T)")
    ap.add_argument("--no-reference", action="store_true", help="skip the numpy reference")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument(
        "--one", nargs=3, metavar=("PROTOCOL", "IMPL", "PARAMS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)

    if args.one:  # a child: one measurement, one JSON line
        proto, impl, params = args.one
        print(json.dumps(run_one(proto, impl, int(params), args)), flush=True)
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA: nothing to measure on --device cuda")
            return 0
    protocols = args.protocols.split(",")
    for proto in protocols:
        if proto not in ("percentile", "svt"):
            ap.error(f"unknown protocol {proto!r}")
    impls = ["engine"] if args.no_reference else ["engine", "numpy"]
    rows: list[dict[str, Any]] = []
    for millions in [float(s) for s in args.sizes.split(",")]:
        for proto in protocols:
            for impl in impls:
                # each measurement in a fresh process: memory freed by an earlier one (and kept
                # by the allocator) would otherwise hide part of the next one's peak
                cmd = [sys.executable, __file__, "--one", proto, impl, str(int(millions * 1e6))]
                cmd += ["--tensors", str(args.tensors), "--repeat", str(args.repeat)]
                cmd += ["--device", args.device, "--steps", str(args.steps)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    return 1
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)

    if args.json_only:
        return 0
    print()
    print("| protocol | params | impl | device | s | GB/s | peak extra MB (x diff) | vs numpy |")
    print("|---|---|---|---|---|---|---|---|")
    ref_s = {(r["protocol"], r["params"]): r["seconds"] for r in rows if r["impl"] == "numpy"}
    verdicts = []
    for r in rows:
        base = ref_s.get((r["protocol"], r["params"]))
        ratio = f"{base / r['seconds']:.1f}x" if base and r["impl"] == "engine" else ""
        print(
            f"| {r['protocol']} | {r['params'] / 1e6:g}M | {r['impl']} | {r['device']} "
            f"| {r['seconds']:.3f} | {r['gb_per_s']:.2f} "
            f"| {r['peak_extra_mb']:.0f} ({r['peak_x_diff']:.2f}x) | {ratio} |"
        )
        if r["impl"] == "engine" and r["params"] >= 100_000_000 and base:
            speed = base / r["seconds"]
            ok = speed >= 3 and r["peak_x_diff"] <= 2
            verdicts.append(
                f"{r['protocol']} at {r['params'] / 1e6:g}M: {speed:.1f}x numpy (target >= 3x, "
                f"aim 5x), peak {r['peak_x_diff']:.2f}x diff (target <= 2x): "
                f"{'PASS' if ok else 'FAIL'}"
            )
    if verdicts:
        print()
        print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
