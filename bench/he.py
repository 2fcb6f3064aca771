"""Homomorphic encryption: encrypt, aggregate (3 sites) and decrypt a model of 1M and 10M params.

Our path (engine.he + engine.server.aggregator.HEAccumulator) at NVFlare's default CKKS
parameters (8192, [60, 40, 40], 2^40): seconds per step, ciphertext bytes per parameter, and the
largest error of the decrypted average against the plaintext average. With NVFlare installed
(its own venv: ``python3 -m venv bench/.venv-he && bench/.venv-he/bin/pip install nvflare
tenseal torch``) the same steps run, in the same process on the same data and context, through
NVFlare's ``HEModelEncryptor.encryption`` (+ serialization for the wire),
``HEInTimeAccumulateWeightedAggregator.accept/aggregate`` (after deserializing with the server's
public context) and ``HEModelDecryptor.decryption``; the ratio is ours / NVFlare's seconds.
Prints JSON lines, then a table.
``PYTHONPATH=. bench/.venv-he/bin/python bench/he.py [--sizes 1000000 10000000]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import numpy as np

from engine import he
from engine.server.aggregator import HEAccumulator


def run(n: int, sites: int = 3, nvflare: bool = False) -> list[dict[str, object]]:
    private_b, public_b = he.make_contexts()
    ts = he.tenseal()
    private, public = ts.context_from(private_b), ts.context_from(public_b)
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(n).astype(np.float32)}
    deltas = [rng.standard_normal(n).astype(np.float32) * 0.01 for _ in range(sites)]
    n_iters = [10, 30, 20][:sites]
    ours = run_ours(private, public, base, deltas, n_iters)
    rows: list[dict[str, object]] = [{"impl": "fltui", **ours}]
    if nvflare:
        theirs = run_nvflare(private, public, base, deltas, n_iters)
        rows.append({"impl": "nvflare", **theirs})
        keys = ("encrypt_s_per_site", "aggregate_s_3_sites", "decrypt_s")
        rows.append(
            {
                "impl": "ratio fltui/nvflare",
                "params": n,
                **{k: round(float(ours[k]) / max(float(theirs[k]), 1e-9), 2) for k in keys},
            }
        )
    return rows


def run_ours(private, public, base, deltas, n_iters) -> dict[str, float]:
    n, sites = base["w"].size, len(deltas)
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


def run_nvflare(private, public, base, deltas, n_iters) -> dict[str, float]:
    """The same steps through NVFlare's own HE components (its venv only)."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey  # deferred: NVFlare is the bench's own
    from nvflare.apis.event_type import EventType  # deferred: as above
    from nvflare.apis.fl_constant import ReservedKey  # deferred: as above
    from nvflare.apis.fl_context import FLContext  # deferred: as above
    from nvflare.app_common.app_constant import AppConstants  # deferred: as above
    from nvflare.app_opt.he.homomorphic_encrypt import (  # deferred: as above
        deserialize_nested_dict,
        serialize_nested_dict,
    )
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import (  # deferred: as above
        HEInTimeAccumulateWeightedAggregator,
    )
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor  # deferred: as above
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor  # deferred: as above

    n, sites = base["w"].size, len(deltas)
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    wire = []
    t0 = time.perf_counter()
    for d, k in zip(deltas, n_iters, strict=True):
        enc = HEModelEncryptor(weigh_by_local_iter=True)
        enc.tenseal_context, enc.encrypt_layers, enc.n_iter = private, [True], k
        params, keys = enc.encryption({"w": d.copy()}, fl_ctx)
        wire.append((serialize_nested_dict(params), keys))  # bytes, as they leave the site
    encrypt_s = (time.perf_counter() - t0) / sites
    agg = HEInTimeAccumulateWeightedAggregator(weigh_by_local_iter=False)
    agg.handle_event(EventType.START_RUN, fl_ctx)  # how NVFlare's runtime sets it up
    t0 = time.perf_counter()
    for i, (params, keys) in enumerate(wire):
        data = deserialize_nested_dict(dict(params), public)
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=data)
        dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, keys)
        # No NUM_STEPS_CURRENT_ROUND: NVFlare's DXOAggregator would weigh by n_iter a second
        # time (the encryptor already did), so each site counts 1 as in its HE example.
        shareable = dxo.to_shareable()
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: f"s{i}"})
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        assert agg.accept(shareable, fl_ctx), "NVFlare's aggregator refused a contribution"
    result = DXO.from_shareable(agg.aggregate(fl_ctx)) if hasattr(DXO, "from_shareable") else None
    if result is None:
        from nvflare.apis.dxo import from_shareable  # deferred: older NVFlare spelling

        result = from_shareable(agg.aggregate(fl_ctx))
    # NVFlare's aggregator weighs each site by 1 (the sites weighed by n_iter before
    # encryption) and divides by Σ1 = sites: its result is Σ Δ·n_iter / sites, not / Σ n_iter
    # (a third multiplication to renormalise does not fit at [60, 40, 40]: "scale out of
    # bounds"). Its shareable generator then adds the global model, timed here too.
    new = serialize_nested_dict({"w": result.data["w"] + base["w"].astype(np.float64)})
    aggregate_s = time.perf_counter() - t0
    dec = HEModelDecryptor()
    dec.tenseal_context = private
    t0 = time.perf_counter()
    got = np.asarray(dec.decryption(new, {"w": True}, fl_ctx)["w"], dtype=np.float64)
    decrypt_s = time.perf_counter() - t0
    expect = base["w"] + sum(k * d for d, k in zip(deltas, n_iters, strict=True)) / sites
    return {
        "params": n,
        "encrypt_s_per_site": round(encrypt_s, 2),
        "aggregate_s_3_sites": round(aggregate_s, 2),
        "decrypt_s": round(decrypt_s, 2),
        "ct_bytes_per_param": round(len(wire[0][0]["w"]) / n, 1),
        "max_abs_error": float(np.max(np.abs(got - expect))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--no-nvflare", action="store_true", help="our path only (NVFlare is not installed)"
    )
    args = parser.parse_args()
    nvflare = not args.no_nvflare and importlib.util.find_spec("nvflare") is not None
    rows = []
    for n in args.sizes:
        for row in run(n, nvflare=nvflare):
            print(json.dumps(row), flush=True)
            rows.append(row)
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))


if __name__ == "__main__":
    main()
