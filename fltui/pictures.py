"""Screenshot files: Textual's SVG as it is and as PNG (resvg), saved atomically, and their names.

PNGs are rendered by resvg (the ``resvg-py`` wheel: a Rust renderer with no system library to
install). Text needs a monospace font on the machine; DejaVu Sans Mono (Debian's
``fonts-dejavu-core``) is asked for first, then the system's monospace default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO

__all__ = ["MONOSPACE", "default_stem", "svg_to_png", "write_screenshot"]

MONOSPACE = "DejaVu Sans Mono"


def svg_to_png(svg: str) -> bytes:
    """Renders a Textual SVG screenshot as PNG bytes (same pixel size as the SVG's viewBox).

    Raises:
        ImportError: resvg-py is not installed.
        ValueError: the SVG cannot be rendered.
    """
    import resvg_py  # deferred: an optional wheel; without it the SVG is saved alone

    # Textual's SVG asks for "Fira Code, monospace" (a web font it cannot fetch offline): the
    # generic family is mapped to a font that has the box-drawing and block characters.
    data = resvg_py.svg_to_bytes(
        svg_string=svg,
        font_family=MONOSPACE,
        monospace_family=MONOSPACE,
        sans_serif_family="DejaVu Sans",
    )
    return bytes(data)


def write_screenshot(svg: str, stem: Path) -> tuple[Path, Path | None, str]:
    """Writes ``stem.svg`` and ``stem.png``; returns both paths and a problem ("" if none).

    The SVG is always written; a PNG that cannot be rendered (resvg-py missing) is reported, not
    raised, so that the picture is never lost.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    svg_path = stem.with_suffix(".svg")
    _write_atomic(svg_path, svg.encode("utf-8"))
    try:
        png = svg_to_png(svg)
    except ImportError:
        return svg_path, None, "no PNG: install resvg-py (pip install resvg-py)"
    except ValueError as exc:
        return svg_path, None, f"no PNG: {exc}"
    png_path = stem.with_suffix(".png")
    _write_atomic(png_path, png)
    return svg_path, png_path, ""


def _write_atomic(path: Path, data: bytes) -> None:
    from engine.fileio import atomic_write  # deferred: numpy; the dashboard imports this module

    def write(f: IO[bytes]) -> None:
        os.fchmod(f.fileno(), 0o644)  # a picture for a support ticket, not a secret
        f.write(data)

    atomic_write(path, write)


def default_stem(folder: Path, site: str, now: float | None = None) -> Path:
    """``folder/fltui-<site>-<YYYYmmdd-HHMMSS>`` (local time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return folder / f"fltui-{site or 'site'}-{stamp}"
