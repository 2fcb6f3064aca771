"""Synthetic segmentation volumes for the segmentation demo and tests: MONAI's own generators,
written as NIfTI with nibabel, with a Clara datalist per site.

This is a simulation, and says so: the images are MONAI's ``create_test_image_2d/3d`` (random
spheres/discs on noise), labelled ``synthetic`` in the datalist's description.
"""

from __future__ import annotations

from pathlib import Path

from engine.fileio import save_json_atomic
from engine.training.clara_config import require_monai

__all__ = ["write_segmentation_data"]


def write_segmentation_data(
    folder: Path,
    *,
    seed: int,
    n_train: int = 8,
    n_validation: int = 4,
    size: int = 32,
    dims: int = 3,
    datalist: str = "datalist.json",
) -> Path:
    """Writes ``imagesTr/``, ``labelsTr/`` and a Clara datalist; returns the datalist's path.

    A folder that already holds the datalist is left as it is (data is made once, at first
    run). Labels are binary (background / object).

    Raises:
        TrainConfigError: MONAI or nibabel is not installed (naming the extra).
    """
    folder = Path(folder)
    target = folder / datalist
    if target.is_file():
        return target
    require_monai(target, None)
    import nibabel as nib  # deferred: part of the monai extra
    import numpy as np  # deferred: with nibabel, only when data is made
    from monai.data import create_test_image_2d, create_test_image_3d  # deferred: monai extra

    state = np.random.RandomState(seed)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    make = create_test_image_3d if dims == 3 else create_test_image_2d
    items = []
    for i in range(n_train + n_validation):
        image, label = make(
            *([size] * dims),
            num_objs=4,
            rad_max=size // 4,
            rad_min=max(2, size // 10),
            noise_max=0.4,
            num_seg_classes=1,
            random_state=state,
        )
        name = f"case_{i:03d}.nii.gz"
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "labelsTr" / name)
        items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    save_json_atomic(
        target,
        {
            "description": (
                f"synthetic: MONAI create_test_image_{dims}d, seed {seed} (a simulation)"
            ),
            "training": items[:n_train],
            "validation": items[n_train:],
        },
    )
    return target
