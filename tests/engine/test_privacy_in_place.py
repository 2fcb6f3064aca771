"""Privacy in place: the protocols write their result into Δ's own arrays when asked, bit for bit
the result they give out of place, and the model manager asks only for a Δ in its own memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from engine.client.model_manager import ClientModelManager
from engine.privacy import (
    LaplacianProtocol,
    NonFiniteDiffError,
    PercentileProtocol,
    SVTProtocol,
    _ops,
)
from tests.conftest import DictModel
from tests.engine.test_round_memory import _remote

Factory = Callable[[], Any]  # a built-in protocol: its apply takes in_place

FACTORIES: dict[str, Factory] = {
    "percentile-10": lambda: PercentileProtocol(percentile=10, gamma=2e-3),
    "percentile-75": lambda: PercentileProtocol(percentile=75, gamma=1e-3),
    "svt": lambda: SVTProtocol(
        fraction=0.2, epsilon=1.0, noise_var=1.0, gamma=2e-3, tau=1e-3, seed=7
    ),
    "laplacian": lambda: LaplacianProtocol(
        fraction=50, epsilon=10.0, gamma=1e-3, tau=1e-4, seed=11
    ),
}


@pytest.fixture(params=["numpy-kernels", "torch-kernels"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both CPU code paths: numpy for the bool work, and the torch ops a GPU runs."""
    monkeypatch.setattr(_ops, "NUMPY_ON_CPU", request.param == "numpy-kernels")
    yield request.param


def diff_of(seed: int, dtype: Any, big: int = 0) -> dict[str, np.ndarray]:
    """A Δ with several shapes, a 0-d scalar, integer and bool variables, exact zeros of both
    signs and a block of ties; ``big`` values more in one variable."""
    rng = np.random.default_rng(seed)
    fc = rng.laplace(size=(30, 200)) * 1e-3
    fc[rng.random(fc.shape) < 0.1] = 0.0
    fc[rng.random(fc.shape) < 0.05] = -0.0
    fc[rng.random(fc.shape) < 0.05] = 4e-4  # a block of ties
    out = {
        "conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 1e-3).astype(dtype),
        "fc.weight": fc.astype(dtype),
        "bn.num_batches_tracked": np.array([5, -3], np.int64),
        "fc.bias": (rng.standard_normal(30) * 1e-3).astype(dtype),
        "bn.momentum": np.array(3e-4, dtype=dtype),
        "mask": rng.random(7) < 0.5,
    }
    if big:
        out["big.weight"] = (rng.standard_normal(big) * 1e-3).astype(dtype)
    return out


