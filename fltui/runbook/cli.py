"""``fltui runbook``: its arguments, and what it says when a scenario fails."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fltui.runbook.driving import generate
from fltui.runbook.harness import StepTimeout
from fltui.runbook.scenarios import SCENARIOS


def _only(text: str) -> list[int]:
    numbers = []
    for part in text.split(","):
        part = part.strip()
        match = next((s for s in SCENARIOS if part in (str(s.number), s.slug)), None)
        if match is None:
            names = ", ".join(f"{s.number} {s.slug}" for s in SCENARIOS)
            raise argparse.ArgumentTypeError(f"no scenario {part!r} (scenarios: {names})")
        numbers.append(match.number)
    return numbers


def main(argv: list[str]) -> int:
    """``fltui runbook``; returns the exit code (0 written, 1 a scenario failed, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="fltui runbook",
        description="Drive the console through the operator's scenarios against a demo "
        "federation on this machine and write screenshots (SVG, PNG) and Markdown pages.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    parser.add_argument(
        "--only",
        type=_only,
        default=None,
        metavar="N[,N...]",
        help="only these scenarios (numbers or names); the index is written with all of them",
    )
    parser.add_argument(
        "--simulate-gpus",
        type=int,
        default=0,
        metavar="N",
        help="show N SIMULATED GPUs (labelled so on screen) instead of this machine's",
    )
    parser.add_argument("--theme", default="dark", help="dark (default), light, high_contrast")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the scenarios' federation workspaces under DIR (for a look at their logs)",
    )
    args = parser.parse_args(argv)
    if args.simulate_gpus < 0:
        parser.error("--simulate-gpus must be 0 or more")
    from fltui.themes import load_themes  # deferred: textual; not for --help or a usage error

    if args.theme not in load_themes():
        parser.error(f"unknown theme {args.theme!r}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        pages = generate(
            args.out,
            only=args.only,
            simulate_gpus=args.simulate_gpus,
            theme=args.theme,
            keep=args.keep,
        )
    except StepTimeout as exc:
        print(f"fltui runbook: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"{len(pages)} pages under {args.out} in {time.monotonic() - started:.0f} s")
    return 0
