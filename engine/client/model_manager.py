"""ClientModelManager: the site's side of the model: apply the global, compute Δ, privacy."""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.client.fl_context import RemoteModel
from protos import federated_pb2 as pb

__all__ = ["ClientModelManager", "ModelDiffError"]

log = logging.getLogger("engine.client.model_manager")


class ModelDiffError(ValueError):
    """Δ cannot be shared: it holds NaN or Inf, or does not match the global model."""


_FINITE_BLOCK = 1 << 16  # elements checked or compared at once: no model-sized temporary


@dataclass
class _Baseline:
    """The global model Δ is computed from (the shared variables, as received).

    Attributes:
        arrays: the received arrays themselves (set_weights copied them into the model), or
            None once this round's contribution computed Δ in them (``model_diff(consume=True)``).
        specs: each variable's dtype and shape, in the server's order.
        digest: a SHA-256 of the arrays, taken before Δ consumed them: ``is_current_global``
            still recognises the model after that.
    """

    arrays: dict[str, np.ndarray] | None
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    digest: bytes = b""


def _digest(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]], params: Mapping) -> bytes:
    """SHA-256 over names, dtypes, shapes and bytes of ``params``, in the order of ``specs``."""
    h = hashlib.sha256()
    for name in specs:
        value = np.asarray(params[name])
        if not value.flags.c_contiguous:
            value = value.copy(order="C")
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(memoryview(value.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    return h.digest()


def _all_finite(value: np.ndarray) -> bool:
    """NaN/Inf screen, block by block: min and max surface both without a bool temporary."""
    if value.dtype.kind == "c":
        return bool(np.isfinite(value).all())
    flat = value.reshape(-1)
    for start in range(0, flat.size, _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        if not (np.isfinite(block.min()) and np.isfinite(block.max())):
            return False
    return True


def _equal(a: Any, b: Any) -> bool:
    """``np.array_equal``, block by block: no model-sized bool temporary."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        return bool(np.array_equal(a, b))
    fa, fb = a.reshape(-1), b.reshape(-1)
    return all(
        np.array_equal(fa[i : i + _FINITE_BLOCK], fb[i : i + _FINITE_BLOCK])
        for i in range(0, fa.size, _FINITE_BLOCK)
    )


def _takes_copy(get_weights: Any) -> bool:
    """Whether a reader-writer's ``get_weights`` offers views (``copy=False``, the fitter's)."""
    try:
        return "copy" in inspect.signature(get_weights).parameters
    except (TypeError, ValueError):
        return False


def _takes_in_place(apply: Any) -> bool:
    """Whether a privacy protocol's ``apply`` takes ``in_place`` (the built-ins'; the lineage's
    ``apply(model_diff, train_ctx)`` of a BYO protocol does not, and is called as it is)."""
    try:
        param = inspect.signature(apply).parameters.get("in_place")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)


class ClientModelManager:
    """Client-side model manager, living on the site's machine.

    Args:
        task_names: the servers' task names this site trains for.
        exclude_vars: regex; matching variables stay local (not loaded from, nor sent to,
            the server).
        privacy: a PrivacyProtocol applied to Δ before it leaves, or None.
        model_reader_writer: object with ``get_weights()`` / ``set_weights()``; default: the fitter.
            ``set_weights`` copies the values into the model and keeps no reference to the
            arrays: the received global model's arrays are the baseline of Δ, not a copy of
            them. A ``get_weights`` that takes ``copy`` (the fitter's) is asked for views
            (``copy=False``) where the values are only read, never kept.
        model_validator: object with ``validate(weights)``; default: the fitter.
        visualizer: unused hook of the lineage.

    Memory: nothing here copies a whole model it does not send. The received global model is
    the baseline of Δ as it is; the round's contribution computes Δ in it
    (``model_diff(consume=True)``), reading the local model through views, and a privacy
    protocol whose ``apply`` takes ``in_place`` writes its result into that Δ (``outgoing``).
    """

    def __init__(
        self,
        task_names: list[str] | None = None,
        exclude_vars: str | None = None,
        privacy: Any = None,
        model_reader_writer: Any = None,
        model_validator: Any = None,
        visualizer: Any = None,
    ) -> None:
        self.task_names = list(task_names or [])
        self.exclude_vars = re.compile(exclude_vars) if exclude_vars else None
        self.privacy = privacy
        self.model_reader_writer = model_reader_writer
        self.model_validator = model_validator
        self.visualizer = visualizer
        self.fitter: Any = None
        self._global: dict[str, _Baseline] = {}
        self._meta: dict[str, pb.ModelMetaData] = {}
        self.last_privacy: dict[str, Any] | None = None
        # the arrays of the last Δ computed in the received model's memory (no reference kept)
        self._own_delta: dict[str, weakref.ref[np.ndarray]] = {}

    # ------------------------------------------------------------------ fitter

    def set_fitter(self, fitter: Any) -> None:
        self.fitter = fitter

    def get_fitter(self) -> Any:
        return self.fitter

    def _rw(self) -> Any:
        rw = self.model_reader_writer or self.fitter
        if rw is None:
            raise RuntimeError("no fitter or model_reader_writer set")
        return rw

    def train(self) -> int:
        """Proxy to the fitter's train(); returns the number of local iterations."""
        return int(self.fitter.train())

    def num_local_iterations(self) -> int:
        """Local iterations of the last round (1 when there is no fitter)."""
        if self.fitter is None:
            return 1
        return max(1, int(getattr(self.fitter, "n_iter", 1) or 1))

    # ------------------------------------------------------------------ global model

    def is_excluded(self, name: str) -> bool:
        return bool(self.exclude_vars and self.exclude_vars.search(name))

    def assign_current_model(self, remote_models: Mapping[str, RemoteModel]) -> bool:
        """Loads the global model(s) into the local model, leaving excluded variables local.

        Args:
            remote_models: task name to the model received from that server.

        Returns:
            True if the local model changed.

        Raises:
            ValueError: a variable is unknown locally or has another shape; nothing is changed.
        """
        changed = False
        for task_name, remote in remote_models.items():
            shared = {k: v for k, v in remote.params.items() if not self.is_excluded(k)}
            # Views where the reader-writer offers them: only read here, before set_weights.
            local = self._local_weights(views=True)
            for name, value in shared.items():
                if name not in local:
                    raise ValueError(
                        f"variable {name!r} of the global model is not in the local model"
                    )
                if tuple(local[name].shape) != tuple(value.shape):
                    raise ValueError(
                        f"variable {name!r}: global shape {tuple(value.shape)} differs from local "
                        f"{tuple(local[name].shape)}"
                    )
            changed = changed or any(not _equal(local[k], v) for k, v in shared.items())
            del local
            self._rw().set_weights(shared)
            # The received arrays are the baseline of Δ as they are: set_weights copied them.
            self._global[task_name] = _Baseline(
                arrays=shared,
                specs={k: (np.asarray(v).dtype, tuple(np.shape(v))) for k, v in shared.items()},
            )
            self._meta[task_name] = remote.meta
        return changed

    def is_current_global(self, task_name: str, params: Mapping[str, np.ndarray]) -> bool:
        """Whether ``params`` is the global model loaded last (over the shared variables).

        A contribution computed from that model still fits a server that hands it out again.
        """
        base = self._global.get(task_name)
        if base is None:
            return False
        shared = {k: v for k, v in params.items() if not self.is_excluded(k)}
        if shared.keys() != base.specs.keys():
            return False
        if base.arrays is None:  # Δ was computed in them: their digest says
            if any(
                (np.asarray(v).dtype, tuple(np.shape(v))) != base.specs[k]
                for k, v in shared.items()
            ):
                return False
            return _digest(base.specs, shared) == base.digest
        arrays = base.arrays
        return all(
            np.asarray(v).dtype == arrays[k].dtype and _equal(v, arrays[k])
            for k, v in shared.items()
        )

    def model_meta(self, task_name: str) -> pb.ModelMetaData | None:
        """Meta of the last global model from ``task_name`` (round, task...)."""
        return self._meta.get(task_name)

    def model_vars(self, task_name: str) -> list[str]:
        """Variables shared with ``task_name``'s server (the global model's, minus excluded)."""
        base = self._global.get(task_name)
        return list(base.specs) if base is not None else []

    # ------------------------------------------------------------------ local model

    def _local_weights(self, views: bool) -> dict[str, np.ndarray]:
        """The local weights: views of the model's memory when ``views`` and the reader-writer
        offers them (read them, never keep them), else its copy."""
        rw = self._rw()
        if views and _takes_copy(rw.get_weights):
            return dict(rw.get_weights(copy=False))
        return dict(rw.get_weights())

    def get_current_model_data(
        self, local_model_params: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The local model's weights (or ``local_model_params`` when given)."""
        if local_model_params is not None:
            return dict(local_model_params)
        return self._rw().get_weights()

    def update_current_model(self, local_model_params: Mapping[str, np.ndarray]) -> None:
        """Writes weights into the local model."""
        self._rw().set_weights(local_model_params)

    def read_current_model(
        self, task_name: str, type_str: str = "delta_w"
    ) -> dict[str, np.ndarray]:
        """What to send: Δ = local − global over the shared variables, after privacy
        (``model_diff`` then ``outgoing``; the lineage's one call for both).

        Args:
            task_name: the server.
            type_str: "delta_w" (the difference) or "weights" (the shared local weights).

        Raises:
            ModelDiffError: a value is NaN or Inf (it is refused, not shared).
        """
        # Δ's arrays are new ones model_diff just made: privacy may write into them
        return self.outgoing(
            self.model_diff(task_name, type_str),
            type_str,
            self.num_local_iterations(),
            in_place=True,
        )

    def model_diff(
        self, task_name: str, type_str: str = "delta_w", *, consume: bool = False
    ) -> dict[str, np.ndarray]:
        """Δ = local − global over the shared variables ("weights": a copy of the local
        weights), before any privacy: integer Δ wrapped into the variable's dtype, bool
        variables left out.

        Args:
            task_name: the server.
            type_str: "delta_w" or "weights".
            consume: compute Δ in the received global model's own arrays instead of new ones
                (the round's contribution: no model-sized allocation). The model is still
                recognised by ``is_current_global`` (by its digest), but Δ from it cannot be
                computed again: a later call raises RuntimeError until the next global model.
        """
        base = self._global.get(task_name)
        if base is None:
            raise RuntimeError(f"no global model from {task_name!r} yet")
        if type_str not in ("delta_w", "weights"):
            raise ValueError(f"type_str must be 'delta_w' or 'weights', got {type_str!r}")
        if type_str == "weights":
            local = self._local_weights(views=False)  # what leaves must not change with training
            return {name: np.asarray(local[name]) for name in base.specs}
        if base.arrays is None:
            raise RuntimeError(
                f"Δ from {task_name!r}'s global model was already computed in it (this "
                "round's contribution); pull the next global model first"
            )
        local = self._local_weights(views=True)
        arrays = base.arrays
        if consume:
            base.digest = _digest(base.specs, arrays)
            base.arrays = None  # from here on (even if this fails) they are no baseline
        out: dict[str, np.ndarray] = {}
        for name, g in arrays.items():
            value = np.asarray(local[name])
            if g.dtype.kind == "b":
                continue  # a bool variable has no difference to average: it stays local
            if g.dtype.kind in "iu":
                # Integer Δ in a wide signed type, then wrapped into the variable's own dtype
                # for the wire; the server reads it back as signed. (Counters: small.)
                out[name] = (value.astype(np.int64) - g.astype(np.int64)).astype(g.dtype)
                continue
            target = g if consume and g.flags.writeable else np.empty(g.shape, g.dtype)
            np.subtract(value, g, out=target, casting="same_kind")
            out[name] = target
        if consume:
            self._own_delta = {name: weakref.ref(a) for name, a in out.items()}
        return out

    def prepare_model_data(
        self,
        model_data: Mapping[str, Any],
        type_str: str = "delta_w",
        total_steps: int | None = None,
    ) -> dict[str, np.ndarray]:
        """What of model data the caller computed (a DirectFederatedClient's Δ) may leave.

        The same steps as ``read_current_model`` after Δ: excluded variables are dropped
        (they stay local), NaN and Inf are refused, and privacy is applied to a Δ.

        Args:
            model_data: variable name to array.
            type_str: "delta_w" (a difference: privacy applies) or "weights".
            total_steps: the local steps T the privacy protocol divides by (default: the
                model manager's ``num_local_iterations()``).

        Raises:
            ModelDiffError: a value is NaN or Inf (it is refused, not shared).
        """
        if type_str not in ("delta_w", "weights"):
            raise ValueError(f"type_str must be 'delta_w' or 'weights', got {type_str!r}")
        out = {
            name: np.asarray(value)
            for name, value in model_data.items()
            if not self.is_excluded(name)
        }
        steps = self.num_local_iterations() if total_steps is None else max(1, int(total_steps))
        return self.outgoing(out, type_str, steps)

    def outgoing(
        self,
        out: dict[str, np.ndarray],
        type_str: str,
        total_steps: int,
        *,
        in_place: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """The last steps before anything leaves: NaN/Inf refused, then privacy on a Δ (with
        ``total_steps`` as T); ``last_privacy`` says what the protocol did.

        Args:
            out: variable name to array.
            type_str: "delta_w" (privacy applies) or "weights".
            total_steps: T.
            in_place: whether a protocol that can (its ``apply`` takes ``in_place``; a BYO
                protocol with the lineage's ``apply(model_diff, train_ctx)`` is called as it is)
                may write its result into ``out``'s arrays instead of a new Δ; None (the
                default): exactly when they are the Δ ``model_diff(consume=True)`` last computed
                in this model manager's own memory (no model-sized result then).
        """
        own, self._own_delta = self._own_delta, {}
        if in_place is None:
            in_place = bool(out) and all(
                name in own and own[name]() is value for name, value in out.items()
            )
        for name, value in out.items():
            if value.dtype.kind in "fc" and not _all_finite(value):
                raise ModelDiffError(
                    f"variable {name!r}: the local model holds NaN or Inf; the update is not shared"
                )
        if type_str == "delta_w" and self.privacy is not None:
            t0 = time.perf_counter()
            train_ctx = {"total_steps": total_steps}
            in_place = in_place and _takes_in_place(self.privacy.apply)
            if in_place:
                out = self.privacy.apply(out, train_ctx, in_place=True)
            else:
                out = self.privacy.apply(out, train_ctx)
            shared = sum(int(np.count_nonzero(v)) for v in out.values())
            self.last_privacy = {
                "protocol": type(self.privacy).__name__,
                "shared_values": shared,
                "total_values": sum(int(np.size(v)) for v in out.values()),
                "seconds": time.perf_counter() - t0,
            }
        return out

    # ------------------------------------------------------------------ validation

    def validate_model(
        self,
        cross_site_val_configer: Any,
        checkpoint: Mapping[str, np.ndarray] | None,
        *,
        after_training: bool = False,
    ) -> dict[str, float]:
        """Metrics of ``checkpoint`` (or the local model) on this site's validation data.

        Only the local model measured right after local training (``after_training``) may
        become the site's best model: a global model just received is measured, not kept.
        """
        if self.model_validator is not None:
            return dict(self.model_validator.validate(checkpoint))
        if checkpoint is not None:
            return dict(self.fitter.validate(checkpoint))
        return dict(self.fitter.validate(None, after_training=after_training))

    def get_best_model(self) -> dict[str, np.ndarray] | None:
        """The best local weights seen by validation, over the shared variables."""
        if self.fitter is None:
            return None
        best = self.fitter.best_weights()
        if best is None:
            return None
        return {k: v for k, v in best.items() if not self.is_excluded(k)}

    def close(self) -> None:
        """Drops the held global models."""
        self._global.clear()
        self._meta.clear()
