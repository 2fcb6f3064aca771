"""What a restarted server makes of its saved files, and how a site shows that it recovered."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError, ServerConfig
from engine.events import ContributionResent, ServerResumed, SessionRenewed
from engine.fileio import save_json_atomic, save_npz_atomic
from engine.server import FederatedServer
from engine.site.state import SiteState
from fltui.headless import HeadlessPrinter

TASK = "resume_test"


def _config(**kw: object) -> ServerConfig:
    return ServerConfig(task_name=TASK, target="127.0.0.1:0", num_rounds=5, **kw)  # type: ignore[arg-type]


def _initial() -> dict[str, np.ndarray]:
    return {"w": np.zeros(4, np.float32), "n": np.array(0, np.int64)}


def _saved(ws: Path, state_round: int, model_round: int | None, **state: object) -> None:
    history = [
        {
            "round": r,
            "contributors": ["a", "b"],
            "missing": [],
            "contributions": {"a": f"a-{r}", "b": f"b-{r}"},
        }
        for r in range(1, state_round + 1)
    ]
    save_json_atomic(
        ws / "state.json",
        {
            "task": TASK,
            "current_round": state_round,
            "num_rounds": 5,
            "finished": False,
            "sites": ["a", "b"],
            "history": history,
            **state,
        },
    )
    if model_round is not None:
        model = {"w": np.full(4, model_round, np.float32), "n": np.array(model_round, np.int64)}
        save_npz_atomic(
            ws / "models" / "global_model.npz", model, meta={"task": TASK, "round": model_round}
        )


def test_resumes_at_the_saved_round_with_its_model_history_and_ids(tmp_path: Path) -> None:
    _saved(tmp_path, 2, 2)
    server = FederatedServer(_config(), tmp_path, _initial())
    assert server.current_round == 2 and [h["round"] for h in server.history] == [1, 2]
    np.testing.assert_array_equal(server.global_model["w"], np.full(4, 2, np.float32))
    assert server.resumed is not None and server.resumed["sites"] == ["a", "b"]
    # a retried upload of a round aggregated before the restart is still known
    assert {"a-1", "b-2"} <= server._seen_ids


def test_state_saved_ahead_of_the_model_goes_back_to_the_model_round(tmp_path: Path) -> None:
    # killed between the two writes of round 3: state says 3, the model is round 2's
    _saved(tmp_path, 3, 2)
    server = FederatedServer(_config(), tmp_path, _initial())
    assert server.current_round == 2 and [h["round"] for h in server.history] == [1, 2]
    assert "b-3" not in server._seen_ids  # round 3's contributions are taken again
    assert server.resumed is not None and "saved only in part" in server.resumed["detail"]


def test_killed_before_the_first_model_save_resumes_from_the_initial_model(
    tmp_path: Path,
) -> None:
    _saved(tmp_path, 1, None)
    server = FederatedServer(_config(), tmp_path, _initial())
    assert server.current_round == 0 and server.history == []
    np.testing.assert_array_equal(server.global_model["w"], _initial()["w"])


def test_a_finished_federation_starts_afresh(tmp_path: Path) -> None:
    _saved(tmp_path, 5, 5, finished=True)
    server = FederatedServer(_config(), tmp_path, _initial())
    assert server.current_round == 0 and server.resumed is None and server.history == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda ws: _saved(ws, 1, 1, task="other"), "holds the state of task 'other'"),
        (
            lambda ws: save_npz_atomic(
                ws / "models" / "global_model.npz",
                {"w": np.zeros(9, np.float32), "n": np.array(0, np.int64)},
                meta={"round": 1},
            ),
            "variables differ: w",
        ),
        (lambda ws: (ws / "state.json").write_text("{not json"), "unreadable saved state"),
        (lambda ws: _saved(ws, 1, 3), "not of one federation"),
    ],
)
def test_saved_state_that_cannot_be_resumed_is_refused_by_name(
    tmp_path: Path, change: object, words: str
) -> None:
    _saved(tmp_path, 1, 1)
    change(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=words):
        FederatedServer(_config(), tmp_path, _initial())


def test_the_console_state_and_no_ui_lines_say_what_was_recovered() -> None:
    state = SiteState(site="site-1", connection="retrying")
    renewed = SessionRenewed(site="site-1", server="127.0.0.1:9", reason="server restarted")
    assert state.apply(renewed) == {"header", "client"}
    assert state.connection == "registered again" and state.session_renewals == 1
    assert "registered again" in state.recovery
    resent = ContributionResent(site="site-1", round=3, contribution_id="c-3")
    assert state.apply(resent) == {"round"}
    assert "round 3 contribution sent again" in state.recovery
    # a console attaching later gets it in the snapshot, and `fltui ctl status` shows it
    again = SiteState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again.session_renewals == 1 and again.recovery == state.recovery
    assert state.snapshot()["recovery"] == state.recovery

    out = io.StringIO()
    printer = HeadlessPrinter(stream=out)
    for event in (
        renewed,
        resent,
        ServerResumed(site="server", round=3, num_rounds=5, sites=["site-1"]),
    ):
        printer(event)
    text = out.getvalue()
    assert "session lost (server restarted); registered again with 127.0.0.1:9" in text
    assert "round 3 contribution sent again" in text
    assert "server resumed from its saved state at round 3/5" in text
