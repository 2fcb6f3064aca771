"""Where a site workspace keeps things: the one place that knows ``run_<N>/mmar_<site>``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError
from engine.fileio import atomic_write
from engine.training.config import is_bundle

__all__ = [
    "TOKEN_FILE",
    "SitePaths",
    "check_run_number",
    "find_deployed_mmar",
    "holds_mmar",
    "latest_run",
    "read_token_file",
    "write_token_file",
]


@dataclass(frozen=True)
class SitePaths:
    """Where a site workspace keeps things (DESIGN §5)."""

    root: Path

    @property
    def startup(self) -> Path:
        return self.root / "startup"

    @property
    def kit(self) -> Path:
        return self.startup / "fed_client.json"

    @property
    def transfer(self) -> Path:
        return self.root / "transfer"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run_dir(self, run_number: int) -> Path:
        return self.root / f"run_{run_number}"

    def mmar(self, run_number: int, site: str) -> Path:
        return self.run_dir(run_number) / f"mmar_{site}"

    def deployed_mmars(self, site: str = "") -> list[Path]:
        """Every deployed ``run_<N>/mmar_<site>`` (any site's where ``site`` is ""), sorted."""
        found = sorted(p for p in self.root.glob("run_*/mmar_*") if holds_mmar(p))
        return [p for p in found if p.name == f"mmar_{site}"] if site else found


def holds_mmar(folder: Path) -> bool:
    """Whether a folder holds a deployed MMAR: Clara's ``config/``, or a MONAI bundle's
    ``configs/train.json`` (a bundle deployed as it is)."""
    return (folder / "config").is_dir() or is_bundle(folder)


def check_run_number(value: Any, *, parse: bool = False) -> int:
    """The N of ``run_<N>``, checked: a whole number >= 1 (every caller checks it here).

    Args:
        value: the run number.
        parse: also take what ``int()`` reads (an admin message carries its headers as text);
            without it only an int is one (over the control socket JSON can carry "7" or true).

    Raises:
        ValueError: ``value`` is not a whole number >= 1; the text says so.
    """
    number = value
    if parse:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"the run number must be a whole number >= 1, got {value!r}")
    return number


def find_deployed_mmar(
    workspace: Path, site: str, run_number: int | None = None
) -> tuple[int, Path]:
    """The deployed MMAR to train: ``run_<N>/mmar_<site>``, the highest N unless one is given.

    Raises:
        ConfigError: there is no deployed MMAR (deploy one first).
    """
    paths = SitePaths(workspace)
    if run_number is not None:
        mmar = paths.mmar(run_number, site)
        if not holds_mmar(mmar):
            raise ConfigError(
                mmar, "", f"run {run_number} has no deployed MMAR for {site} (deploy first)"
            )
        return run_number, mmar
    number = latest_run(workspace, site)
    if number is None:
        raise ConfigError(
            workspace,
            "",
            f"no deployed MMAR (expected run_<N>/mmar_{site}/config/); deploy one first",
        )
    return number, paths.mmar(number, site)


def latest_run(workspace: Path, site: str) -> int | None:
    """The highest N with a deployed ``run_<N>/mmar_<site>/config``, or None."""
    numbers = [
        int(m.group(1))
        for p in Path(workspace).glob("run_*")
        if (m := re.fullmatch(r"run_([0-9]+)", p.name)) and holds_mmar(p / f"mmar_{site}")
    ]
    return max(numbers) if numbers else None


TOKEN_FILE = "client_token.txt"


def write_token_file(workspace: Path, info: dict[str, Any]) -> Path:
    """Writes the worker's start information, readable by the owner only (mkstemp's 0600)."""
    path = workspace / TOKEN_FILE
    text = json.dumps(info).encode()
    atomic_write(path, lambda f: f.write(text))
    return path


def read_token_file(workspace: Path) -> dict[str, Any]:
    """Reads what ``write_token_file`` wrote."""
    return dict(json.loads((workspace / TOKEN_FILE).read_text()))
