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

__all__ = [
    "atomic_write",
    "load_npz",
    "read_npz_meta",
    "remove_stale_temps",
    "save_json_atomic",
    "save_npz_atomic",
    "tail_text",
]

_TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Writes ``path`` through ``write(fileobj)``: readers see the old file or the new, never half.

    The temp file lives in the same folder (rename is atomic only within a file system) and is
    removed when ``write`` fails. A writer killed mid-write (SIGKILL, power loss) leaves the
    previous ``path`` untouched and at most a ``.<name>.*.tmp`` file beside it, which
    ``remove_stale_temps`` clears. The folder is synced after the rename, so the new name
    survives a crash of the machine too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Removes the temp files that killed writers of ``path`` left behind; returns them.

    Only call this while no other process writes ``path``: a live writer's temp file would go.
    """
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*{_TEMP_SUFFIX}"):
        with _suppress():
            tmp.unlink()
            removed.append(tmp)
    return removed


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def save_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(text))


def save_npz_atomic(
    path: Path, params: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> None:
    """Writes named arrays as an uncompressed ``.npz``, atomically.

    Args:
        path: the file.
        params: the arrays.
        meta: small JSON-ready facts about the arrays (a round number), kept in the zip comment:
            they travel with the arrays in the same atomic write, and ``np.load`` ignores them.
    """
    comment = json.dumps(dict(meta), sort_keys=True).encode() if meta else b""
    if len(comment) > 0xFFFF:
        raise ValueError(f"npz meta is {len(comment)} bytes; a zip comment holds at most 65535")

    def write(f: IO[bytes]) -> None:
        # Our own zip writing: np.savez(**params) breaks on a variable named "file".
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.comment = comment
            for name, value in params.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Reads named arrays written by ``save_npz_atomic`` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def read_npz_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` that ``save_npz_atomic`` stored with the arrays ({} when there is none).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not a zip, or its comment is not a JSON object.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            comment = zf.comment
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not an npz file ({exc})") from exc
    if not comment:
        return {}
    try:
        meta = json.loads(comment)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable meta in the zip comment ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the meta in the zip comment is not a JSON object")
    return meta


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
