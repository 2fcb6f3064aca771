"""Privacy protocols against the published algorithms; dtypes, devices, config errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.config import ComponentSpec, ConfigError
from engine.privacy import (
    PRIVACY_PROTOCOLS,
    LaplacianProtocol,
    NonFiniteDiffError,
    PercentileProtocol,
    PrivacyArgumentError,
    PrivacyProtocol,
    SVTProtocol,
    _ops,
    build_privacy,
)

ROOT = Path(__file__).resolve().parents[2]
WHERE = "/x/config_fed_client.json: client.privacy"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.fixture(params=["numpy-kernels", "torch-kernels"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both CPU code paths: numpy for the bool work, and the torch ops a GPU runs."""
    monkeypatch.setattr(_ops, "NUMPY_ON_CPU", request.param == "numpy-kernels")
    yield request.param


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking and the sampled-bracket selection, on diffs small enough for a quick test."""
    monkeypatch.setattr(_ops, "CPU_CHUNK", 1000)
    monkeypatch.setattr(_ops, "EXACT_BELOW", 2000)


def model(seed: int = 0, scale: float = 1e-3, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.standard_normal((16, 8, 3, 3)) * scale).astype(dtype),
        "conv.bias": (rng.standard_normal(16) * scale).astype(dtype),
        "fc.weight": (rng.laplace(size=(30, 200)) * scale).astype(dtype),
        "fc.bias": (rng.standard_normal(30) * scale).astype(dtype),
        "bn.momentum": np.array(0.5 * scale, dtype=dtype),
    }


def reference_percentile(
    diff: dict[str, np.ndarray], percentile: float, gamma: float, steps: float
) -> dict[str, np.ndarray]:
    """NVFlare's PercentilePrivacy, as published (numpy)."""
    d = {k: v / steps for k, v in diff.items()}
    cutoff = np.percentile(np.concatenate([np.abs(v).ravel() for v in d.values()]), percentile)
    out = {}
    for k, v in d.items():
        if np.ndim(v) == 0:
            out[k] = v * steps
            continue
        v = v.copy()
        v[(v > -cutoff) & (v < cutoff)] = 0
        out[k] = np.clip(v, -gamma, gamma) * steps
    return out


def nonzero(out: dict[str, Any], skip_scalars: bool = True) -> int:
    return sum(int((v != 0).sum()) for v in out.values() if not (skip_scalars and v.ndim == 0))


def size(diff: dict[str, Any]) -> int:
    return sum(int(np.prod(v.shape)) for v in diff.values())


# ------------------------------------------------------------------------------ Percentile


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("pct", [0, 10, 37.5, 90, 100])
def test_percentile_matches_the_numpy_reference(
    backend: str, small_chunks: None, steps: int, pct: float
) -> None:
    diff = model()
    gamma = 2e-3
    out = PercentileProtocol(percentile=pct, gamma=gamma).apply(diff, {"total_steps": steps})
    ref = reference_percentile(diff, pct, gamma, steps)
    assert list(out) == list(diff)
    for k in diff:
        assert out[k].dtype == diff[k].dtype and out[k].shape == diff[k].shape
        np.testing.assert_array_equal(out[k] != 0, ref[k] != 0, err_msg=k)
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=0, err_msg=k)


