"""The Round panel plots the metric the MMAR's config chose, whatever its name."""

from __future__ import annotations

from engine.events import RoundCompleted
from engine.site.state import SiteState
from fltui.widgets.round_panel import _metric_name


def _state(*events: RoundCompleted) -> SiteState:
    state = SiteState()
    for event in events:
        state.apply(event)
    return state


def test_the_key_metric_of_the_config_is_plotted() -> None:
    # "mean_loss" sorts first and "accuracy" is absent: only key_metric can pick Dice
    rounds = [
        RoundCompleted(
            site="site-1",
            round=r,
            num_rounds=3,
            metrics={"mean_loss": 0.5 / r, "val_mean_dice": 0.3 * r},
            key_metric="val_mean_dice",
        )
        for r in (1, 2, 3)
    ]
    state = _state(*rounds)
    assert state.key_metric == "val_mean_dice"
    assert _metric_name(state) == "val_mean_dice"
    # it survives the trip to a console (the service's snapshot)
    assert _metric_name(SiteState.from_dict(state.to_dict())) == "val_mean_dice"


def test_without_a_key_metric_accuracy_is_still_preferred() -> None:
    state = _state(
        RoundCompleted(site="s", round=1, num_rounds=1, metrics={"loss": 1.0, "accuracy": 0.5})
    )
    assert _metric_name(state) == "accuracy"
