"""Entry point: ``python -m fltui`` and the ``fltui`` console script."""

from __future__ import annotations

import sys

from fltui.cli import main as _main


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
