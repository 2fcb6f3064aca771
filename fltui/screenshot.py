"""Screenshots of the console: SVG (Textual's own) and PNG (resvg), and ``fltui screenshot``.

``fltui screenshot [--workspace DIR] [--out FILE]`` attaches to the workspace's running site
service, draws the dashboard off-screen (nothing appears on the terminal) and saves it as SVG
and PNG, for a support ticket. The console's ``p`` key saves what is on screen the same way.

PNGs are rendered by resvg (the ``resvg-py`` wheel: a Rust renderer with no system library to
install). Text needs a monospace font on the machine; DejaVu Sans Mono (Debian's
``fonts-dejavu-core``) is asked for first, then the system's monospace default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "EXIT_NO_SERVICE",
    "MONOSPACE",
    "default_stem",
    "main",
    "svg_to_png",
    "write_screenshot",
]

EXIT_NO_SERVICE = 5  # as `fltui ctl`: no site service runs for the workspace
MONOSPACE = "DejaVu Sans Mono"
DEFAULT_SIZE = (120, 40)


def svg_to_png(svg: str) -> bytes:
    """Renders a Textual SVG screenshot as PNG bytes (same pixel size as the SVG's viewBox).

    Raises:
        ImportError: resvg-py is not installed.
        ValueError: the SVG cannot be rendered.
    """
    import resvg_py

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
    from engine.fileio import atomic_write  # deferred: numpy; the console imports this module

    def write(f: IO[bytes]) -> None:
        os.fchmod(f.fileno(), 0o644)  # a picture for a support ticket, not a secret
        f.write(data)

    atomic_write(path, write)


def default_stem(folder: Path, site: str, now: float | None = None) -> Path:
    """``folder/fltui-<site>-<YYYYmmdd-HHMMSS>`` (local time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return folder / f"fltui-{site or 'site'}-{stamp}"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 120x40, got {text!r}"
        ) from None
    if width < 40 or height < 12:
        raise argparse.ArgumentTypeError("the smallest size is 40x12")
    return width, height


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fltui screenshot",
        description="Save the dashboard of a workspace's running site service as SVG and PNG "
        "(for a support ticket). Nothing is drawn on this terminal.",
        epilog="Exit codes: 0 saved; 1 the service did not answer; 2 bad usage; "
        "5 no site service runs for the workspace.",
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        metavar="DIR",
        help="the site workspace (default $FLTUI_WORKSPACE, else .)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="where to save: FILE.svg and FILE.png (default: the workspace's screenshots/ "
        "folder, named after the site and the time)",
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help="terminal size to draw (default 120x40)",
    )
    parser.add_argument("--theme", default="dark", help="dark (default), light, high_contrast")
    parser.add_argument(
        "--wait",
        type=float,
        default=1.5,
        metavar="S",
        help="seconds to let the events after the snapshot arrive (default 1.5)",
    )
    return parser


def main(argv: list[str]) -> int:
    """``fltui screenshot``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.workspace is not None:
        workspace = Path(args.workspace)
    else:
        workspace = Path(os.environ.get("FLTUI_WORKSPACE") or Path.cwd())
    from engine.site.service import find_service
    from fltui.themes import load_themes

    if args.theme not in load_themes():
        print(f"fltui screenshot: unknown theme {args.theme!r}", file=sys.stderr)
        return 2
    info = find_service(workspace)
    if info is None:
        print(
            f"fltui screenshot: no site service runs for {workspace} (start one with "
            f"`fltui --no-ui --serve --workspace {workspace}`, or press p in its console)",
            file=sys.stderr,
        )
        return EXIT_NO_SERVICE
    return asyncio.run(_shoot(workspace, info.site, args))


async def _shoot(workspace: Path, site: str, args: argparse.Namespace) -> int:
    from fltui.app import create_app
    from fltui.bridge import RemoteBridge
    from fltui.screens.dashboard import Dashboard

    bridge = RemoteBridge(workspace, site)
    app = create_app(workspace, theme=args.theme, bridge=bridge, gpu_sampler=_NoSampler())
    outcome: dict[str, Any] = {"code": 1, "message": "the console did not start"}

    async def shoot(pilot: Any) -> None:
        deadline = time.monotonic() + 15
        while not bridge.ready.is_set() and time.monotonic() < deadline:
            if bridge.label == "service gone":
                break
            await pilot.pause(0.1)
        if not bridge.ready.is_set():
            outcome["message"] = f"could not attach to the site service of {workspace}"
            app.exit()
            return
        await pilot.pause(args.wait)  # the snapshot, then the events since
        screen = app.screen
        if isinstance(screen, Dashboard):
            screen.pump(force=True)
        await pilot.pause(0.3)
        svg = app.export_screenshot(title=f"fltui · {site}")
        stem = (
            args.out.with_suffix("") if args.out else default_stem(workspace / "screenshots", site)
        )
        svg_path, png_path, problem = write_screenshot(svg, stem)
        lines = [f"saved {svg_path}"] + ([f"saved {png_path}"] if png_path else [])
        if problem:
            lines.append(problem)
        outcome.update(code=0, message="\n".join(lines))
        app.exit()

    await app.run_async(headless=True, size=args.size, auto_pilot=shoot)
    stream = sys.stdout if outcome["code"] == 0 else sys.stderr
    prefix = "" if outcome["code"] == 0 else "fltui screenshot: "
    print(prefix + outcome["message"], file=stream)
    return int(outcome["code"])


class _NoSampler:
    """The console attached to a service samples no GPU itself (the service does)."""

    def start(self, bus: object, site: str) -> None:
        pass

    def stop(self) -> None:
        pass
