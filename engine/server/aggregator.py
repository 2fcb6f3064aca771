"""FedAvg as contributions arrive: new = global + Σ(Δᵢ·nᵢ·wᵢ) / Σ(nᵢ·wᵢ), per variable.

The sum is kept as a running weighted mean (integer variables: as the sum itself), and every
contribution is screened before it is folded in: one site must not be able to make the global
model NaN or Inf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engine import he

__all__ = ["FedAvgAccumulator", "HEAccumulator", "Screening", "non_finite_variables", "peak_of"]

SCREEN_BLOCK = 1 << 16
"""Elements screened at once: a block and its scratch stay in cache, and no model-sized
temporary is ever made (a 1 GiB tensor screened whole would need a 256 MiB bool array)."""
PEAK_OFFENDER = 0.5
"""A contribution whose local model reaches this fraction of its dtype's largest finite value
in a variable that overflowed is taken for a cause of the overflow (an honest model sits dozens
of orders of magnitude below it)."""


def _acc_dtype(dtype: np.dtype) -> np.dtype:
    # float32 models accumulate in float32 so that a 1 GiB model needs 1 GiB, not 2; anything
    # else (float64, integers such as BatchNorm's step counter) in float64.
    if dtype in (np.float32, np.float16):
        return np.dtype(np.float32)
    if dtype.kind == "c":
        return np.dtype(np.complex128)
    return np.dtype(np.float64)


def _blocks(a: np.ndarray) -> np.ndarray:
    # A flat view (never a copy: received buffers and the model's arrays are C-contiguous).
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


def _count(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


def describe_non_finite(value: np.ndarray, base: np.ndarray | None = None) -> str:
    """What is wrong with a tensor that failed the screen, in words (only on the refusal path).

    Args:
        value: the contribution's Δ for one variable.
        base: the global model's value it is added to, if the sum is what overflowed.
    """
    n = value.size
    nan, inf = _count(np.isnan(value)), _count(np.isinf(value))
    parts = []
    if nan:
        parts.append(f"NaN ({nan} of {n} values)")
    if inf:
        parts.append(f"Inf ({inf} of {n} values)")
    if parts:
        return " and ".join(parts)
    if base is None:
        return "a non-finite value"
    with np.errstate(over="ignore", invalid="ignore"):
        over = _count(~np.isfinite(base + value))
    return (
        f"Inf in the site's model: finite, but global + Δ overflows {value.dtype} "
        f"({over} of {n} values)"
    )


def _finite_peak(block: np.ndarray) -> float | None:
    """The largest magnitude in a block, or None when it holds NaN or Inf.

    min and max propagate NaN and surface ±Inf: two reductions screen the block without a bool
    temporary (and faster than ``np.isfinite(a).all()``), and give the peak on the way.
    """
    if block.dtype.kind == "c":
        if not np.isfinite(block).all():
            return None
        return float(np.abs(block).max())
    lo, hi = block.min(), block.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return float(max(-lo, hi))


def peak_of(value: np.ndarray) -> float | None:
    """The largest magnitude in a float tensor, or None when it holds NaN or Inf."""
    flat = _blocks(value)
    peak = 0.0
    for start in range(0, flat.size, SCREEN_BLOCK):
        block_peak = _finite_peak(flat[start : start + SCREEN_BLOCK])
        if block_peak is None:
            return None
        peak = max(peak, block_peak)
    return peak


def _sum_peak(base: np.ndarray, delta: np.ndarray) -> float | None:
    """The largest magnitude of ``base + delta`` in their dtype, or None if it is not finite."""
    flat, flat_base = _blocks(delta), _blocks(base)
    scratch = np.empty(min(SCREEN_BLOCK, flat.size), delta.dtype)
    peak = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, SCREEN_BLOCK):
            d = flat[start : start + SCREEN_BLOCK]
            local = np.add(flat_base[start : start + d.size], d, out=scratch[: d.size])
            block_peak = _finite_peak(local)
            if block_peak is None:
                return None
            peak = max(peak, block_peak)
    return peak


@dataclass
class Screening:
    """What screening one contribution found.

    Attributes:
        variable: the first variable refused, or None when the contribution may be folded in.
        problem: what is wrong with it (NaN, Inf, an overflow), in words.
        peaks: for each float variable, the largest magnitude of the site's model
            (global + Δ) as a fraction of its dtype's largest finite value (an upper bound,
            exact from PEAK_OFFENDER up).
    """

    variable: str | None = None
    problem: str = ""
    peaks: dict[str, float] = field(default_factory=dict)


def non_finite_variables(model: Mapping[str, np.ndarray]) -> list[str]:
    """The float variables of ``model`` holding NaN or Inf (screened block by block)."""
    return [n for n, v in model.items() if v.dtype.kind in "fc" and peak_of(v) is None]


class FedAvgAccumulator:
    """Folds each contribution into a running weighted mean, so the server never holds all of them.

    The mean is updated as ``mean·(W/W') + Δ·(w/W')`` with ``W' = W + w``: both factors are
    fractions, so however large a site's weight (``n_iter`` is the site's own claim) no product
    exceeds the largest value folded in, and the mean of finite Δs stays finite (a sum
    ``Σ Δᵢ·wᵢ`` in float32 overflows at 3e38 · 1e12). It costs one more pass over the mean per
    contribution than a plain sum.

    Integer variables (counters) keep the weighted sum ``Σ Δ·w`` instead, divided once in
    :meth:`apply`, and the new value is ``rint(global + mean)``, rounded half to even. For the
    small integers such variables hold and integral or half weights, the sum is exact, so an
    average that is exactly a half stays one: the running mean's factors (1/6, 5/6) are not
    exact and tipped such halves either way (15.5 came out 15.500000000000002). The sum cannot
    overflow float64: |Δ| < 2**64 and ``n_iter`` is bounded by ``max_n_iter``.

    Args:
        exclude_vars: a regex; matching variables are never updated by the server.
    """

    def __init__(self, exclude_vars: str | None = None) -> None:
        self._exclude = re.compile(exclude_vars) if exclude_vars else None
        self._means: dict[str, np.ndarray] = {}  # the weighted sum for the names in _summed
        self._summed: set[str] = set()
        self._weights: dict[str, float] = {}
        self._base_peaks: dict[str, float] = {}
        self.contributors: list[str] = []

    def excluded(self, name: str) -> bool:
        return bool(self._exclude and self._exclude.search(name))

    @staticmethod
    def _signed(value: np.ndarray) -> np.ndarray:
        # An unsigned Δ wrapped around (3 − 5 = 254 in uint8); read as signed it is −2 again.
        if value.dtype.kind == "u":
            return value.view(np.dtype(f"<i{value.dtype.itemsize}"))
        return value

    def screen(self, delta: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Screening:
        """Checks a contribution before it is folded in, so a bad one never touches the mean.

        Each float variable the server averages must be finite, and so must the site's model
        ``base + Δ`` in the variable's dtype (a finite Δ that overflows the model is a model of
        Inf). Integer and bool variables cannot hold NaN; excluded ones are never folded.

        One pass over Δ (min and max, block by block) decides it for any honest model: the sum
        is computed only when ``peak|Δ| + peak|base|`` comes near the dtype's largest value.

        Args:
            delta: the received Δ, variable name to array.
            base: the global model the Δ was computed from: the same for every contribution to
                this accumulator's round (its peaks are measured once).
        """
        result = Screening()
        for name, value in delta.items():
            if value.dtype.kind not in "fc" or self.excluded(name) or name not in base:
                continue
            largest = float(np.finfo(value.dtype).max)
            peak = peak_of(value)
            if peak is None:
                result.variable, result.problem = name, describe_non_finite(value)
                return result
            if name not in self._base_peaks:
                # The global model is finite (checked when the server starts and at each
                # round); measured by the first upload that needs it (a race measures twice).
                self._base_peaks[name] = peak_of(base[name]) or 0.0
            bound = peak + self._base_peaks[name]
            if bound >= PEAK_OFFENDER * largest:
                exact = _sum_peak(base[name], value)
                if exact is None:
                    result.variable = name
                    result.problem = describe_non_finite(value, base[name])
                    return result
                bound = exact
            result.peaks[name] = bound / largest
        return result

    def add(self, site: str, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Folds in ``Δ`` with ``weight``; the arrays of ``delta`` may become the mean's storage.

        Call :meth:`screen` first: a NaN folded in cannot be taken out again.
        """
        for name, value in delta.items():
            # bool variables (masks, flags) have no average: they keep the server's value.
            if self.excluded(name) or weight <= 0 or value.dtype.kind == "b":
                continue
            value = self._signed(value)
            dtype = _acc_dtype(value.dtype)
            mean = self._means.get(name)
            if mean is None and value.dtype.kind in "iu":
                self._summed.add(name)
            if not (value.dtype == dtype and value.flags.writeable):
                value = value.astype(dtype)
            before = self._weights.get(name, 0.0)
            total = before + weight
            if name in self._summed:
                # an integer variable: the exact sum, divided once in apply() (class docstring);
                # in place, so 0-d arrays stay arrays
                value *= dtype.type(weight)
                if mean is None:
                    self._means[name] = value
                else:
                    mean += value
            elif mean is None:
                # The first contribution's buffer becomes the mean as it is (its fraction is
                # 1): no new memory is taken, and nothing is multiplied.
                self._means[name] = value
            else:
                # In place, in the received buffer where it already has the right dtype (and
                # in-place ops keep 0-d arrays as arrays; `a * w` would give a scalar).
                mean *= dtype.type(before / total)
                value *= dtype.type(weight / total)
                mean += value
            self._weights[name] = total
        self.contributors.append(site)

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` became accumulator storage (so it must not be recycled)."""
        return any(a is array for a in self._means.values())

    def storage(self) -> list[np.ndarray]:
        """The arrays holding the mean (to recycle them when the round is discarded)."""
        return list(self._means.values())

    def apply(self, global_model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global model; variables nobody contributed keep their value.

        The accumulator's storage becomes the new model's, so apply() may be called once.
        """
        new: dict[str, np.ndarray] = {}
        for name, current in global_model.items():
            acc = self._means.pop(name, None)
            if acc is None or self._weights.get(name, 0.0) <= 0:
                new[name] = current
                continue
            if name in self._summed:
                acc /= acc.dtype.type(self._weights[name])
            with np.errstate(over="ignore", invalid="ignore"):  # the caller screens the result
                acc += current
            if acc.dtype != current.dtype:
                if current.dtype.kind in "iu":
                    acc = _round_into(acc, current.dtype)
                else:
                    acc = acc.astype(current.dtype)
            # reshape only when needed: a view would keep the buffer from being recycled
            new[name] = acc if acc.shape == current.shape else acc.reshape(current.shape)
        self._means.clear()
        self._summed.clear()
        return new


def _round_into(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """rint(values) (half to even), clipped to the integer ``dtype``'s range, as ``dtype``.

    Clipped in float first, then fixed up: int64's (and uint64's) largest value has no float64,
    and the float it rounds to is one past it, which the cast would wrap to the other end.
    """
    info = np.iinfo(dtype)
    top = float(info.max)
    if top > info.max:
        top = float(np.nextafter(top, 0.0))
    rounded = np.rint(values)
    out = np.clip(rounded, info.min, top).astype(dtype)
    return np.where(rounded > top, dtype.type(info.max), out)


class HEAccumulator:
    """FedAvg over ciphertexts (CKKS), as contributions arrive, without the secret key.

    Encrypted variables (``engine.serde.CiphertextArray``) arrive as Δ·n_iter, weighted by
    the site before encryption: the server adds them (times the site's aggregation weight when
    it is not 1), and multiplies the sum once by the plaintext scalar 1/Σw when the round
    closes; the new global value is ``global + mean``, a ciphertext (the global model of the
    first round is plaintext: ciphertext + plaintext needs only the public context). Variables
    a site left in the clear are averaged here in plaintext as FedAvg does (and added to the
    ciphertext where other sites encrypted them).

    The interface is FedAvgAccumulator's (``screen``, ``add``, ``apply``, ``holds``,
    ``storage``); ``add`` takes one more argument, the factor for the ciphertexts.

    Args:
        context: the federation's public TenSEAL context (no secret key).
        exclude_vars: as for FedAvgAccumulator.
    """

    def __init__(self, context: object, exclude_vars: str | None = None) -> None:
        self._ctx = context
        self._exclude = re.compile(exclude_vars) if exclude_vars else None
        self._enc: dict[str, object] = {}  # name -> CKKS vector: Σ ct·factor
        self._plain: dict[str, np.ndarray] = {}  # name -> Σ Δ·w (float64)
        self._weights: dict[str, float] = {}
        self._parsed: dict[int, object] = {}
        self.contributors: list[str] = []
        self.encrypt_seconds = 0.0

    def excluded(self, name: str) -> bool:
        return bool(self._exclude and self._exclude.search(name))

    def screen(self, delta: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Screening:
        """Plaintext float variables must be finite; a ciphertext must be readable with the
        public context and hold as many values as the variable it stands for."""
        result = Screening()
        for name, value in delta.items():
            if self.excluded(name) or name not in base:
                continue
            if he.is_ciphertext(value):
                current = base[name]
                size = (
                    int(np.prod(he.plain_spec(current)[1], dtype=np.int64))
                    if he.is_ciphertext(current)
                    else int(current.size)
                )
                try:
                    vec, _, shape = he.vector(self._ctx, value)
                except he.HEError as exc:
                    result.variable, result.problem = name, str(exc)
                    return result
                if int(np.prod(shape, dtype=np.int64)) != size:
                    result.variable = name
                    result.problem = f"a ciphertext of shape {shape} ({size} values expected)"
                    return result
                self._parsed[id(value)] = vec
            elif value.dtype.kind in "fc" and peak_of(value) is None:
                result.variable, result.problem = name, describe_non_finite(value)
                return result
        return result

    def add(
        self, site: str, delta: Mapping[str, np.ndarray], weight: float, ct_factor: float = 1.0
    ) -> None:
        """Folds in ``Δ``: plaintext variables times ``weight``, ciphertexts (already Δ·n_iter)
        times ``ct_factor``; ``weight`` counts in Σw either way."""
        for name, value in delta.items():
            if self.excluded(name) or weight <= 0 or value.dtype.kind == "b":
                continue
            if he.is_ciphertext(value):
                vec = self._parsed.pop(id(value), None) or he.vector(self._ctx, value)[0]
                if ct_factor != 1.0:
                    vec = vec * ct_factor  # type: ignore[operator]
                acc = self._enc.get(name)
                self._enc[name] = vec if acc is None else acc + vec  # type: ignore[operator]
            else:
                plain = FedAvgAccumulator._signed(value).astype(np.float64) * weight
                acc_p = self._plain.get(name)
                self._plain[name] = plain if acc_p is None else acc_p + plain
            self._weights[name] = self._weights.get(name, 0.0) + weight
        self.contributors.append(site)

    def holds(self, array: np.ndarray) -> bool:
        return False  # received buffers are never the sum's storage

    def storage(self) -> list[np.ndarray]:
        return []

    def apply(self, global_model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global model: encrypted where any site encrypted, else plaintext FedAvg."""
        new: dict[str, np.ndarray] = {}
        for name, current in global_model.items():
            total = self._weights.get(name, 0.0)
            enc, plain = self._enc.pop(name, None), self._plain.pop(name, None)
            if total <= 0 or (enc is None and plain is None):
                new[name] = current
                continue
            if enc is None:
                assert plain is not None
                if he.is_ciphertext(current):
                    vec, dtype, shape = he.vector(self._ctx, current)
                    vec = vec + (plain / total).reshape(-1)  # type: ignore[operator]
                    new[name] = he.pack_vector(vec, dtype, shape)
                else:
                    value = current + (plain / total).reshape(current.shape)
                    new[name] = (
                        _round_into(value, current.dtype)
                        if current.dtype.kind in "iu"
                        else value.astype(current.dtype)
                    )
                continue
            mean = enc * (1.0 / total)  # type: ignore[operator]
            if plain is not None:
                mean = mean + (plain / total).reshape(-1)
            if he.is_ciphertext(current):
                vec, dtype, shape = he.vector(self._ctx, current)
                mean = vec + mean  # type: ignore[operator]
            else:
                dtype, shape = current.dtype.name, tuple(current.shape)
                mean = mean + current.reshape(-1).astype(np.float64)
            new[name] = he.pack_vector(mean, dtype, shape)
        self._enc.clear()
        self._plain.clear()
        return new
