"""Exceptions of the training package; free of torch so callers can catch them cheaply."""

from __future__ import annotations

from pathlib import Path

from engine.config import ConfigError

__all__ = ["TrainConfigError", "TrainingAborted"]


class TrainConfigError(ConfigError):
    """A training config (``config_train.json``) or one of its components is unusable.

    The message names the file, the dotted key and what was expected, so an operator can fix
    the MMAR without reading a traceback.

    Attributes:
        file: The config file at fault.
        key: Dotted path of the offending key (e.g. ``optimizer.args.lr``), or ``None`` when the
            whole file is at fault (missing, not JSON).
        problem: What is wrong and what is expected.
    """

    def __init__(self, file: str | Path, key: str | None, problem: str) -> None:
        # A ConfigError too, so one ``except ConfigError`` handles every config file.
        super().__init__(file, key or "", problem)
        self.file = Path(file)
        self.key = key  # type: ignore[assignment]


class TrainingAborted(RuntimeError):
    """``Fitter.train()`` stopped early because ``Fitter.abort()`` was called."""
