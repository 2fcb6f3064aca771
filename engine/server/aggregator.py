"""FedAvg as contributions arrive: new = global + Σ(Δᵢ·nᵢ·wᵢ) / Σ(nᵢ·wᵢ), per variable."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

__all__ = ["FedAvgAccumulator"]


def _acc_dtype(dtype: np.dtype) -> np.dtype:
    # float32 models accumulate in float32 so that a 1 GiB model needs 1 GiB, not 2; anything
    # else (float64, integers such as BatchNorm's step counter) in float64.
    if dtype in (np.float32, np.float16):
        return np.dtype(np.float32)
    if dtype.kind == "c":
        return np.dtype(np.complex128)
    return np.dtype(np.float64)


class FedAvgAccumulator:
    """Folds each contribution into a running weighted sum, so the server never holds all of them.

    Args:
        exclude_vars: a regex; matching variables are never updated by the server.
    """

    def __init__(self, exclude_vars: str | None = None) -> None:
        self._exclude = re.compile(exclude_vars) if exclude_vars else None
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, float] = {}
        self.contributors: list[str] = []

    def excluded(self, name: str) -> bool:
        return bool(self._exclude and self._exclude.search(name))

    @staticmethod
    def _signed(value: np.ndarray) -> np.ndarray:
        # An unsigned Δ wrapped around (3 − 5 = 254 in uint8); read as signed it is −2 again.
        if value.dtype.kind == "u":
            return value.view(np.dtype(f"<i{value.dtype.itemsize}"))
        return value

    def add(self, site: str, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Adds ``weight · Δ``; the arrays of ``delta`` may be reused as accumulator storage."""
        for name, value in delta.items():
            # bool variables (masks, flags) have no average: they keep the server's value.
            if self.excluded(name) or weight <= 0 or value.dtype.kind == "b":
                continue
            value = self._signed(value)
            dtype = _acc_dtype(value.dtype)
            # Scale in place, in the received buffer where it already has the right dtype: the
            # first contribution's buffers become the accumulator, so no new memory is taken.
            # (In-place ops also keep 0-d arrays as arrays; `a * w` would give a scalar.)
            if not (value.dtype == dtype and value.flags.writeable):
                value = value.astype(dtype)
            value *= dtype.type(weight)
            if name in self._sums:
                self._sums[name] += value
            else:
                self._sums[name] = value
                self._weights[name] = 0.0
            self._weights[name] += weight
        self.contributors.append(site)

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` became accumulator storage (so it must not be recycled)."""
        return any(a is array for a in self._sums.values())

    def apply(self, global_model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global model; variables nobody contributed keep their value.

        The accumulator's storage becomes the new model's, so apply() may be called once.
        """
        new: dict[str, np.ndarray] = {}
        for name, current in global_model.items():
            acc = self._sums.pop(name, None)
            total = self._weights.get(name, 0.0)
            if acc is None or total <= 0:
                new[name] = current
                continue
            acc /= acc.dtype.type(total)
            acc += current
            if acc.dtype != current.dtype:
                if current.dtype.kind in "iu":
                    info = np.iinfo(current.dtype)
                    acc = np.clip(np.rint(acc), info.min, info.max)
                acc = acc.astype(current.dtype)
            # reshape only when needed: a view would keep the buffer from being recycled
            new[name] = acc if acc.shape == current.shape else acc.reshape(current.shape)
        self._sums.clear()
        return new
