"""Homomorphic encryption: encrypt, aggregate (3 sites) and decrypt a model of 1M and 10M params.

Our path (engine.he + engine.server.aggregator.HEAccumulator) at NVFlare's default CKKS
parameters (8192, [60, 40, 40], 2^40): seconds per step, ciphertext bytes per parameter, and the
largest error of the decrypted average against the plaintext average. Prints JSON lines, then
a table. ``python bench/he.py [--sizes 1000000 10000000]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from engine import he
from engine.server.aggregator import HEAccumulator


def run(n: int, sites: int = 3) -> dict[str, float]:
    private_b, public_b = he.make_contexts()
    ts = he.tenseal()
    private, public = ts.context_from(private_b), ts.context_from(public_b)
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(n).astype(np.float32)}
    deltas = [rng.standard_normal(n).astype(np.float32) * 0.01 for _ in range(sites)]
    n_iters = [10, 30, 20][:sites]
    t0 = time.perf_counter()
    cts = [he.encrypt(private, d, factor=k) for d, k in zip(deltas, n_iters, strict=True)]
    encrypt_s = (time.perf_counter() - t0) / sites
    acc = HEAccumulator(public)
    t0 = time.perf_counter()
    for i, (ct, k) in enumerate(zip(cts, n_iters, strict=True)):
        acc.screen({"w": ct}, base)
        acc.add(f"s{i}", {"w": ct}, weight=float(k))
    new = acc.apply(base)
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = he.decrypt(private, new["w"])
    decrypt_s = time.perf_counter() - t0
    expect = base["w"] + sum(k * d for d, k in zip(deltas, n_iters, strict=True)) / sum(n_iters)
    return {
        "params": n,
        "encrypt_s_per_site": round(encrypt_s, 2),
        "aggregate_s_3_sites": round(aggregate_s, 2),
        "decrypt_s": round(decrypt_s, 2),
        "ct_bytes_per_param": round(cts[0].nbytes / n, 1),
        "max_abs_error": float(np.max(np.abs(got.astype(np.float64) - expect))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    rows = []
    for n in parser.parse_args().sizes:
        row = run(n)
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
