"""A pool of model-sized arrays, so uploads land in memory that is already committed."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from engine.serde import TensorSpec

__all__ = ["BufferPool"]


class BufferPool:
    """Keeps arrays freed at the end of a round for the next round's uploads.

    Rounds repeat the same shapes. Writing into freshly allocated memory costs a page fault per
    page (on some virtual machines several times the copy itself), so the server hands each
    upload buffers that earlier rounds already touched: the previous global model once no
    download still reads it, and the buffers of contributions already folded into the sum.

    Args:
        max_bytes: the pool never holds more than this; extra arrays are simply freed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        self.reused = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def take(self, spec: TensorSpec) -> np.ndarray:
        """An array for ``spec``: a pooled one when there is one, else a new one."""
        key = (np.dtype(spec.dtype).str, spec.shape)
        with self._lock:
            stack = self._free.get(key)
            if stack:
                array = stack.pop()
                self._bytes -= array.nbytes
                self.reused += 1
                return array
        return np.empty(spec.shape, dtype=spec.dtype)

    def give(self, arrays: Iterable[np.ndarray]) -> None:
        """Returns arrays nobody uses any more (views and read-only arrays are not kept)."""
        with self._lock:
            if self._closed:
                return
            for array in arrays:
                if array.base is not None or not array.flags.writeable or array.nbytes < 4096:
                    continue
                if self._bytes + array.nbytes > self.max_bytes:
                    continue
                self._free.setdefault((array.dtype.str, array.shape), []).append(array)
                self._bytes += array.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0

    def close(self) -> None:
        """Frees what the pool holds and keeps nothing given from now on (no round is left)."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._bytes = 0
