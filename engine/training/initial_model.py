"""Writes an MMAR's initial model as .npz (``python -m`` keeps torch out of the caller)."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.fileio import save_npz_atomic
from engine.training import build_fitter

__all__ = ["write_initial_model"]


def write_initial_model(mmar: Path, out: Path) -> None:
    """Builds the MMAR's model (seeded) and saves its weights to ``out`` atomically."""
    fitter = build_fitter(mmar, site_name="server")
    save_npz_atomic(out, fitter.get_weights())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m engine.training.initial_model MMAR OUT.npz")
    write_initial_model(Path(sys.argv[1]), Path(sys.argv[2]))
