"""Argument checks and errors of the privacy protocols (no torch: loading a config stays light)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

__all__ = [
    "NonFiniteDiffError",
    "PrivacyArgumentError",
    "check_int",
    "check_number",
    "check_seed",
    "total_steps",
]


class PrivacyArgumentError(ValueError):
    """A protocol argument outside its allowed range.

    Attributes:
        arg: the argument's name; the config error then names ``client.privacy.args.<arg>``.
    """

    def __init__(self, arg: str, message: str) -> None:
        super().__init__(message)
        self.arg = arg


class NonFiniteDiffError(ValueError):
    """A model difference holding NaN or Inf: it is refused, not shared.

    Attributes:
        name: the variable that holds the non-finite value.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"variable {name!r} of the model difference holds NaN or Inf; the update is not shared"
        )
        self.name = name


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{left}{lo}, {hi}{right}"


def check_number(
    arg: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, if it is a finite real number inside the interval.

    Raises:
        PrivacyArgumentError: not a number, not finite, or outside the interval; the message
            states the allowed range and the value given.
    """
    interval = _interval(low, high, low_open, high_open)
    problem = f"{arg} must be a finite number in {interval}, got {value!r}"
    # bool is an int to Python, but ``"gamma": true`` in a config is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PrivacyArgumentError(arg, problem)
    x = float(value)
    if not math.isfinite(x):
        raise PrivacyArgumentError(arg, problem)
    if low is not None and (x < low or (low_open and x == low)):
        raise PrivacyArgumentError(arg, problem)
    if high is not None and (x > high or (high_open and x == high)):
        raise PrivacyArgumentError(arg, problem)
    return x


def check_int(arg: str, value: Any, *, low: int) -> int:
    """``value`` if it is an integer >= ``low``.

    Raises:
        PrivacyArgumentError: otherwise, naming the range and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PrivacyArgumentError(arg, f"{arg} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_seed(value: Any) -> int | None:
    """A seed: None (fresh entropy every time the protocol is built) or an integer in [0, 2**63).

    Raises:
        PrivacyArgumentError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise PrivacyArgumentError(
            "seed", f"seed must be null or an integer in [0, 2**63), got {value!r}"
        )
    return int(value)


def total_steps(train_ctx: Any) -> float:
    """T, the local steps of the round, from ``train_ctx["total_steps"]`` (a mapping) or
    ``train_ctx.total_steps``; 1 when absent, None, or not positive (dividing by zero local steps
    means nothing, and NVFlare's default is 1)."""
    if isinstance(train_ctx, Mapping):
        value = train_ctx.get("total_steps")
    else:
        value = getattr(train_ctx, "total_steps", None)
    if isinstance(value, bool) or not isinstance(value, Real):
        return 1.0
    t = float(value)
    return t if math.isfinite(t) and t > 0 else 1.0
