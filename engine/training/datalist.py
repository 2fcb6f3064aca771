"""DatalistDataset: a torch Dataset over a Clara datalist (``DATASET_JSON`` under ``DATA_ROOT``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DatalistDataset"]


class DatalistDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The items of one list of a Clara datalist JSON, as ``(image, label)`` tensors.

    A Clara datalist is ``{"training": [{"image": ..., "label": ...}, ...], "validation": [...]}``
    (the file ``DATASET_JSON`` of ``environment.json`` names). Here ``image`` and ``label`` are
    each a ``.npy`` file (relative to ``data_file_base_dir``, Clara's ``DATA_ROOT``), a number,
    or a list of numbers. NIfTI and other image formats need a Dataset of your own under
    ``custom/``. Files are read when an item is asked for, not all at once.

    The argument names are Clara's (``data_list_file_path``, ``data_file_base_dir``,
    ``data_list_key``); left out, the first two come from the MMAR's ``environment.json``
    (``DATASET_JSON``, ``DATA_ROOT``), so ``{"name": "DatalistDataset", "args": {}}`` reads the
    MMAR's own datalist.

    Args:
        data_list_file_path: the datalist JSON.
        data_file_base_dir: the folder relative file names are under.
        data_list_key: which list (``training``, ``validation``, ...).
        context: passed by the fitter: ``{"environment": {...}, ...}``.

    Raises:
        ValueError: the datalist is missing, not JSON, has no such list, or an item is not
            ``{"image": ..., "label": ...}`` or names a file that does not exist.
    """

    def __init__(
        self,
        data_list_file_path: str | None = None,
        data_file_base_dir: str | None = None,
        data_list_key: str = "training",
        context: Mapping[str, Any] | None = None,
    ) -> None:
        env = dict((context or {}).get("environment") or {})
        if data_list_file_path is None:
            data_list_file_path = env.get("DATASET_JSON")
        if data_file_base_dir is None:
            data_file_base_dir = env.get("DATA_ROOT")
        if not data_list_file_path:
            raise ValueError(
                "data_list_file_path is not given and environment.json defines no DATASET_JSON"
            )
        path = Path(data_list_file_path)
        base = Path(data_file_base_dir) if data_file_base_dir else path.parent
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"datalist {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"datalist {path} cannot be read as JSON: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get(data_list_key), list):
            keys = ", ".join(document) if isinstance(document, dict) else "none"
            raise ValueError(f"datalist {path} has no list {data_list_key!r} (it has: {keys})")
        items = document[data_list_key]
        if not items:
            raise ValueError(f"datalist {path}: list {data_list_key!r} is empty")
        self.items: list[tuple[Any, Any]] = []
        for i, item in enumerate(items):
            where = f"datalist {path}: {data_list_key}[{i}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ValueError(f'{where}: expected {{"image": ..., "label": ...}}, got {item!r}')
            self.items.append(
                (
                    _entry(item["image"], base, f"{where}.image"),
                    _entry(item["label"], base, f"{where}.label"),
                )
            )
        self.path, self.base, self.key = path, base, data_list_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.items[index]
        x = torch.from_numpy(_load(image).astype(np.float32, copy=False))
        y_array = _load(label)
        y = torch.from_numpy(
            y_array.astype(np.int64 if y_array.dtype.kind in "biu" else np.float32, copy=False)
        )
        return x, y


def _entry(value: Any, base: Path, where: str) -> Any:
    if isinstance(value, str):
        file = base / value
        if file.suffix != ".npy":
            raise ValueError(
                f"{where}: {value!r} is not a .npy file; other formats need a Dataset of your "
                "own under custom/"
            )
        if not file.is_file():
            raise ValueError(f"{where}: {file} does not exist")
        return file
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise ValueError(f"{where}: expected a .npy file name, a number or a list, got {value!r}")
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected numbers, got {value!r}")
    return array


def _load(entry: Any) -> np.ndarray:
    if isinstance(entry, Path):
        return np.asarray(np.load(entry, allow_pickle=False))
    return np.asarray(entry)
