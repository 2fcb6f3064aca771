"""A site's last validation, written where an operator looks for it: every training form (the
torch fitter, Clara's MONAI form, bundles, scripts) writes the same file, the same way. No torch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from engine.fileio import save_json_atomic

__all__ = ["EVAL_METRICS", "higher_is_better", "save_validation_metrics"]

log = logging.getLogger(__name__)

# Loss-like metric names: a lower value is better.
_LOWER_IS_BETTER = re.compile(r"loss|error|distance|hausdorff|mse|mae|rmse", re.IGNORECASE)

#: The metrics of the last validation, in ``MMAR_EVAL_OUTPUT_PATH`` (default ``eval/``).
EVAL_METRICS = "validation_metrics.json"


def save_validation_metrics(
    eval_dir: Path,
    *,
    site: str,
    metric: str,
    metrics: Mapping[str, float],
    best_metric: float | None,
    local_rounds: int,
) -> None:
    """Writes ``<eval_dir>/validation_metrics.json``; a write that fails is logged (training
    goes on: the operator sees why the file is stale), not raised."""
    target = eval_dir / EVAL_METRICS
    try:
        save_json_atomic(
            target,
            {
                "site": site,
                "metric": metric,
                "metrics": dict(metrics),
                "best_metric": best_metric,
                "local_rounds": local_rounds,
            },
        )
    except OSError as exc:
        log.warning("could not write the validation metrics to %s: %s", target, exc)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of a metric named so is better (Dice, accuracy, AUC): not for
    loss-like names (loss, error, distance, Hausdorff, MSE, MAE, RMSE)."""
    return not _LOWER_IS_BETTER.search(metric)
