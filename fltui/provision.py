"""``fltui provision --project project.json --out DIR``: certificates and startup kits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import ConfigError
from fltui.exits import EXIT_CONFIG, EXIT_OK

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fltui provision",
        description=(
            "Make a federation's certificate authority, the server's kit (certificate with its "
            "host names) and a startup kit for each site and admin (see README: Secure "
            "federation)."
        ),
    )
    parser.add_argument(
        "--project", type=Path, required=True, metavar="FILE", help="the project.json"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="a new or empty folder for the kits"
    )
    return parser


def main(argv: list[str]) -> int:
    """Runs the command; returns the exit code (0 done, 2 bad project file or output folder)."""
    args = build_parser().parse_args(argv)
    from engine.provision import describe, load_project, provision  # deferred: gRPC, X.509

    try:
        project = load_project(args.project)
        result = provision(project, args.out)
    except ConfigError as exc:
        print(f"fltui provision: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(describe(result, project))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
