"""A tiny MONAI bundle for tests: 2D 32x32 images, a small UNet, DiceLoss and MeanDice.

The bundle follows MONAI's layout (``configs/train.json`` with ``network_def``, ``network``,
``train#...``, ``validate#...``), reads its images and labels as ``.npy`` files through a
Decathlon-style datalist, and validates every epoch from inside training (ValidationHandler), as
real bundles do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

_LOAD = [
    {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
    {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"], "channel_dim": "no_channel"},
    {"_target_": "EnsureTyped", "keys": ["image", "label"], "dtype": "$torch.float32"},
]

TRAIN_CONFIG: dict[str, Any] = {
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "dataset_dir": "$@bundle_root + '/data'",
    "data_list_file": "$@bundle_root + '/data/datalist.json'",
    "device": "$torch.device('cpu')",
    "epochs": 100,
    "val_interval": 1,
    "learning_rate": 0.01,
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    },
    "network": "$@network_def.to(@device)",
    "loss": {"_target_": "DiceLoss", "to_onehot_y": True, "softmax": True},
    "optimizer": {
        "_target_": "torch.optim.Adam",
        "params": "$@network.parameters()",
        "lr": "@learning_rate",
    },
    "train": {
        "deterministic_transforms": copy.deepcopy(_LOAD),
        "preprocessing": {"_target_": "Compose", "transforms": "$@train#deterministic_transforms"},
        "dataset": {
            "_target_": "Dataset",
            "data": "$monai.data.load_decathlon_datalist(@data_list_file, True, 'training', "
            "@dataset_dir)",
            "transform": "@train#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@train#dataset",
            "batch_size": 2,
            "shuffle": True,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": 2,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "ValidationHandler",
                "validator": "@validate#evaluator",
                "epoch_level": True,
                "interval": "@val_interval",
            },
            {
                "_target_": "StatsHandler",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
        ],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": "@epochs",
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "postprocessing": "@train#postprocessing",
            "train_handlers": "@train#handlers",
            "amp": False,
        },
    },
    "validate": {
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {
            "_target_": "Dataset",
            "data": "$monai.data.load_decathlon_datalist(@data_list_file, True, 'validation', "
            "@dataset_dir)",
            "transform": "@validate#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 2,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": "%train#postprocessing",
        "handlers": [
            # A bundle's usual "resume from the last model": MonaiAlgo disables it (the file
            # does not exist, so building would fail if it ran).
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@ckpt_dir + '/no_such_model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "key_metric": {
            "val_mean_dice": {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "val_handlers": "@validate#handlers",
            "amp": False,
        },
    },
    "initialize": ["$monai.utils.set_determinism(seed=0)"],
    "run": ["$@train#trainer.run()"],
}


def make_bundle(
    root: Path,
    *,
    n_train: int = 4,
    n_validation: int = 2,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Writes a bundle to ``root``: ``configs/train.json`` and ``data/`` (images, datalist).

    Args:
        root: The bundle (MMAR) folder; created.
        n_train: Training pairs (with batch size 2: ``n_train / 2`` iterations an epoch).
        n_validation: Validation pairs.
        config: The train config to write instead of :data:`TRAIN_CONFIG`.
        seed: Seed of the synthetic images.
    """
    from monai.data import create_test_image_2d  # deferred: monai is an optional extra

    data = root / "data"
    data.mkdir(parents=True)
    (root / "configs").mkdir()
    rng = np.random.RandomState(seed)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    for split, count in (("training", n_train), ("validation", n_validation)):
        for i in range(count):
            image, label = create_test_image_2d(
                32, 32, num_objs=3, rad_max=8, noise_max=0.2, random_state=rng
            )
            np.save(data / f"{split}_img{i}.npy", image.astype(np.float32))
            np.save(data / f"{split}_seg{i}.npy", (label > 0).astype(np.float32))
            lists[split].append({"image": f"{split}_img{i}.npy", "label": f"{split}_seg{i}.npy"})
    (data / "datalist.json").write_text(json.dumps(lists), encoding="utf-8")
    body = TRAIN_CONFIG if config is None else config
    (root / "configs" / "train.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
    return root


def train_config(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`TRAIN_CONFIG` with top-level ``changes``."""
    config = copy.deepcopy(TRAIN_CONFIG)
    config.update(changes)
    return config
