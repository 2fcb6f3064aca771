"""Chunked kernels of the privacy protocols: exact order statistics, SVT selection, Laplace noise.

Imported on first ``apply`` (it imports torch), never when a config loads.

Layout: the model difference stays where it is (the caller's numpy arrays or torch tensors, CPU
or CUDA); every pass walks it variable by variable in chunks, and a protocol instance keeps its
work buffers (a ``Workspace``) across rounds, because the shapes repeat and, on a small CPU
machine, each fresh large buffer costs its page faults again. On CPU a chunk is 4 MiB of float32,
so the several cheap operations a pass does on it run from cache while the diff streams from
memory once; on a GPU a chunk is a whole variable.

On CPU the bool work (compare, count, nonzero) goes through numpy views of the same memory:
numpy's kernels for it are several times faster than torch's CPU ones (torch's ``nonzero`` costs
tens of ns per element found). Float arithmetic and every random draw stay in torch, the draws
from the protocol's ``torch.Generator``. ``NUMPY_ON_CPU = False`` runs the torch code paths that a
GPU takes, on CPU (the tests do).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.privacy._checks import NonFiniteDiffError

__all__ = ["SvtStats", "Workspace", "percentile", "svt"]

log = logging.getLogger("engine.privacy")

CPU_CHUNK = 1 << 20
NUMPY_ON_CPU = True
# Above this many values the percentile cutoff comes from a sampled bracket (one counting pass);
# below it one flat copy and an exact selection cost less than the sampling.
EXACT_BELOW = 1 << 18
SAMPLE = 1 << 16

_HARDSHRINK = torch.ops.aten.hardshrink.out
_NP_DTYPE: dict[torch.dtype, Any] = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int64: np.int64,
}
_COMPARE_NP = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "eq": np.equal}
_COMPARE_TORCH = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "eq": torch.eq}


# ---------------------------------------------------------------------------------------- memory


def _host_tensor(shape: tuple[int, ...], dtype: torch.dtype, zeros: bool) -> torch.Tensor:
    """A CPU tensor on numpy-allocated memory: numpy asks the kernel for huge pages on large
    buffers, which makes first touch several times cheaper than torch's allocator here."""
    np_dtype = np.uint16 if dtype is torch.bfloat16 else _NP_DTYPE[dtype]
    arr = (np.zeros if zeros else np.empty)(shape, np_dtype)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype is torch.bfloat16 else t


class Workspace:
    """Work buffers a protocol instance keeps across rounds, by purpose, dtype and device."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D buffer of at least ``n`` elements (contents undefined), its first ``n``."""
        k = (key, dtype, str(device))
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < n:
            self._bufs.pop(k, None)  # let the old one go before the new one is touched
            if device.type == "cpu":
                buf = _host_tensor((n,), dtype, zeros=False)
            else:
                buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[k] = buf
        return buf[:n]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


# ------------------------------------------------------------------------------------ the diff


@dataclass
class _Var:
    name: str
    src: torch.Tensor  # 1-D contiguous view of the values (written only when in place)
    out: torch.Tensor  # 1-D view of the result's memory (``src`` itself when in place)
    scalar: bool  # a 0-d variable: it passes through unchanged, but still holds one slot
    work: torch.dtype  # float64 for float64 input, float32 for the narrower floats
    like: Any  # the contiguous array or tensor ``src`` views: a new result is made like it
    in_place: bool = False  # the result is written into ``src``'s memory
    offset: int = 0  # its first slot in the concatenation of all variables


def _overlaps(variables: list[_Var]) -> bool:
    """Whether two variables' memory overlaps (then no result may be written into an input:
    a write to one would change what another still has to read)."""
    spans = sorted(
        (v.src.data_ptr(), v.src.data_ptr() + v.src.numel() * v.src.element_size())
        for v in variables
        if v.src.numel()
    )
    return any(start < prev_stop for (_, prev_stop), (start, _) in itertools.pairwise(spans))