def as_kind(diff: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
    """Independent copies, as numpy arrays or CPU torch tensors."""
    if kind == "numpy":
        return {k: v.copy() for k, v in diff.items()}
    return {k: torch.from_numpy(v.copy()) for k, v in diff.items()}


def to_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def assert_same_bits(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name in want:
        a, b = to_numpy(got[name]), to_numpy(want[name])
        assert type(got[name]) is type(want[name]), name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name}: not bit for bit the out-of-place result"


def shares(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.data_ptr() == b.data_ptr()
    return bool(np.shares_memory(a, b))


# ---------------------------------------------------------------------- the protocols in place


@pytest.mark.parametrize("big", [0, 30_000], ids=["exact-path", "chunked-bracket-path"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_gives_the_out_of_place_result_bit_for_bit_in_the_input(
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    dtype: Any,
    kind: str,
    big: int,
) -> None:
    if big:  # several chunks a variable, and the percentile's sampled bracket
        monkeypatch.setattr(_ops, "CPU_CHUNK", 1000)
        monkeypatch.setattr(_ops, "EXACT_BELOW", 2000)
    make = FACTORIES[name]
    new_way, in_place_way = make(), make()  # the same seed: the same draws, round after round
    for rnd in range(2):  # the second round reuses the work buffers and goes on drawing
        diff = diff_of(rnd, dtype, big)
        pristine = as_kind(diff, kind)
        given = as_kind(diff, kind)
        want = new_way.apply(pristine, {"total_steps": 3})
        for k in diff:  # out of place leaves its input as it was
            assert to_numpy(pristine[k]).tobytes() == diff[k].tobytes()
        got = in_place_way.apply(given, {"total_steps": 3}, in_place=True)
        assert_same_bits(got, want)
        for k in given:  # the very arrays given, written (floats) or passed through (the rest)
            assert got[k] is given[k], k
            assert shares(got[k], given[k]), k
        assert to_numpy(got["bn.momentum"]).tobytes() == diff["bn.momentum"].tobytes()
        assert np.count_nonzero(to_numpy(got["fc.weight"])) > 0
        if isinstance(new_way, SVTProtocol):
            assert new_way.last_stats == in_place_way.last_stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("name", list(FACTORIES))
def test_cuda_tensors_in_place_give_the_out_of_place_result(name: str) -> None:
    diff = {k: torch.from_numpy(v).cuda() for k, v in diff_of(4, np.float32).items()}
    diff["half"] = torch.randn(1000, device="cuda", dtype=torch.float16) * 1e-3
    diff["bf"] = torch.randn(1000, device="cuda", dtype=torch.bfloat16) * 1e-3
    diff["big"] = torch.randn(3_000_000, device="cuda") * 1e-3  # the percentile's bracket
    for rnd in range(2):
        want = FACTORIES[name]().apply({k: v.clone() for k, v in diff.items()}, {})
        given = {k: v.clone() for k, v in diff.items()}
        got = FACTORIES[name]().apply(given, {"total_steps": 1}, in_place=True)
        for k in diff:
            assert got[k] is given[k] and got[k].is_cuda, k
            assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), (rnd, k)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_percentile_in_place_matches_over_a_tie_block_and_a_missed_bracket(
    backend: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The paths that read Δ again after the first pass: ties at the bracket's lower bound
    under the cutoff, and a bracket that missed (exact selection, then the writes)."""
    monkeypatch.setattr(_ops, "CPU_CHUNK", 1000)
    monkeypatch.setattr(_ops, "EXACT_BELOW", 2000)
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(30_000) * 0.5).astype(np.float32)
    a[rng.random(30_000) < 0.35] = 0.25
    a[rng.random(30_000) < 0.05] = -0.0
    diff = {"a": a, "s": np.array(0.1, np.float32), "b": a[::-1].copy()}
    for pct in range(0, 101, 10):
        want = PercentileProtocol(percentile=pct, gamma=0.3).apply(as_kind(diff, kind), {})
        given = as_kind(diff, kind)
        got = PercentileProtocol(percentile=pct, gamma=0.3).apply(given, {}, in_place=True)
        assert_same_bits(got, want)
        assert all(got[k] is given[k] for k in given)
    monkeypatch.setattr(_ops, "_bracket", lambda *args: (5.0, 6.0))  # far above every |d|
    want = PercentileProtocol(percentile=40, gamma=0.3).apply(as_kind(diff, kind), {})
    given = as_kind(diff, kind)
    got = PercentileProtocol(percentile=40, gamma=0.3).apply(given, {}, in_place=True)
    assert_same_bits(got, want)
    assert got["a"] is given["a"]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_allocates_no_model_sized_buffer(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(_ops, "CPU_CHUNK", 1 << 16)
    rng = np.random.default_rng(0)

    def fresh() -> dict[str, np.ndarray]:
        return {f"w{i}": (rng.standard_normal(1 << 20) * 1e-3).astype(np.float32) for i in range(4)}

    model_bytes = 4 * (1 << 20) * 4
    protocol = FACTORIES[name]()
    protocol.apply(fresh(), {}, in_place=True)  # the work buffers, kept across rounds
    peaks = {}
    for in_place in (True, False):
        diff = fresh()
        tracemalloc.start()
        try:
            out = protocol.apply(diff, {"total_steps": 2}, in_place=in_place)
            peaks[in_place] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert all((out[k] is diff[k]) == in_place for k in diff)
        del out, diff
    assert peaks[False] >= model_bytes  # the measure sees a new Δ
    assert peaks[True] < model_bytes / 8, peaks


def test_memory_that_cannot_be_written_or_is_shared_gets_a_new_result(backend: str) -> None:
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(6000) * 1e-3).astype(np.float32)
    read_only = base[:3000].copy()
    read_only.flags.writeable = False
    strided = base.reshape(60, 100).T  # not contiguous: its contiguous copy is written
    swapped = base[:500].astype(">f4")
    diff = {"ro": read_only, "strided": strided, "swapped": swapped, "w": base[3000:].copy()}
    kept = {k: v.copy() for k, v in diff.items()}
    want = PercentileProtocol(percentile=50, gamma=1e-3).apply(kept, {})
    got = PercentileProtocol(percentile=50, gamma=1e-3).apply(diff, {}, in_place=True)
    for k in diff:
        np.testing.assert_array_equal(got[k], want[k])
    assert got["w"] is diff["w"]
    assert not np.shares_memory(got["ro"], read_only)
    np.testing.assert_array_equal(read_only, kept["ro"])
    assert not np.shares_memory(got["strided"], base) and got["strided"].flags.c_contiguous
    assert got["swapped"].dtype.isnative

    # two variables over the same memory: each would read what the other wrote; all are new
    shared = base.copy()
    diff = {"a": shared[:4000], "b": shared[2000:]}
    want = SVTProtocol(seed=1, gamma=1e-3, tau=1e-4).apply(
        {k: v.copy() for k, v in diff.items()}, {}
    )
    got = SVTProtocol(seed=1, gamma=1e-3, tau=1e-4).apply(diff, {}, in_place=True)
    for k in diff:
        np.testing.assert_array_equal(got[k], want[k])
        assert not np.shares_memory(got[k], shared)
    np.testing.assert_array_equal(shared, base)


def test_a_non_finite_delta_is_refused_before_anything_is_written(backend: str) -> None:
    for protocol in (PercentileProtocol(), SVTProtocol(seed=0)):
        diff = diff_of(0, np.float32, big=5000)
        diff["fc.bias"][3] = np.nan
        kept = {k: v.copy() for k, v in diff.items()}
        with pytest.raises(NonFiniteDiffError):
            protocol.apply(diff, {}, in_place=True)
        for k in diff:
            assert diff[k].tobytes() == kept[k].tobytes()


# ------------------------------------------------------------------- the model manager asks so


class _Spy(PercentileProtocol):
    """A built-in protocol that records how it was called."""

    def __init__(self) -> None:
        super().__init__(percentile=50, gamma=1e-3)
        self.calls: list[bool] = []

    def apply(
        self, model_diff: dict[str, Any], train_ctx: Any = None, *, in_place: bool = False
    ) -> dict[str, Any]:
        self.calls.append(in_place)
        return super().apply(model_diff, train_ctx, in_place=in_place)


class _Lineage(PercentileProtocol):
    """A BYO protocol written for Clara: ``apply(model_diff, train_ctx)``, no ``in_place``."""

    def __init__(self) -> None:
        super().__init__(percentile=50, gamma=1e-3)
        self.calls = 0

    def apply(self, model_diff: dict[str, Any], train_ctx: Any) -> dict[str, Any]:  # type: ignore[override]
        self.calls += 1
        return super().apply(model_diff, train_ctx)


def _manager(privacy: Any) -> tuple[ClientModelManager, dict[str, np.ndarray], DictModel]:
    rng = np.random.default_rng(2)
    local: dict[str, np.ndarray] = {
        "w": (rng.standard_normal(5000) * 1e-2).astype(np.float32),
        "n": np.array([7], np.int64),
    }
    rw = DictModel({k: np.zeros_like(v) for k, v in local.items()})
    mm = ClientModelManager(["t"], privacy=privacy, model_reader_writer=rw)
    received: dict[str, np.ndarray] = {"w": np.zeros(5000, np.float32), "n": np.array([5])}
    assert mm.assign_current_model(_remote(1, **received))
    rw.weights.update(local)  # trained
    return mm, received, rw


def test_the_model_manager_filters_its_consumed_delta_in_place() -> None:
    spy = _Spy()
    mm, received, rw = _manager(spy)
    expected = PercentileProtocol(percentile=50, gamma=1e-3).apply(
        {"w": rw.weights["w"].copy(), "n": np.array([2], np.int64)}, {"total_steps": 4}
    )
    # as the data assembler does: Δ in the received model, then what may leave
    out = mm.outgoing(mm.model_diff("t", "delta_w", consume=True), "delta_w", 4)
    assert spy.calls == [True]
    assert out["w"] is received["w"]  # Δ and its filtered form: the received model's memory
    assert_same_bits(out, expected)
    assert mm.last_privacy is not None and mm.last_privacy["total_values"] == 5001


def test_the_model_manager_calls_a_lineage_protocol_the_lineage_way() -> None:
    lineage = _Lineage()
    mm, received, rw = _manager(lineage)
    out = mm.outgoing(mm.model_diff("t", "delta_w", consume=True), "delta_w", 4)
    assert lineage.calls == 1
    assert out["w"] is not received["w"]
    np.testing.assert_array_equal(received["w"], rw.weights["w"])  # Δ, as it was computed


def test_the_model_manager_writes_into_no_array_it_does_not_own() -> None:
    spy = _Spy()
    mm, _, _ = _manager(spy)
    delta = mm.model_diff("t", "delta_w", consume=True)
    theirs = {"w": delta["w"].copy(), "n": delta["n"]}  # the caller's arrays now
    kept = theirs["w"].copy()
    out = mm.outgoing(theirs, "delta_w", 4)
    assert spy.calls == [False] and out["w"] is not theirs["w"]
    np.testing.assert_array_equal(theirs["w"], kept)

    # a Δ the caller computed (DirectFederatedClient) is the caller's too
    given = {"w": kept.copy()}
    mm.prepare_model_data(given, "delta_w", total_steps=2)
    assert spy.calls == [False, False]
    np.testing.assert_array_equal(given["w"], kept)

    # the lineage's read_current_model: Δ in new arrays of its own, filtered in place
    mm.assign_current_model(_remote(2, w=np.zeros(5000, np.float32), n=np.array([5], np.int64)))
    mm.read_current_model("t")
    assert spy.calls == [False, False, True]
