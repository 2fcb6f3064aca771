"""What every training form (the torch fitter, Clara's MONAI form, MONAI bundles) does with a
model's weights the same way: numpy copies, checked loads, and the best local model.

The federated client sees weights as ``{name: numpy array}`` in ``state_dict`` order; here is
the one conversion each way, the one check of what arrives (names, shapes, dtypes) and the one
keeper of the best local model (``<MMAR_CKPT_DIR>/best_model.pt``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from engine.fileio import atomic_write

__all__ = [
    "BEST_MODEL_NAME",
    "BestModel",
    "TrainerFacts",
    "checked_tensors",
    "load_weights",
    "to_numpy",
]

log = logging.getLogger(__name__)

#: The best local model's file name in ``MMAR_CKPT_DIR`` (Clara's default ``models/``).
BEST_MODEL_NAME = "best_model.pt"


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A CPU numpy copy of every tensor (bfloat16, which numpy lacks, as float32)."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        dtype = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
        out[name] = t.to("cpu", dtype=dtype, copy=True).numpy()
    return out


def checked_tensors(
    state: Mapping[str, torch.Tensor], weights: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """Checks every entry against ``state``, then converts to tensors of its dtype and device.

    Raises:
        ValueError: A name is not a variable of ``state``, a shape does not match, or a value
            is not numeric. Nothing has been converted then.
    """
    unknown = [name for name in weights if name not in state]
    if unknown:
        raise ValueError(
            f"unknown variable {unknown[0]!r}: the model has no such variable "
            f"({len(unknown)} unknown of {len(weights)} given; the model has {len(state)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        target = state[name]
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise ValueError(f"variable {name!r}: not an array ({exc})") from exc
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"variable {name!r}: shape {tuple(array.shape)} given, but the model's is "
                f"{tuple(target.shape)}"
            )
        if array.dtype.kind not in "biufc":
            raise ValueError(f"variable {name!r}: dtype {array.dtype} is not numeric")
        arrays[name] = array
    return {
        name: torch.as_tensor(array).to(state[name].device, dtype=state[name].dtype)
        for name, array in arrays.items()
    }


def load_weights(module: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Loads some or all variables into ``module`` in place (names not given keep theirs).

    Raises:
        ValueError: as :func:`checked_tensors`; then nothing has been changed.
    """
    state = module.state_dict()
    tensors = checked_tensors(state, weights)
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)


class BestModel:
    """The best local model by a key metric, kept in ``<ckpt_dir>/best_model.pt``.

    Only a model that local training made is offered (:meth:`offer`); a global model just
    received is measured by its caller, never offered. The best model lives on disk, not in
    memory (a second whole model in the training process for the few times it is read): it is
    saved from the model's own tensors, without a copy on a CPU site, and read back when
    asked for. Only when the file cannot be written is it kept in memory instead.
    """

    def __init__(self, ckpt_dir: Path, higher_is_better: bool) -> None:
        self.path = ckpt_dir / BEST_MODEL_NAME
        self.higher_is_better = higher_is_better
        self.metric: float | None = None
        self._kept: dict[str, np.ndarray] | None = None  # only when the file could not be written

    def offer(self, value: float, state: Mapping[str, torch.Tensor]) -> bool:
        """Keeps ``state`` when ``value`` beats the best so far; True when it did."""
        if not math.isfinite(value):
            return False
        best = self.metric
        if best is not None and (value <= best if self.higher_is_better else value >= best):
            return False
        self.metric = value
        # CPU tensors are saved as they are (no copy); GPU ones come over once.
        tensors = {name: t.detach().cpu() for name, t in state.items()}
        try:
            # Readers see the old file or the new one, never half of one, even after a crash.
            atomic_write(self.path, lambda fh: torch.save(tensors, fh))
            self._kept = None
        except OSError as exc:
            # Training goes on with the best model in memory; the operator sees why the file
            # is stale.
            log.warning("could not save the best model to %s: %s", self.path, exc)
            self._kept = to_numpy(tensors)
        return True

    def weights(self) -> dict[str, np.ndarray] | None:
        """The best weights (fresh arrays); before any offer, those an earlier run saved, or
        None."""
        if self._kept is not None:
            return {name: array.copy() for name, array in self._kept.items()}
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        # The loaded tensors are this call's own: their memory becomes the arrays (bfloat16,
        # which numpy lacks, as float32).
        return {
            name: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            for name, t in state.items()
        }


class TrainerFacts:
    """The read-only facts every torch training form (the fitter, Clara's MONAI form, bundles)
    gives the same way. A form sets ``_best`` (its BestModel) and ``_n_iter``, and has a
    ``model`` (the torch module it trains)."""

    _best: BestModel
    _n_iter: int
    model: torch.nn.Module

    @property
    def best_metric(self) -> float | None:
        """The best key metric seen on a model local training made, if any."""
        return self._best.metric

    @property
    def n_iter(self) -> int:
        """Steps the last ``train`` took (the ``n_iter`` FedAvg weighs by)."""
        return self._n_iter

    @property
    def num_parameters(self) -> int:
        """Number of scalar parameters of the model."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def best_model_path(self) -> Path:
        """Where the best local model is saved: ``<MMAR_CKPT_DIR>/best_model.pt``."""
        return self._best.path