def _decimal_diff(n: int, kind: str, seed: int) -> dict[str, np.ndarray]:
    """Values with few decimals (0.04, -0.02, ...): not binary fractions, so a rank or an
    interpolation computed differently from numpy's lands a rounding step off a value."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.standard_normal(n) * 0.5, 2 if n > 200 else 3)
    if kind == "float64":
        return {"w": values[: n // 2], "b": values[n // 2 :]}
    if kind == "float32":
        return {"w": values[: n // 2].astype(np.float32), "b": values[n // 2 :].astype(np.float32)}
    # mixed: float32 arrays beside a float64 array and a float64 scalar; the concatenation of
    # |d| is then float64, and so is the cutoff every float32 value is compared with
    return {
        "w": values[: n // 2].astype(np.float32),
        "b": values[n // 2 : -1],
        "s": np.array(values[-1]),
    }


def test_percentile_keeps_the_value_at_the_cutoff_for_float64_input() -> None:
    d = np.array([0.5, -0.02, 0.003, -0.9, 0.04, 2.0])
    assert np.percentile(np.abs(d), 40) == 0.04  # numpy's cutoff is the value itself
    out = PercentileProtocol(percentile=40, gamma=10).apply({"d": d}, {})
    np.testing.assert_array_equal(out["d"], [0.5, 0, 0, -0.9, 0.04, 2.0])
    mixed = {"d": d.astype(np.float32), "s": np.float64(0.3)}
    out = PercentileProtocol(percentile=40, gamma=10).apply(mixed, {})
    ref = reference_percentile(mixed, 40, 10, 1)
    np.testing.assert_array_equal(out["d"], ref["d"])


@pytest.mark.parametrize("kind", ["float64", "float32", "mixed"])
@pytest.mark.parametrize("n", [2, 6, 7, 11, 101, 1001, 4097])
def test_percentile_cutoff_is_numpys_for_every_dtype(
    backend: str, small_chunks: None, kind: str, n: int
) -> None:
    """Against np.percentile (linear), for percentiles where (n-1)·q is an integer (the cutoff
    is one of the values) and where it is not; 4097 values go through the sampled bracket."""
    diff = _decimal_diff(n, kind, seed=n)
    for pct in (0, 10, 20, 25, 30, 33.3, 37.5, 40, 50, 60, 70, 75, 80, 90, 99, 100):
        for steps in (1, 3):
            out = PercentileProtocol(percentile=pct, gamma=8.0).apply(diff, {"total_steps": steps})
            ref = reference_percentile(diff, pct, 8.0, steps)
            for k in diff:
                assert out[k].dtype == diff[k].dtype
                np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{k} at {pct}, T={steps}")


@pytest.mark.parametrize("pct", [10, 50, 75])
def test_percentile_shares_the_top_share_within_gamma(backend: str, pct: float) -> None:
    rng = np.random.default_rng(1)
    diff = {
        f"w{i}": rng.standard_normal(rng.integers(1, 40_000)).astype(np.float32) for i in range(12)
    }
    n = size(diff)
    steps, gamma = 4, 0.5
    out = PercentileProtocol(percentile=pct, gamma=gamma).apply(diff, {"total_steps": steps})
    kept = nonzero(out)
    assert abs(kept - n * (100 - pct) / 100) <= 2
    bound = gamma * steps * (1 + 1e-6)
    assert max(float(np.abs(v).max()) for v in out.values()) <= bound
    # the survivors are the largest |d|: every kept |Δ| >= every zeroed one
    flat_in = np.concatenate([np.abs(diff[k]).ravel() for k in diff])
    flat_out = np.concatenate([out[k].ravel() for k in diff])
    assert flat_in[flat_out != 0].min() >= flat_in[flat_out == 0].max()


def test_percentile_with_heavy_ties_is_still_exact(backend: str, small_chunks: None) -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal(20_000).astype(np.float32)
    a[rng.random(20_000) < 0.6] = 0.0  # 60 % exact zeros: the 10th and 50th percentiles are ties
    a[:3000] = 0.25
    diff = {"a": a, "b": np.full(5000, 0.25, np.float32)}
    for pct in (10, 50, 65, 70):
        out = PercentileProtocol(percentile=pct, gamma=1.0).apply(diff, {})
        ref = reference_percentile(diff, pct, 1.0, 1)
        for k in diff:
            np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{k} at {pct}")


@pytest.mark.parametrize("tie", [0.0, 0.25])
def test_percentile_sweep_over_a_tie_block(backend: str, small_chunks: None, tie: float) -> None:
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(30_000) * 0.5).astype(np.float32)
    a[rng.random(30_000) < 0.35] = tie  # the bracket's bound lands on the block
    diff = {"a": a, "s": np.array(0.1, np.float32)}
    for pct in range(0, 101, 5):
        out = PercentileProtocol(percentile=pct, gamma=0.3).apply(diff, {"total_steps": 2})
        ref = reference_percentile(diff, pct, 0.3, 2)
        np.testing.assert_array_equal(out["a"] != 0, ref["a"] != 0, err_msg=f"at {pct}")
        # gamma = 0.3 rounds up in float32; the reference clips there, this one just below
        np.testing.assert_allclose(out["a"], ref["a"], rtol=1e-6, atol=0, err_msg=f"at {pct}")


def test_percentile_falls_back_when_the_bracket_misses(
    backend: str, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    diff = model(12)
    calls: list[int] = []
    exact = _ops._exact_order_stats

    def spy(*args: Any) -> list[float]:
        calls.append(1)
        return exact(*args)

    monkeypatch.setattr(_ops, "_exact_order_stats", spy)
    monkeypatch.setattr(_ops, "_bracket", lambda *args: (5.0, 6.0))  # far above every |d|
    out = PercentileProtocol(percentile=40, gamma=1e-3).apply(diff, {"total_steps": 3})
    ref = reference_percentile(diff, 40, 1e-3, 3)
    assert calls
    for k in diff:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=0)


def test_percentile_does_not_modify_its_input(backend: str) -> None:
    diff = model()
    before = {k: v.copy() for k, v in diff.items()}
    t = torch.from_numpy(diff["fc.weight"].copy())
    PercentileProtocol(percentile=50).apply(diff, {"total_steps": 2})
    PercentileProtocol(percentile=50).apply({"t": t}, {})
    SVTProtocol(seed=0).apply(diff, {"total_steps": 2})
    for k in diff:
        np.testing.assert_array_equal(diff[k], before[k])
    np.testing.assert_array_equal(t.numpy(), before["fc.weight"])


def test_percentile_reuses_its_buffers_across_rounds(small_chunks: None) -> None:
    p = PercentileProtocol(percentile=30, gamma=1e-3)
    first = p.apply(model(0), {})
    held = p._workspace.nbytes
    for seed in (1, 2):
        diff = model(seed)
        out = p.apply(diff, {})
        ref = reference_percentile(diff, 30, 1e-3, 1)
        for k in diff:
            np.testing.assert_array_equal(out[k] != 0, ref[k] != 0)
    assert p._workspace.nbytes == held > 0
    assert first is not out


# -------------------------------------------------------------------------------------- SVT


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_svt_shares_at_most_ceil_fraction_n_within_gamma(
    backend: str, small_chunks: None, steps: int, fraction: float
) -> None:
    diff = model(3)
    gamma = 1e-4
    svt = SVTProtocol(fraction=fraction, gamma=gamma, tau=1e-5, seed=7)
    out = svt.apply(diff, {"total_steps": steps})
    n = math.ceil(size(diff) * fraction)
    assert svt.last_stats.target == n and svt.last_stats.size == size(diff)
    shared = nonzero(out)
    assert 0 < shared <= n
    bound = gamma * steps * (1 + 1e-6)
    for k, v in out.items():
        assert v.dtype == diff[k].dtype and v.shape == diff[k].shape
        if v.ndim:
            assert float(np.abs(v).max()) <= bound, k
    assert out["bn.momentum"] == diff["bn.momentum"]  # the scalar passes through


def test_svt_zeroes_what_it_does_not_release(backend: str) -> None:
    # tau far below zero: every candidate passes at once, so most accepted values are not
    # drawn; the reference would leak them raw. Values here are far outside ±gamma.
    diff = {"w": np.full(10_000, 5.0, np.float32)}
    svt = SVTProtocol(fraction=0.1, gamma=1e-3, tau=-100.0, seed=3)
    out = svt.apply(diff, {})
    assert svt.last_stats.accepted == 10_000 and svt.last_stats.passes == 1
    w = out["w"]
    assert 0 < np.count_nonzero(w) <= 1000
    assert np.abs(w).max() <= 1e-3 * (1 + 1e-6)
    # n = 1000 draws with replacement from 10 000: about 1000 (1 - e^-0.1) / 0.1 ≈ 952 distinct
    assert 900 <= np.count_nonzero(w) <= 1000


def test_svt_fixed_seed_reproduces_exactly_and_seeds_differ(backend: str) -> None:
    diff = model(4)
    a1 = SVTProtocol(seed=11).apply(diff, {"total_steps": 2})
    a2 = SVTProtocol(seed=11).apply(diff, {"total_steps": 2})
    b = SVTProtocol(seed=12).apply(diff, {"total_steps": 2})
    for k in diff:
        np.testing.assert_array_equal(a1[k], a2[k])
    assert any(not np.array_equal(a1[k], b[k]) for k in diff if diff[k].ndim)
    # successive rounds continue the stream, and are reproducible as a sequence
    p, q = SVTProtocol(seed=5), SVTProtocol(seed=5)
    r1, r2 = p.apply(diff, {}), p.apply(diff, {})
    assert not np.array_equal(r1["fc.weight"], r2["fc.weight"])
    np.testing.assert_array_equal(q.apply(diff, {})["fc.weight"], r1["fc.weight"])
    np.testing.assert_array_equal(q.apply(diff, {})["fc.weight"], r2["fc.weight"])


@pytest.mark.parametrize("regime", ["wide-noise", "narrow-noise"])
def test_svt_acceptance_follows_the_laplace_threshold(backend: str, regime: str) -> None:
    """Pass 1 accepts candidate i with probability P(a_i + Lap(λν) >= τ̂), whatever shortcut
    the byte-level test takes: the count matches the sum of those probabilities.

    λν is computed here from the published formula, not read from the protocol's statistics
    (a wrong scale would otherwise be the expectation too); τ̂, a random draw, can only be read
    from them, so it is first checked to lie within 30 threshold-noise scales (2γ/ε1) of τ.
    """
    rng = np.random.default_rng(5)
    gamma = 1e-3
    x = rng.uniform(-2 * gamma, 2 * gamma, 200_000).astype(np.float32)
    n_up = math.ceil(x.size * 0.1)
    if regime == "narrow-noise":  # λν ≈ γ/2: S(τ̂ - a) spans ~0.2..0.8, most bytes ambiguous
        eps = 4 * gamma * n_up / ((2 * n_up) ** (2 / 3)) / (gamma / 2)
        tau = gamma / 2
    else:  # the defaults' regime: λν >> γ, bytes settle nearly all
        eps, tau = 0.1, 1e-6
    svt = SVTProtocol(fraction=0.1, epsilon=eps, gamma=gamma, tau=tau, seed=9)
    svt.apply({"x": x}, {})
    st = svt.last_stats
    assert st.passes == 1 and st.target == n_up
    scale = 4 * gamma * n_up / (eps * (2 * n_up) ** (2 / 3))  # λν = 4γn/ε2, ε2 = ε1·(2n)^(2/3)
    assert abs(st.tau_hat - tau) < 30 * (2 * gamma / eps)
    a = np.minimum(np.abs(x.astype(np.float64)), gamma)
    t = st.tau_hat - a
    e = 0.5 * np.exp(-np.abs(t) / scale)
    p = np.where(t >= 0, e, 1 - e)
    mean, sd = p.sum(), math.sqrt((p * (1 - p)).sum())
    assert abs(st.accepted - mean) < 6 * sd, (st.accepted, mean, sd)


def test_svt_release_noise_has_the_laplace_scale(backend: str) -> None:
    gamma, eps3 = 1.0, 400.0  # noise scale 2γ/ε3 = 0.005, far inside ±γ: clipping is rare
    x = np.zeros(100_000, np.float32)
    out = SVTProtocol(fraction=0.5, epsilon=1.0, noise_var=eps3, gamma=gamma, tau=-10.0, seed=1)
    y = out.apply({"x": x}, {})["x"]
    released = y[y != 0].astype(np.float64)
    assert released.size > 30_000
    # E|Lap(b)| = b, and the sign is symmetric
    assert abs(np.abs(released).mean() / (2 * gamma / eps3) - 1) < 0.03
    assert abs((released > 0).mean() - 0.5) < 0.02


def test_svt_loop_is_bounded_when_the_threshold_is_out_of_reach(backend: str) -> None:
    diff = {"w": np.full(50_000, 1e-5, np.float32)}
    svt = SVTProtocol(tau=1.0, seed=0, max_passes=3)  # τ = 1 >> γ = 1e-5 and λν
    out = svt.apply(diff, {})
    assert svt.last_stats.passes <= 3 and np.count_nonzero(out["w"]) == 0
    svt = SVTProtocol(tau=1.0, seed=0)  # the default guard: hopeless after one pass
    assert np.count_nonzero(svt.apply(diff, {})["w"]) == 0 and svt.last_stats.passes == 1
    # reachable, but slowly: few accepted per pass, and the guard stops with fewer shared
    svt = SVTProtocol(fraction=0.5, epsilon=10.0, gamma=1e-3, tau=0.018, seed=0, max_passes=2)
    out = svt.apply({"w": np.full(50_000, 1e-3, np.float32)}, {})
    st = svt.last_stats
    assert st.passes == 2 and 0 < st.accepted < st.target
    assert 0 < np.count_nonzero(out["w"]) <= st.accepted


def test_laplacian_reads_fraction_as_a_percentage_above_one(backend: str) -> None:
    diff = model(6)
    lap = LaplacianProtocol(fraction=50, seed=2)
    assert lap.fraction == 50 and lap._q == 0.5 and lap.noise_var == lap.epsilon == 1000
    lap.apply(diff, {})
    assert lap.last_stats.target == math.ceil(size(diff) * 0.5)
    small = LaplacianProtocol(seed=2)  # default fraction 0.1 is a fraction
    small.apply(diff, {})
    assert small.last_stats.target == math.ceil(size(diff) * 0.1)
    assert nonzero(small.apply(diff, {})) <= small.last_stats.target
    assert LaplacianProtocol(fraction=1)._q == 1.0
    assert LaplacianProtocol(noise_var=2.0).noise_var == 2.0


# ------------------------------------------------------------------- shapes, dtypes, devices


@pytest.mark.parametrize("factory", [PercentileProtocol, lambda: SVTProtocol(seed=1)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dtypes_and_types_are_kept(
    backend: str, small_chunks: None, factory: Any, dtype: str
) -> None:
    base = model(7, scale=1e-2)
    tdt = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(v.astype(np.float64)).to(tdt) for k, v in base.items()}
    out = factory().apply(tensors, {"total_steps": 2})
    for k, v in out.items():
        assert isinstance(v, torch.Tensor) and v.dtype == tdt and v.shape == tensors[k].shape
        assert v.device == tensors[k].device
    assert torch.equal(out["bn.momentum"], tensors["bn.momentum"])
    if dtype != "bfloat16":  # numpy has no bfloat16
        arrays = {k: v.astype(dtype) for k, v in base.items()}
        out = factory().apply(arrays, {"total_steps": 2})
        for k, v in out.items():
            assert isinstance(v, np.ndarray) and v.dtype == np.dtype(dtype)
            assert v.shape == arrays[k].shape


def test_scalars_and_integer_variables_pass_through(backend: str) -> None:
    diff = {
        "w": np.linspace(-1, 1, 1001, dtype=np.float32),
        "s": np.array(7.5, np.float32),
        "steps": np.array(12, np.int64),
        "t": torch.tensor(3.25),
    }
    for p in (PercentileProtocol(percentile=90, gamma=0.1), SVTProtocol(fraction=0.5, seed=0)):
        out = p.apply(diff, {"total_steps": 4})
        assert out["s"] == 7.5 and out["s"].dtype == np.float32 and out["s"].shape == ()
        assert out["steps"] == 12 and out["steps"].dtype == np.int64
        assert isinstance(out["t"], torch.Tensor) and float(out["t"]) == 3.25
        assert out["s"] is not diff["s"]


@pytest.mark.parametrize("factory", [PercentileProtocol, lambda: SVTProtocol(seed=1)])
def test_empty_and_one_element_diffs(backend: str, factory: Any) -> None:
    assert factory().apply({}, {}) == {}
    out = factory().apply({"e": np.zeros((0, 3), np.float32)}, {})
    assert out["e"].shape == (0, 3)
    out = factory().apply({"one": np.array([0.003], np.float32)}, {"total_steps": 1})
    assert out["one"].shape == (1,) and out["one"].dtype == np.float32
    assert abs(float(out["one"][0])) <= 0.01 + 1e-9
    out = factory().apply({"s": np.array(2.0)}, {})
    assert out["s"] == 2.0


def test_percentile_one_element_is_kept_and_clipped() -> None:
    out = PercentileProtocol(percentile=50, gamma=0.01).apply({"one": np.array([0.5])}, {})
    assert out["one"][0] == 0.01


@pytest.mark.parametrize(
    "factory", [PercentileProtocol, lambda: SVTProtocol(seed=1), lambda: LaplacianProtocol(seed=1)]
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_diff_is_refused_naming_the_variable(
    backend: str, small_chunks: None, factory: Any, bad: float
) -> None:
    diff = model(8)
    diff["fc.weight"] = diff["fc.weight"].copy()
    diff["fc.weight"][17, 3] = bad
    with pytest.raises(NonFiniteDiffError, match=r"'fc\.weight'") as err:
        factory().apply(diff, {})
    assert err.value.name == "fc.weight" and isinstance(err.value, ValueError)
    t = {"a": torch.zeros(10), "b": torch.tensor([1.0, bad])}
    with pytest.raises(NonFiniteDiffError, match="'b'"):
        factory().apply(t, {})


def test_numpy_in_numpy_out_torch_in_torch_out() -> None:
    diff = model(9)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in diff.items()}
    for p in (PercentileProtocol(), SVTProtocol(seed=0)):
        assert all(isinstance(v, np.ndarray) for v in p.apply(diff, {}).values())
        out = p.apply(tensors, {})
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in out.values())
    # the same values either way
    a = PercentileProtocol(percentile=20).apply(diff, {})
    b = PercentileProtocol(percentile=20).apply(tensors, {})
    for k in diff:
        np.testing.assert_array_equal(a[k], b[k].numpy())
    a = SVTProtocol(seed=4).apply(diff, {})
    b = SVTProtocol(seed=4).apply(tensors, {})
    for k in diff:
        np.testing.assert_array_equal(a[k], b[k].numpy())


def test_non_contiguous_and_read_only_inputs() -> None:
    base = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    ro = np.frombuffer(base.tobytes(), dtype=np.float32).reshape(300, 200)
    diff = {"t": base.T, "ro": ro, "neg": base[::-1]}
    out = PercentileProtocol(percentile=50, gamma=10).apply(diff, {})
    ref = reference_percentile(diff, 50, 10, 1)
    for k in diff:
        np.testing.assert_array_equal(out[k], ref[k])
    tt = torch.from_numpy(base.copy()).t()
    assert PercentileProtocol().apply({"tt": tt}, {})["tt"].shape == (200, 300)


@pytest.mark.gpu
@CUDA
def test_cuda_tensors_stay_on_the_gpu() -> None:
    diff = {k: torch.from_numpy(v).cuda() for k, v in model(10).items()}
    diff["half"] = torch.randn(1000, device="cuda", dtype=torch.float16) * 1e-3
    diff["bf"] = torch.randn(1000, device="cuda", dtype=torch.bfloat16) * 1e-3
    cpu = {k: v.cpu() for k, v in diff.items()}
    for p in (PercentileProtocol(percentile=30), SVTProtocol(seed=1), LaplacianProtocol(seed=1)):
        out = p.apply(diff, {"total_steps": 2})
        for k, v in out.items():
            assert v.is_cuda and v.dtype == diff[k].dtype and v.shape == diff[k].shape
    # Percentile is deterministic: the GPU gives the CPU's answer
    g = PercentileProtocol(percentile=30).apply(diff, {"total_steps": 2})
    c = PercentileProtocol(percentile=30).apply(cpu, {"total_steps": 2})
    for k in diff:
        assert torch.equal(g[k].cpu(), c[k]), k
    a = SVTProtocol(seed=3).apply(diff, {})
    b = SVTProtocol(seed=3).apply(diff, {})
    assert all(torch.equal(a[k], b[k]) for k in diff)
    n = math.ceil(sum(v.numel() for v in diff.values()) * 0.1)
    assert sum(int(torch.count_nonzero(v)) for k, v in a.items() if v.dim()) <= n
    bad = dict(diff, nan=torch.tensor([0.0, float("nan")], device="cuda"))
    with pytest.raises(NonFiniteDiffError, match="'nan'"):
        SVTProtocol(seed=0).apply(bad, {})
    big = {"w": torch.randn(3_000_000, device="cuda") * 1e-3}  # the bracket path
    g = PercentileProtocol(percentile=10).apply(big, {})
    c = PercentileProtocol(percentile=10).apply({"w": big["w"].cpu()}, {})
    assert torch.equal(g["w"].cpu(), c["w"])


# -------------------------------------------------------------------------------- config


def spec(name: str, **args: Any) -> ComponentSpec:
    return ComponentSpec(name=name, path=None, args=args, where=WHERE)


def test_protocols_are_registered_and_built_from_the_config() -> None:
    assert {"PercentileProtocol", "SVTProtocol", "LaplacianProtocol"} <= set(PRIVACY_PROTOCOLS)
    p = build_privacy(spec("PercentileProtocol", percentile=75, gamma=50))
    assert isinstance(p, PercentileProtocol) and p.percentile == 75 and p.gamma == 50
    s = build_privacy(
        spec("SVTProtocol", fraction=0.1, epsilon=0.1, noise_var=0.1, gamma=1e-5, tau=1e-6)
    )
    assert isinstance(s, SVTProtocol)
    lap = build_privacy(spec("LaplacianProtocol", fraction=50, epsilon=2.0, gamma=1e-4, tau=5e-5))
    assert isinstance(lap, LaplacianProtocol) and lap._q == 0.5
    assert build_privacy(None) is None
    custom = ComponentSpec(name=None, path="engine.privacy.svt.SVTProtocol", args={}, where=WHERE)
    assert isinstance(build_privacy(custom), SVTProtocol)


def test_defaults() -> None:
    p = PercentileProtocol()
    assert (p.percentile, p.gamma) == (10, 0.01)
    s = SVTProtocol()
    assert (s.fraction, s.epsilon, s.noise_var, s.gamma, s.tau) == (0.1, 0.1, 0.1, 1e-05, 1e-06)
    lap = LaplacianProtocol()
    assert (lap.fraction, lap.epsilon, lap.gamma, lap.tau) == (0.1, 1000, 0.001, 0.0001)


@pytest.mark.parametrize(
    ("name", "args", "key", "allowed"),
    [
        ("PercentileProtocol", {"percentile": 120}, "percentile", "[0, 100]"),
        ("PercentileProtocol", {"percentile": -1}, "percentile", "[0, 100]"),
        ("PercentileProtocol", {"percentile": "ten"}, "percentile", "[0, 100]"),
        ("PercentileProtocol", {"gamma": 0}, "gamma", "(0, inf)"),
        ("SVTProtocol", {"epsilon": 0}, "epsilon", "(0, inf)"),
        ("SVTProtocol", {"epsilon": -0.5}, "epsilon", "(0, inf)"),
        ("SVTProtocol", {"fraction": 0}, "fraction", "(0, 1]"),
        ("SVTProtocol", {"fraction": 1.5}, "fraction", "(0, 1]"),
        ("SVTProtocol", {"noise_var": 0}, "noise_var", "(0, inf)"),
        ("SVTProtocol", {"tau": float("nan")}, "tau", "(-inf, inf)"),
        ("SVTProtocol", {"seed": "x"}, "seed", "null or an integer"),
        ("SVTProtocol", {"max_passes": 0}, "max_passes", ">= 1"),
        ("LaplacianProtocol", {"fraction": 150}, "fraction", "(0, 100]"),
        ("LaplacianProtocol", {"epsilon": 0}, "epsilon", "(0, inf)"),
    ],
)
def test_bad_arguments_are_refused_naming_file_key_and_range(
    name: str, args: dict[str, Any], key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_privacy(spec(name, **args))
    msg = str(err.value)
    assert err.value.key == f"client.privacy.args.{key}"
    assert msg.startswith(f"/x/config_fed_client.json: client.privacy.args.{key}: ")
    assert allowed in msg and repr(next(iter(args.values()))) in msg


def test_the_constructor_error_names_its_argument() -> None:
    with pytest.raises(PrivacyArgumentError) as err:
        PercentileProtocol(percentile=101)
    assert err.value.arg == "percentile" and "got 101" in str(err.value)


def test_unknown_protocol_and_unknown_argument() -> None:
    with pytest.raises(ConfigError, match=r"client.privacy.name: unknown privacy protocol 'Nope'"):
        build_privacy(spec("Nope"))
    with pytest.raises(
        ConfigError,
        match=r"client.privacy.args.fractoin: SVTProtocol takes no argument 'fractoin' "
        r"\(did you mean 'fraction'\?\)",
    ):
        build_privacy(spec("SVTProtocol", fractoin=0.2))


def test_importing_the_protocols_does_not_import_torch() -> None:
    code = (
        "import sys, engine.privacy, engine.site; "
        "engine.privacy.SVTProtocol(fraction=0.5); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------- through a real site


def _site_config(tmp_path: Path, privacy: dict[str, Any]) -> Path:
    from engine.demo import prepare_workspace
    from engine.site.paths import SitePaths

    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    mmar = SitePaths(tmp_path / "site-1").mmar(1, "site-1")
    cfg_path = mmar / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["client"].update({"steps_aggregation": 5, "cross_site_validate": False})
    cfg["client"]["privacy"] = privacy
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path


def test_a_bad_percentile_in_the_mmar_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    from engine.events import EventBus
    from engine.site.site_engine import SiteEngine

    cfg_path = _site_config(tmp_path, {"name": "PercentileProtocol", "args": {"percentile": 150}})
    with pytest.raises(ConfigError) as err:
        SiteEngine(tmp_path / "site-1", EventBus())
    assert err.value.key == "client.privacy.args.percentile"
    assert str(err.value).startswith(f"{cfg_path}: client.privacy.args.percentile: ")
    assert "[0, 100]" in str(err.value) and "150" in str(err.value)


def test_svt_from_the_mmar_filters_a_real_round(tmp_path: Path) -> None:
    from engine.config import ServerConfig
    from engine.demo import _set_port
    from engine.events import EventBus, PrivacyApplied
    from engine.fileio import load_npz
    from engine.server import FederatedServer
    from engine.site.paths import SitePaths
    from engine.site.site_engine import SiteEngine
    from tests.conftest import Recorder

    _site_config(tmp_path, {"name": "SVTProtocol", "args": {"fraction": 0.1, "seed": 0}})
    initial = load_npz(tmp_path / "server" / "models" / "initial_model.npz")
    server = FederatedServer(
        ServerConfig(task_name="demo_federation", target="127.0.0.1:0", num_rounds=1),
        tmp_path / "server",
        initial,
        long_poll=0.5,
    )
    _set_port(SitePaths(tmp_path / "site-1").kit, server.start())
    bus = EventBus()
    rec = Recorder(bus)
    engine = SiteEngine(tmp_path / "site-1", bus)
    try:
        assert engine.run() == "completed"
    finally:
        server.stop(grace=0)
    [applied] = rec.of(PrivacyApplied)
    total = sum(v.size for v in initial.values())
    assert applied.protocol == "SVTProtocol" and applied.total_values == total
    assert 0 < applied.shared_values <= math.ceil(total * 0.1)


# --------------------------------------------------------------------- the lineage's signature


@pytest.mark.parametrize(
    "cls", [PrivacyProtocol, PercentileProtocol, SVTProtocol, LaplacianProtocol]
)
def test_apply_takes_train_ctx_with_a_default_as_the_lineage_does(cls: type) -> None:
    """``apply(model_diff, train_ctx=None)``: Clara code calls ``apply(diff)`` alone."""
    import inspect

    param = inspect.signature(cls.apply).parameters["train_ctx"]
    assert param.default is None
    if cls is not PrivacyProtocol:
        diff = model(10)
        protocol = cls() if cls is PercentileProtocol else cls(seed=3)
        out = protocol.apply(diff)  # T = 1, as with an empty context
        again = (cls() if cls is PercentileProtocol else cls(seed=3)).apply(diff, {})
        for k in diff:
            np.testing.assert_array_equal(out[k], again[k])