class _Diff:
    """The caller's model difference as flat views, plus the results to fill in.

    ``in_place``: results are written into the inputs' own memory where it can be (a writable,
    native-order float array or tensor; a non-contiguous or byte-swapped one is copied once and
    that copy is the result), and integer and bool variables pass through as they are. When two
    variables share memory, no result is written into an input (all are new). The algorithms
    then write a slot only after their last read of it (``in_place`` on the diff says so).
    """

    def __init__(
        self, model_diff: Mapping[str, Any], *, sort: bool, zeros: bool, in_place: bool = False
    ) -> None:
        self.order = list(model_diff)
        self.results: dict[str, Any] = {}
        self.vars: list[_Var] = []
        devices: set[torch.device] = set()
        for name in sorted(self.order) if sort else self.order:
            var = self._wrap(name, model_diff[name], in_place)
            if var is None:
                continue
            devices.add(var.src.device)
            self.vars.append(var)
        if len(devices) > 1:
            raise ValueError(
                f"the model difference spans several devices ({sorted(map(str, devices))}); "
                "a privacy protocol works on one"
            )
        if in_place and _overlaps(self.vars):
            log.debug("privacy: variables of the diff share memory; results go to new arrays")
            for var in self.vars:
                var.in_place = False
        for var in self.vars:
            if not var.in_place:
                self._new_result(var, zeros)
                if var.scalar:
                    var.out.copy_(var.src)
        #: some result is written into its input: every pass but the last only reads
        self.in_place = any(v.in_place for v in self.vars)
        self.device = devices.pop() if devices else torch.device("cpu")
        offset = 0
        for var in self.vars:
            var.offset = offset
            offset += var.src.numel()
        self.size = offset
        self.work = (
            torch.float64 if any(v.work is torch.float64 for v in self.vars) else torch.float32
        )
        self.mixed = any(v.work is not self.work for v in self.vars)
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else max(1, self._largest())

    def _largest(self) -> int:
        return max((v.src.numel() for v in self.vars), default=1)

    def _wrap(self, name: str, value: Any, in_place: bool) -> _Var | None:
        keep: Any
        like: Any
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if not t.is_floating_point():
                # Integer and bool variables (e.g. BatchNorm's step counter) are not model
                # weights the filters are about; they pass through (as copies unless in place).
                self.results[name] = value if in_place else t.clone()
                return None
            contiguous = t.is_contiguous()
            t = t.contiguous()
            src, scalar, writable = t.reshape(-1), t.dim() == 0, True
            keep, like = (value if contiguous else t), t
        else:
            arr = np.asarray(value)
            if arr.dtype.kind != "f":
                self.results[name] = value if in_place else np.array(arr, copy=True)
                return None
            if arr.dtype.type not in (np.float16, np.float32, np.float64):
                raise TypeError(
                    f"variable {name!r}: dtype {arr.dtype} is not supported "
                    "(float16, float32, float64)"
                )
            copied = False
            if not arr.dtype.isnative:
                arr, copied = arr.astype(arr.dtype.newbyteorder("=")), True
            if not arr.flags.c_contiguous:
                arr, copied = np.ascontiguousarray(arr), True
            with warnings.catch_warnings():
                # A read-only array (np.frombuffer over a received message) is fine: it is only
                # read, never written (in place too: its result is a new array).
                warnings.simplefilter("ignore", UserWarning)
                src = torch.from_numpy(arr).reshape(-1)
            scalar, writable, like = arr.ndim == 0, bool(arr.flags.writeable), arr
            keep = value if not copied and isinstance(value, np.ndarray) else arr
        work = torch.float64 if src.dtype is torch.float64 else torch.float32
        var = _Var(name, src, src, scalar, work, like, in_place=in_place and writable)
        if var.in_place:
            self.results[name] = keep
        return var

    def _new_result(self, var: _Var, zeros: bool) -> None:
        """A new array (or tensor, on the input's device) for ``var``'s result."""
        like = var.like
        res: Any
        if isinstance(like, torch.Tensor):
            if like.device.type == "cpu":
                res = _host_tensor(tuple(like.shape), like.dtype, zeros)
            else:
                res = (torch.zeros if zeros else torch.empty)(
                    like.shape, dtype=like.dtype, device=like.device
                )
            var.out = res.reshape(-1)
        else:
            res = (np.zeros if zeros else np.empty)(like.shape, like.dtype)
            var.out = torch.from_numpy(res).reshape(-1)
        self.results[var.name] = res

    def clear(self, var: _Var, lo: int, hi: int) -> None:
        """Zeroes slots [lo, hi) of a result written in place (a new one starts as zeros);
        a scalar passes through."""
        if var.in_place and not var.scalar:
            var.out[lo:hi].zero_()

    def chunks(self) -> Iterator[tuple[_Var, int, int]]:
        """(variable, start, stop) over every slot, in variable order."""
        for var in self.vars:
            n = var.src.numel()
            for lo in range(0, n, self.chunk):
                yield var, lo, min(n, lo + self.chunk)

    def result(self) -> dict[str, Any]:
        return {name: self.results[name] for name in self.order}


