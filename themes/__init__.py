"""fltui's colour themes: one ``.tcss`` file of ``$variable: value;`` lines per theme."""

from __future__ import annotations

from pathlib import Path

__all__ = ["THEME_DIR", "theme_files"]

THEME_DIR = Path(__file__).resolve().parent


def theme_files() -> dict[str, Path]:
    """Theme name (the file's stem) to its file."""
    return {p.stem: p for p in sorted(THEME_DIR.glob("*.tcss"))}
