"""PercentileProtocol: share only the largest-magnitude part of Δ, clipped (Shokri & Shmatikov)."""

from __future__ import annotations

from typing import Any

from engine.privacy._checks import check_number, total_steps
from engine.privacy.base import PrivacyProtocol

__all__ = ["PercentileProtocol"]


class PercentileProtocol(PrivacyProtocol):
    """Zeroes the small entries of the update and clips the rest ("largest percentile to share").

    Clara 3.1 ``PercentileProtocol`` / NVFlare ``PercentilePrivacy``, from Shokri & Shmatikov,
    CCS'15. With T = ``train_ctx["total_steps"]`` (1 when absent):

    1. d = Δ / T for every variable, so the update does not depend on the number of local steps;
    2. cutoff = ``np.percentile(|d| over all variables, percentile)``: one global threshold
       (numpy's default linear interpolation, reproduced exactly);
    3. d = 0 where |d| < cutoff, then d = clip(d, -gamma, gamma), and the result is d · T.
       A 0-d variable passes through unchanged.

    About (100 - percentile) % of the entries stay non-zero (|d| >= cutoff, ties included), each
    within ±gamma·T. No noise is added, so nothing here is random.

    The inputs stay where they are: numpy arrays give numpy arrays, torch tensors give torch
    tensors on the same device (a GPU model is filtered on the GPU), each with its dtype
    (computed in float32, or float64 for float64 input). Integer variables pass through as
    copies. The caller's arrays are not modified, unless ``apply(..., in_place=True)`` asks
    for the result in them (the same values, no model-sized allocation). The cutoff is an exact
    order statistic found with a sampled bracket, a counting pass and a selection inside the
    bracket, not a sort; work buffers are kept on the instance across rounds, so an instance is
    not for concurrent use.

    Args:
        percentile: the percentile of |d| under which entries are zeroed, in [0, 100].
        gamma: the clipping bound, > 0 (Clara skipped the filter for gamma <= 0; here a config
            that wants no privacy says ``"privacy": {}``).

    Raises:
        PrivacyArgumentError: an argument outside its range (a ``ValueError`` whose ``arg``
            names it, so the config error names ``client.privacy.args.<arg>``).
    """

    def __init__(self, percentile: float = 10, gamma: float = 0.01) -> None:
        self.percentile = check_number("percentile", percentile, low=0, high=100)
        self.gamma = check_number("gamma", gamma, low=0, low_open=True)
        self._workspace: Any = None  # engine.privacy._ops.Workspace, made on first use

    def apply(
        self, model_diff: dict[str, Any], train_ctx: Any = None, *, in_place: bool = False
    ) -> dict[str, Any]:
        """The filtered update.

        Args:
            model_diff: Δ = local − global, variable name to numpy array or torch tensor.
            train_ctx: a mapping (or object) with ``total_steps``, the local steps T; None
                (the default, as in the lineage) for T = 1.
            in_place: write the result into ``model_diff``'s own arrays (the caller gives
                their memory up: no model-sized result is allocated) and return them; integer
                and bool variables pass through as they are. The result is bit for bit the
                one a new Δ gets (False, the default: the input is left as it is). An array
                that cannot be written (read-only, non-contiguous, byte-swapped) or that
                shares memory with another variable gets a new result instead.

        Returns:
            variable name to array, the same names, types, shapes, dtypes and devices.

        Raises:
            NonFiniteDiffError: a variable holds NaN or Inf (named in the error).
        """
        from engine.privacy import _ops  # deferred: torch loads on first use, not with the config

        if self._workspace is None:
            self._workspace = _ops.Workspace()
        return _ops.percentile(
            model_diff,
            percentile=self.percentile,
            gamma=self.gamma,
            steps=total_steps(train_ctx),
            workspace=self._workspace,
            in_place=in_place,
        )

    def __repr__(self) -> str:
        return f"PercentileProtocol(percentile={self.percentile:g}, gamma={self.gamma:g})"
