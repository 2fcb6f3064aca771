"""An MMAR's initial model, without its training data (``python -m`` keeps torch out of the
caller): the checkpoint the MMAR ships (Clara's ``PRETRAIN_WEIGHTS_FILE``), else the model
component alone, built with the config's seed. Datasets are never built: a server has no data.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import load_environment, local_environment_file
from engine.fileio import save_npz_atomic
from engine.training.clara_config import ClaraConfig
from engine.training.config import TRAIN_CONFIG, is_bundle, load_train_config
from engine.training.errors import TrainConfigError
from engine.training.weights import to_numpy

__all__ = ["initial_weights", "write_initial_model"]


def initial_weights(mmar: str | Path) -> dict[str, np.ndarray]:
    """The weights a federation starts from, as named numpy arrays.

    Raises:
        TrainConfigError: the config or the checkpoint is unusable (naming which).
    """
    root = Path(mmar).resolve()
    environment = load_environment(root, local_environment_file(root))
    pretrained = environment.variables.get("PRETRAIN_WEIGHTS_FILE")
    if pretrained:
        return _checkpoint(Path(pretrained), environment.path)
    if is_bundle(root):
        from engine.training import bundle  # deferred: MONAI's bundle form, only for bundles

        return bundle.initial_bundle_weights(root)
    if not (root / TRAIN_CONFIG).is_file():
        raise TrainConfigError(root / TRAIN_CONFIG, None, "file not found; no model to start from")
    config = load_train_config(root, environment)
    if isinstance(config, ClaraConfig):
        from engine.training import clara_monai  # deferred: MONAI, only for this form

        model = clara_monai.build_clara_model(config)
    else:
        from engine.training.components import build_component  # deferred: torch components

        context = {"site_name": "server", "mmar_root": root, "environment": {}}
        custom = root / "custom"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_component(
                config.model, config.file, custom if custom.is_dir() else None, context
            )
    if not isinstance(model, torch.nn.Module):
        raise TrainConfigError(config.file, "model", "expected a torch.nn.Module")
    return to_numpy(model.state_dict())


def _checkpoint(path: Path, where: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TrainConfigError(
            where, "PRETRAIN_WEIGHTS_FILE", f"{path} does not exist (the model to start from)"
        )
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainConfigError(
            where, "PRETRAIN_WEIGHTS_FILE", f"{path} is not a torch checkpoint of tensors: {exc}"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # Clara's and MONAI's CheckpointSaver: {"model": state_dict}
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise TrainConfigError(
            where, "PRETRAIN_WEIGHTS_FILE", f"{path} holds no state_dict of named tensors"
        )
    return to_numpy(state)


def write_initial_model(mmar: Path, out: Path) -> None:
    """Saves the MMAR's initial model (see :func:`initial_weights`) to ``out`` atomically."""
    save_npz_atomic(out, initial_weights(mmar))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m engine.training.initial_model MMAR OUT.npz")
    write_initial_model(Path(sys.argv[1]), Path(sys.argv[2]))
