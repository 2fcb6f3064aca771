"""Built-in datasets: synthetic, non-IID per-site classification data generated from seeds."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticClassification", "site_seed"]

_SPLITS = {"train": 1, "validation": 2}


def site_seed(site_name: str) -> int:
    """A seed derived from a site's name that is the same in every process and on every machine.

    Python's ``hash()`` of a string changes per process, so CRC-32 of the UTF-8 name is used.
    """
    return zlib.crc32(site_name.encode("utf-8"))


class SyntheticClassification(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A classification task shared by all sites, with each site seeing its own mix of classes.

    The "world" is the same on every site (it depends on ``world_seed`` only): each class is a
    mixture of ``clusters_per_class`` Gaussian clusters, and the points are then bent by a fixed
    random nonlinear map, so the classes are neither linearly separable nor trivial.

    Each site draws its class proportions from ``Dirichlet(alpha)`` seeded by its name (small
    ``alpha`` → strong label skew, i.e. non-IID sites). The validation split follows the same
    site distribution with a different sample seed. Everything is derived from seeds, so two
    runs see identical data.

    Args:
        num_classes: Number of classes.
        num_features: Length of a feature vector.
        samples: Number of samples in this split.
        split: ``"train"`` or ``"validation"``.
        alpha: Dirichlet concentration of the per-site label distribution.
        world_seed: Seed of the shared world (the same on every site of a federation).
        clusters_per_class: Gaussian clusters that make up one class.
        separation: Spread of the cluster centres; larger is easier.
        noise: Standard deviation of points around their cluster centre.
        site_name: The site; defaults to ``context["site_name"]``.
        context: Passed by the fitter: ``{"site_name": ..., "mmar_root": ...}``.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        samples: int,
        split: str = "train",
        alpha: float = 0.5,
        world_seed: int = 0,
        clusters_per_class: int = 2,
        separation: float = 1.0,
        noise: float = 1.0,
        site_name: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        for arg, value in (
            ("num_classes", num_classes),
            ("num_features", num_features),
            ("samples", samples),
            ("clusters_per_class", clusters_per_class),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not separation > 0 or not noise >= 0:
            raise ValueError("separation must be > 0 and noise >= 0")
        if site_name is None and context is not None:
            site_name = context.get("site_name")
        if not isinstance(site_name, str) or not site_name:
            raise ValueError("needs the site's name: pass site_name or run it through a fitter")

        self.site_name = site_name
        self.split = split
        self.num_classes = num_classes
        world = np.random.default_rng([world_seed, 0])
        centres = world.normal(0.0, separation, (num_classes, clusters_per_class, num_features))
        # A fixed near-identity nonlinear warp: curved class boundaries, still learnable.
        warp = world.normal(0.0, 1.0 / np.sqrt(num_features), (num_features, num_features))

        site = site_seed(site_name)
        proportions = np.random.default_rng([world_seed, site, 0]).dirichlet(
            np.full(num_classes, float(alpha))
        )
        draw = np.random.default_rng([world_seed, site, _SPLITS[split]])
        labels = draw.choice(num_classes, size=samples, p=proportions)
        cluster = draw.integers(0, clusters_per_class, size=samples)
        z = centres[labels, cluster] + draw.normal(0.0, noise, (samples, num_features))
        x = z + np.tanh(z @ warp) * separation

        self.proportions = proportions
        self.features = torch.from_numpy(x.astype(np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def class_counts(self) -> list[int]:
        """Samples per class in this split (shows the site's label skew)."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()  # type: ignore[no-any-return]
