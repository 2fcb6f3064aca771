"""``fltui screenshot``: the dashboard of a workspace's running site service, as SVG and PNG.

``fltui screenshot [--workspace DIR] [--out FILE]`` attaches to the workspace's running site
service, draws the dashboard off-screen (nothing appears on the terminal) and saves it as SVG
and PNG (``fltui.pictures``), for a support ticket. The console's ``p`` key saves what is on
screen the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.site.lock import find_service
from fltui.bridge import RemoteBridge
from fltui.exits import EXIT_NO_SERVICE
from fltui.pictures import default_stem, write_screenshot

__all__ = ["main"]

DEFAULT_SIZE = (120, 40)


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
    from fltui.themes import load_themes  # deferred: textual; not for --help or a usage error

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
    from fltui.app import create_app  # deferred: textual; not for --help or a usage error
    from fltui.screens.dashboard import Dashboard  # deferred: textual, as above

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