# ------------------------------------------------------------------------------ small kernels


def _np(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor while the numpy kernels are on, else None."""
    return t.numpy() if NUMPY_ON_CPU and t.device.type == "cpu" else None


def _compare(op: str, a: torch.Tensor, value: float, out: torch.Tensor) -> None:
    an = _np(a)
    if an is not None:
        _COMPARE_NP[op](an, value, out=out.numpy())
    else:
        _COMPARE_TORCH[op](a, value, out=out)


def _and_(m: torch.Tensor, other: torch.Tensor) -> None:
    mn = _np(m)
    if mn is not None:
        np.logical_and(mn, other.numpy(), out=mn)
    else:
        m.logical_and_(other)


def _or_(m: torch.Tensor, other: torch.Tensor) -> None:
    mn = _np(m)
    if mn is not None:
        np.logical_or(mn, other.numpy(), out=mn)
    else:
        m.logical_or_(other)


def _count(m: torch.Tensor) -> int:
    mn = _np(m)
    return int(np.count_nonzero(mn)) if mn is not None else int(torch.count_nonzero(m))


def _flatnonzero(m: torch.Tensor) -> torch.Tensor:
    mn = _np(m)
    if mn is not None:
        return torch.from_numpy(np.flatnonzero(mn))
    return torch.nonzero(m).view(-1)


def _ceil_to(x: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` (float32 or float64) that is >= x."""
    if dtype is torch.float64:
        return x
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def _floor_to(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` (float32 or float64) that is <= x."""
    if dtype is torch.float64:
        return x
    f = np.float32(x)
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _just_below(x: float, dtype: torch.dtype) -> float:
    """The largest value λ of ``dtype`` with ``v > λ`` exactly when ``v >= x`` (hardshrink keeps
    ``|v| > λ``; the reference keeps ``|v| >= cutoff``, ties included)."""
    c = _ceil_to(x, dtype)
    np_t = np.float64 if dtype is torch.float64 else np.float32
    return float(np.nextafter(np_t(c), np_t(-np.inf)))


def _abs_chunk(var: _Var, lo: int, hi: int, steps: float, buf: torch.Tensor) -> torch.Tensor:
    """|Δ/T| of a chunk, in ``buf`` (the variable's work dtype), computed as the reference does:
    divide first, in the working precision."""
    src = var.src[lo:hi]
    if src.dtype is buf.dtype:
        if steps == 1.0:
            torch.abs(src, out=buf)
        else:
            torch.div(src, steps, out=buf)
            buf.abs_()
    else:
        buf.copy_(src)
        if steps != 1.0:
            buf.div_(steps)
        buf.abs_()
    return buf


def _check_finite(var: _Var, values: torch.Tensor) -> None:
    # One cheap reduction per chunk; only a non-finite sum pays for the exact test (a sum can
    # overflow on large finite values).
    if not math.isfinite(float(values.sum(dtype=var.work))) and not bool(
        torch.isfinite(values).all()
    ):
        raise NonFiniteDiffError(var.name)


def _laplace(
    n: int, scale: float, dtype: torch.dtype, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """n draws of Laplace(0, scale) by the inverse CDF of one uniform each."""
    u = torch.rand(n, dtype=dtype, generator=g, device=device)
    u.sub_(0.5)
    sign = torch.sign(u)
    # u = 0 gives log1p(-1) = -inf, an infinite draw: the release clips it to -γ.
    return u.abs_().mul_(-2.0).log1p_().mul_(sign).mul_(-scale)


# ----------------------------------------------------------------------------- percentile


def _linear_ranks(n: int, percentile: float) -> tuple[int, int, float]:
    """The two order statistics and the weight numpy's default ('linear') percentile uses.

    Computed as numpy computes them, operation for operation: q = percentile / 100 and the
    virtual index (n - 1) · q. The algebraically equal n·q + (1 - q) - 1 rounds differently
    (at n = 6, q = 0.4 it gives 2.0000000000000004, not 2.0): the cutoff then lies a hair
    above a value that numpy's cutoff equals, and that value, which the reference keeps
    (|d| >= cutoff), is zeroed.
    """
    q = percentile / 100.0
    virtual = (n - 1) * q
    below = math.floor(virtual)
    k0 = min(max(below, 0), n - 1)
    k1 = min(max(below + 1, 0), n - 1)
    # numpy's weight is the fractional part of the virtual index (0 at the top: both ranks
    # are then the largest value, and any weight gives it)
    return k0, k1, virtual - below


def _lerp(a: float, b: float, t: float, dtype: torch.dtype) -> float:
    """numpy's ``_lerp``, in the working precision, so the cutoff is the one np.percentile gives."""
    np_t = np.float64 if dtype is torch.float64 else np.float32
    x, y = np_t(a), np_t(b)
    d = y - x
    return float(y - d * (1 - t) if t >= 0.5 else x + d * t)


def _select(values: torch.Tensor, ks: list[int]) -> list[float]:
    """The ks-th smallest of ``values`` (which this module owns and may reorder)."""
    arr = _np(values)
    if arr is not None:
        arr.partition(ks)
        return [float(arr[k]) for k in ks]
    ordered = torch.sort(values).values
    return [float(ordered[k]) for k in ks]


def _exact_order_stats(diff: _Diff, ks: list[int], steps: float, ws: Workspace) -> list[float]:
    """All |Δ/T| in one flat buffer, then a selection (the small-diff path, and the fallback)."""
    flat = ws.get("flat", diff.size, diff.work, diff.device)
    for var, lo, hi in diff.chunks():
        dst = flat[var.offset + lo : var.offset + hi]
        if var.work is diff.work:
            _abs_chunk(var, lo, hi, steps, dst)
        else:
            dst.copy_(_abs_chunk(var, lo, hi, steps, ws.get("a", hi - lo, var.work, diff.device)))
        _check_finite(var, dst)
    return _select(flat, ks)


def _bracket(diff: _Diff, ks: list[int], steps: float) -> tuple[float, float]:
    """Bounds that hold the ks-th smallest |Δ/T| but for a ~1e-9 chance, from a sample of them."""
    n = diff.size
    # A fixed seed: the sample only steers how much work the exact selection does, never its
    # result, so it draws nothing from the protocol's own generator.
    g = torch.Generator().manual_seed(0x5EED)
    pos = torch.randint(n, (SAMPLE,), generator=g).sort().values
    bounds = np.searchsorted(pos.numpy(), [v.offset for v in diff.vars] + [n])
    parts = []
    for i, var in enumerate(diff.vars):
        local = pos[bounds[i] : bounds[i + 1]] - var.offset
        if local.numel():
            x = var.src.index_select(0, local.to(var.src.device)).to(var.work)
            if steps != 1.0:
                x = x / steps
            parts.append(x.abs_().to(diff.work).cpu())
    sample = torch.cat(parts).sort().values.numpy()
    s = len(sample)
    p = ks[0] / max(n - 1, 1)
    margin = int(6.0 * math.sqrt(s * p * (1.0 - p))) + 16
    j0 = math.floor(ks[0] * s / n) - margin
    j1 = math.ceil((ks[-1] + 1) * s / n) + margin
    lo = float(sample[j0]) if j0 >= 0 else -math.inf
    hi = float(sample[j1]) if j1 < s else math.inf
    if diff.mixed:
        # float32 variables compare against float32 bounds: round outwards so that no value is
        # counted on the wrong side.
        lo, hi = _floor_to(lo, torch.float32), _ceil_to(hi, torch.float32)
    return lo, hi


def _shrink_clip(
    var: _Var,
    lo: int,
    hi: int,
    keep_from: float,
    gamma: float,
    steps: float,
    ws: Workspace,
    d: torch.Tensor | None = None,
) -> None:
    """out = clip(d where |d| >= keep_from else 0, ±gamma) · T for one chunk, d = Δ/T (passed
    in when the caller has it already, in the chunk's output or work buffer)."""
    src, out = var.src[lo:hi], var.out[lo:hi]
    o = out if out.dtype is var.work else ws.get("o", hi - lo, var.work, out.device)
    if d is None:
        if src.dtype is var.work and steps == 1.0:
            d = src
        elif src.dtype is var.work:
            d = torch.div(src, steps, out=o)
        else:
            d = o.copy_(src)
            if steps != 1.0:
                d.div_(steps)
    if keep_from > 0:
        # zero where |d| < keep_from: one fused op (hardshrink keeps |d| > λ) instead of
        # compare + where
        _HARDSHRINK(d, _just_below(keep_from, var.work), out=o)
    elif d is not o:
        o.copy_(d)
    g = _floor_to(gamma, var.work)  # never past ±gamma, whatever the rounding of gamma
    o.clamp_(-g, g)
    if steps != 1.0:
        o.mul_(steps)
    if o is not out:
        out.copy_(o)


def _write_all(diff: _Diff, cutoff: float, gamma: float, steps: float, ws: Workspace) -> None:
    for var, lo, hi in diff.chunks():
        if not var.scalar:  # scalars were copied through when the diff was wrapped
            _shrink_clip(var, lo, hi, cutoff, gamma, steps, ws)


def _fused_pass(
    diff: _Diff,
    ks: list[int],
    lo: float,
    hi: float,
    gamma: float,
    steps: float,
    ws: Workspace,
    *,
    write: bool = True,
) -> tuple[list[float], list[tuple[_Var, int, torch.Tensor, torch.Tensor]], bool] | None:
    """One pass that counts |d| under the bracket [lo, hi], keeps the values inside it (with
    their places), checks for NaN/Inf, and writes every output chunk with ``lo`` as a provisional
    cutoff: the exact cutoff lies in [lo, hi], so only the kept values can still change.

    ``write=False`` (results written in place, into the values still to be read if the bracket
    missed): the same pass without the writes; the caller then writes with ``lo``
    (``_write_all``), which gives the very same outputs.

    Returns:
        (the ks-th smallest |d|, the in-bracket (var, chunk start, index, |d|) to fix up,
        whether non-zero values tie at lo), or None when the bracket missed or held too many
        values (huge ties): then the caller selects exactly and rewrites.
    """
    # the bracket holds ~2.4 % of the values at worst (a 6-sigma margin on 2**16 samples)
    cap = int(diff.size * 8 / math.sqrt(SAMPLE)) + (1 << 20)
    below = at_lo = inside = kept = 0  # |d| < lo, |d| <= lo, lo < |d| <= hi
    found: list[tuple[_Var, int, torch.Tensor, torch.Tensor]] = []
    overflow = False
    for var, c0, c1 in diff.chunks():
        n = c1 - c0
        src, out = var.src[c0:c1], var.out[c0:c1]
        # d = Δ/T where the output goes (or the work buffer), |d| in a work buffer
        if src.dtype is var.work and steps == 1.0:
            d = src
        else:
            # a scalar's output is final; without ``write`` the output may be the input
            own = write and out.dtype is var.work and not var.scalar
            o = out if own else ws.get("o", n, var.work, diff.device)
            if src.dtype is var.work:
                d = torch.div(src, steps, out=o)
            else:
                d = o.copy_(src)
                if steps != 1.0:
                    d.div_(steps)
        a = torch.abs(d, out=ws.get("a", n, var.work, diff.device))
        if not math.isfinite(float(torch.amax(a))):  # amax propagates NaN
            raise NonFiniteDiffError(var.name)
        if write and not var.scalar:
            _shrink_clip(var, c0, c1, lo, gamma, steps, ws, d=d)
        m = ws.get("m1", n, torch.bool, diff.device)
        if lo > -math.inf:
            # values equal to lo are counted, not kept: a block of ties there (exact zeros
            # from frozen layers) must not flood the selection
            _compare("lt", a, lo, m)
            below += _count(m)
            _compare("le", a, lo, m)
            at_lo += _count(m)
            if lo == hi:
                continue
            _compare("gt", a, lo, m)
            if hi < math.inf:
                m2 = ws.get("m2", n, torch.bool, diff.device)
                _compare("le", a, hi, m2)
                _and_(m, m2)
        elif hi < math.inf:
            _compare("le", a, hi, m)
        else:
            m.fill_(True)
        idx = _flatnonzero(m).to(diff.device)
        inside += idx.numel()
        if overflow or not idx.numel():
            continue
        if kept + idx.numel() > cap:
            overflow, found = True, []
            continue
        found.append((var, c0, idx, a.index_select(0, idx).to(diff.work)))
        kept += idx.numel()
    if overflow or not (below <= ks[0] and ks[-1] < at_lo + inside):
        log.debug("percentile bracket missed (%d below, %d inside); exact pass", below, inside)
        return None
    upper = [k for k in ks if k >= at_lo]
    picked = _select(torch.cat([f[3] for f in found]), [k - at_lo for k in upper]) if upper else []
    # Values equal to lo are not in ``found``; if they are not zero and the cutoff ends up
    # above lo, they must go too: flagged for the caller (rare: ties at a non-zero value).
    return [lo] * (len(ks) - len(upper)) + picked, found, lo > 0 and at_lo > below


def percentile(
    model_diff: Mapping[str, Any],
    *,
    percentile: float,
    gamma: float,
    steps: float,
    workspace: Workspace,
    in_place: bool = False,
) -> dict[str, Any]:
    """PercentileProtocol's work (the algorithm is in its docstring).

    Small diffs: |d| into one flat buffer, exact selection, then the output pass. Large ones:
    a sampled bracket, then one fused pass over the diff (``_fused_pass``), then a sparse
    fix-up of the ~1 % of outputs inside the bracket. ``in_place`` (results into the inputs,
    see ``_Diff``): the fused pass only reads, and the outputs are written in a second pass
    with the same operations, so they are bit for bit those of a new Δ.
    """
    diff = _Diff(model_diff, sort=False, zeros=False, in_place=in_place)
    if diff.size == 0:
        return diff.result()
    k0, k1, t = _linear_ranks(diff.size, percentile)
    if diff.size <= EXACT_BELOW:
        v0, v1 = _exact_order_stats(diff, [k0, k1], steps, workspace)
        _write_all(diff, _lerp(v0, v1, t, diff.work), gamma, steps, workspace)
        return diff.result()
    lo, hi = _bracket(diff, [k0, k1], steps)
    # in place, the pass only reads: a missed bracket or ties at lo read the input again
    fused = _fused_pass(diff, [k0, k1], lo, hi, gamma, steps, workspace, write=not diff.in_place)
    if fused is None:
        v0, v1 = _exact_order_stats(diff, [k0, k1], steps, workspace)
        _write_all(diff, _lerp(v0, v1, t, diff.work), gamma, steps, workspace)
        return diff.result()
    (v0, v1), found, ties_at_lo = fused
    cutoff = _lerp(v0, v1, t, diff.work)
    if ties_at_lo and cutoff > lo:
        log.debug("percentile: ties at the bracket's lower bound fell under the cutoff")
        _write_all(diff, cutoff, gamma, steps, workspace)
        return diff.result()
    if diff.in_place:
        _write_all(diff, lo, gamma, steps, workspace)  # the writes the pass left out
    for var, c0, idx, values in found:
        if var.scalar:
            continue
        drop = idx[values < cutoff]  # exact compare, as the reference's (d > -c) & (d < c)
        if drop.numel():
            var.out.index_fill_(0, drop + c0, 0)
    return diff.result()


# ------------------------------------------------------------------------------------- SVT


@dataclass
class SvtStats:
    """What one SVT round did.

    Attributes:
        size: N, the slots (values) of the diff.
        target: n = min(ceil(N·fraction), N), the most values that may be shared.
        passes: selection passes run.
        accepted: candidates that passed the noisy threshold.
        tau_hat: the noisy threshold.
        query_scale: λν, the scale of the per-query Laplace noise.
    """

    size: int
    target: int
    passes: int
    accepted: int
    tau_hat: float
    query_scale: float


def _survival(t: float, scale: float) -> float:
    """P(ν >= t) for ν ~ Laplace(0, scale)."""
    return 0.5 * math.exp(-t / scale) if t >= 0 else 1.0 - 0.5 * math.exp(t / scale)


def _random_bytes(n: int, g: torch.Generator, ws: Workspace, device: torch.device) -> torch.Tensor:
    words = ws.get("rand64", (n + 7) // 8, torch.int64, device)
    words.random_(-(2**63), None, generator=g)  # the full 64 bits: eight uniform bytes
    return words.view(torch.uint8)[:n]


def _binomial(count: int, p: float, g: torch.Generator, device: torch.device) -> int:
    c = torch.tensor([float(count)], dtype=torch.float64, device=device)
    q = torch.tensor([min(max(p, 0.0), 1.0)], dtype=torch.float64, device=device)
    return int(torch.binomial(c, q, generator=g).item())


def _select_pass(
    diff: _Diff,
    chunks: list[tuple[_Var, int, int]],
    counts: list[int],
    accepted: torch.Tensor,
    first: bool,
    *,
    sure: int,
    maybe: int,
    steps: float,
    gamma: float,
    tau_hat: float,
    scale: float,
    g: torch.Generator,
    ws: Workspace,
) -> None:
    """One pass of the selection loop over the candidates not yet accepted.

    Candidate i is accepted when a_i + ν_i >= τ̂, ν_i ~ Lap(λν), that is when u_i < S(τ̂ - a_i)
    for a uniform u_i and S the Laplace survival function. As a_i lies in [0, γ], S(τ̂ - a_i)
    lies in [S(τ̂), S(τ̂ - γ)], so the first random byte of u_i settles nearly every candidate:
    bytes < ``sure`` accept, bytes >= ``maybe`` reject, and only the rest (about 1/128 of them)
    draw the remaining bits and compute S exactly. Same distribution as drawing ν_i, for one
    byte of randomness and a compare instead of a float draw and a logarithm per candidate.
    """
    device = diff.device
    for ci, (var, lo, hi) in enumerate(chunks):
        n = hi - lo
        src = var.src[lo:hi]
        if first:
            _check_finite(var, src)
        elif counts[ci] == n:
            continue
        acc = accepted[var.offset + lo : var.offset + hi]
        rb = _random_bytes(n, g, ws, device)
        if sure >= 256:
            acc.fill_(True)
        elif sure > 0 and first:
            _compare("lt", rb, sure, acc)
        elif sure > 0:
            m = ws.get("m1", n, torch.bool, device)
            _compare("lt", rb, sure, m)
            _or_(acc, m)
        elif first:
            acc.fill_(False)
        width = maybe - sure
        if 0 < width < 256:
            shifted = ws.get("u8", n, torch.uint8, device)
            shifted_np = _np(shifted)
            if shifted_np is not None:
                np.subtract(rb.numpy(), sure, out=shifted_np)  # uint8: wraps below `sure`
            else:
                torch.sub(rb, sure, out=shifted)
            m = ws.get("m1", n, torch.bool, device)
            _compare("lt", shifted, width, m)
            idx = _flatnonzero(m).to(device)
        elif width >= 256:
            idx = torch.arange(n, device=device)
        else:
            idx = torch.empty(0, dtype=torch.int64, device=device)
        if idx.numel():
            a = src.index_select(0, idx).to(torch.float64)
            if steps != 1.0:
                a.div_(steps)
            t = a.abs_().clamp_(max=gamma).neg_().add_(tau_hat)  # τ̂ - a_i, a_i = |clip(x, ±γ)|
            half = torch.exp(t.abs() / -scale).mul_(0.5)
            surv = torch.where(t >= 0, half, 1.0 - half)
            u = rb.index_select(0, idx).to(torch.float64)
            u.add_(torch.rand(idx.numel(), dtype=torch.float64, generator=g, device=device))
            hit = u.div_(256.0) < surv
            acc.index_copy_(0, idx, acc.index_select(0, idx) | hit)
        counts[ci] = _count(acc)


def svt(
    model_diff: Mapping[str, Any],
    *,
    fraction: float,
    epsilon: float,
    noise_var: float,
    gamma: float,
    tau: float,
    steps: float,
    max_passes: int,
    generator: Callable[[torch.device], torch.Generator],
    workspace: Workspace,
    in_place: bool = False,
) -> tuple[dict[str, Any], SvtStats]:
    """SVTProtocol's work (the algorithm is in its docstring).

    ``in_place`` (results into the inputs, see ``_Diff``): the selection passes only read; the
    release then goes chunk by chunk, each chunk's released values read before the chunk is
    zeroed and they are written, so the outputs (and the draws) are those of a new Δ.
    """
    diff = _Diff(model_diff, sort=True, zeros=True, in_place=in_place)
    size = diff.size
    if size == 0:
        return diff.result(), SvtStats(0, 0, 0, 0, tau, 0.0)
    n = min(math.ceil(size * fraction), size)
    device = diff.device
    g = generator(device)
    tau_hat = tau + float(_laplace(1, 2.0 * gamma / epsilon, torch.float64, g, device)[0])
    eps2 = epsilon * (2.0 * n) ** (2.0 / 3.0)
    scale = 4.0 * gamma * n / eps2
    sure = min(256, math.floor(256.0 * _survival(tau_hat, scale)))
    maybe = min(256, math.ceil(256.0 * _survival(tau_hat - gamma, scale)))

    chunks = list(diff.chunks())
    counts = [0] * len(chunks)
    accepted = workspace.get("accepted", size, torch.bool, device)
    passes = 0
    if maybe == 0:
        # No candidate can pass (S(τ̂ - γ) underflows): the reference would spin forever.
        for var, lo, hi in chunks:
            _check_finite(var, var.src[lo:hi])
    while maybe > 0:
        passes += 1
        _select_pass(
            diff,
            chunks,
            counts,
            accepted,
            passes == 1,
            sure=sure,
            maybe=maybe,
            steps=steps,
            gamma=gamma,
            tau_hat=tau_hat,
            scale=scale,
            g=g,
            ws=workspace,
        )
        if sum(counts) >= n:
            break
        # S(τ̂ - γ) bounds every candidate's chance per pass: when the passes left cannot be
        # expected to accept even one more, running them only burns time (τ̂ out of reach)
        hopeless = (size - sum(counts)) * _survival(tau_hat - gamma, scale) * (
            max_passes - passes
        ) < 1e-3
        if passes >= max_passes or hopeless:
            log.warning(
                "SVT: %d of %d values passed the noisy threshold after %d passes; sharing "
                "from those only",
                sum(counts),
                n,
                passes,
            )
            break
    total = sum(counts)

    # n draws with replacement among the accepted (the reference's np.random.choice), split
    # over chunks by a multinomial (sequential binomials) so each chunk maps its own ranks.
    left, pool = n, total
    lap_scale = 2.0 * gamma / noise_var
    for ci, (var, lo, hi) in enumerate(chunks):
        c = counts[ci]
        if c == 0 or left == 0:
            pool -= c
            diff.clear(var, lo, hi)
            continue
        draws = left if c >= pool else _binomial(left, c / pool, g, device)
        left -= draws
        pool -= c
        if draws == 0 or var.scalar:
            diff.clear(var, lo, hi)  # a scalar spends its slot but passes through unchanged
            continue
        acc = accepted[var.offset + lo : var.offset + hi]
        ranks = torch.randint(c, (draws,), generator=g, device=device)
        pos = _flatnonzero(acc).to(device).index_select(0, ranks)
        out = var.out[lo:hi]
        out_np = _np(out) if out.dtype is not torch.bfloat16 else None
        if out_np is None:
            # torch's index_put_ leaves the winner among duplicates unspecified; numpy's fancy
            # assignment is sequential (last wins, as in the reference). Dedupe for torch.
            pos = torch.unique(pos)
        x = var.src[lo:hi].index_select(0, pos).to(var.work)
        if steps != 1.0:
            x.div_(steps)
        g_w = _floor_to(gamma, var.work)
        x.add_(_laplace(x.numel(), lap_scale, var.work, g, device)).clamp_(-g_w, g_w)
        if steps != 1.0:
            x.mul_(steps)
        diff.clear(var, lo, hi)  # in place: the chunk's last read was x
        if out_np is not None:
            out_np[pos.numpy()] = x.numpy().astype(out_np.dtype, copy=False)
        else:
            out.index_copy_(0, pos, x.to(out.dtype))
    stats = SvtStats(size, n, passes, total, tau_hat, scale)
    return diff.result(), stats
