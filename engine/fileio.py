"""Atomic file writes (temp file + fsync + rename) for models, state and results."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "load_npz", "save_json_atomic", "save_npz_atomic", "tail_text"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Writes ``path`` through ``write(fileobj)``: readers see the old file or the new, never half.

    The temp file lives in the same folder (rename is atomic only within a file system) and is
    removed when ``write`` fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def save_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(text))


def save_npz_atomic(path: Path, params: Mapping[str, np.ndarray]) -> None:
    """Writes named arrays as an uncompressed ``.npz``, atomically."""

    def write(f: IO[bytes]) -> None:
        # Our own zip writing: np.savez(**params) breaks on a variable named "file".
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in params.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Reads named arrays written by ``save_npz_atomic`` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def tail_text(path: Path, lines: int, what: str) -> str:
    """The last ``lines`` lines of a log file joined by " | " (for an error message), or why not.

    Args:
        path: the file.
        lines: how many lines.
        what: what the file is, for the "(no ...)" and "(... empty)" answers.
    """
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no {what})"
    return " | ".join(text[-lines:]) or f"({what} empty)"
