"""Loads ``themes/*.tcss`` (``$variable: value;`` lines) into Textual themes."""

from __future__ import annotations

import re
from pathlib import Path

from textual.theme import Theme

from themes import theme_files

__all__ = ["DEFAULT_THEME", "ThemeError", "load_theme", "load_themes", "theme_name"]

DEFAULT_THEME = "dark"
_FIELDS = {
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
}
_LINE = re.compile(r"^\s*\$([a-z][a-z0-9-]*)\s*:\s*([^;]+?)\s*;\s*$")


class ThemeError(ValueError):
    """A theme file that cannot be used (the text names the file and line)."""


def theme_name(stem: str) -> str:
    """The Textual theme name of a file stem ("dark" → "fltui-dark")."""
    return f"fltui-{stem.replace('_', '-')}"


def load_theme(path: Path) -> Theme:
    """Parses one theme file.

    Raises:
        ThemeError: a line that is not ``$name: value;``, or no ``$primary``.
    """
    text = re.sub(r"/\*.*?\*/", "", path.read_text(encoding="utf-8"), flags=re.S)
    fields: dict[str, str] = {}
    variables: dict[str, str] = {}
    dark = True
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ThemeError(f"{path}:{number}: expected '$name: value;', got {line.strip()!r}")
        name, value = m.groups()
        if name == "dark":
            dark = value.lower() == "true"
        elif name in _FIELDS:
            fields[name] = value
        else:
            variables[name] = value
    if "primary" not in fields:
        raise ThemeError(f"{path}: $primary is required")
    return Theme(name=theme_name(path.stem), dark=dark, variables=variables, **fields)  # type: ignore[arg-type]


def load_themes() -> dict[str, Theme]:
    """Every shipped theme, by file stem ("dark", "light", "high_contrast")."""
    return {stem: load_theme(path) for stem, path in theme_files().items()}
