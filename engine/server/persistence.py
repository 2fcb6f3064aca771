"""The reference server's files: ``state.json``, the global model, and resuming from them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import he
from engine.config import ConfigError, ServerConfig
from engine.fileio import (
    load_npz,
    read_npz_meta,
    remove_stale_temps,
    save_json_atomic,
    save_npz_atomic,
)
from engine.server.aggregator import non_finite_variables

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "Resumable",
    "check_same_shapes",
    "load_saved_model",
    "read_resumable",
    "remove_stale_writes",
    "save_model",
    "state_document",
    "write_state",
]

log = logging.getLogger("engine.server")

STATE_FILE = "state.json"
MODEL_FILE = "models/global_model.npz"


@dataclass
class Resumable:
    """An unfinished federation saved in a workspace, as far as it can be resumed."""

    model: dict[str, np.ndarray] | None  # None: the initial model's round
    model_round: int
    history: list[dict[str, Any]]  # the rounds up to ``model_round``
    sites: list[str]  # the sites registered when it was saved
    detail: str  # what is resumed, in words


def remove_stale_writes(workspace: Path) -> None:
    """Removes the temp files of writes killed mid-write (a crash); nobody else writes these."""
    for name in (STATE_FILE, MODEL_FILE):
        for tmp in remove_stale_temps(workspace / name):
            log.info("removed %s, left by a write that did not finish", tmp)


def state_document(
    config: ServerConfig,
    current_round: int,
    sites: Iterable[str],
    history: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """The content of ``state.json``: the round, the history (with contribution ids), the sites."""
    return {
        "task": config.task_name,
        "current_round": current_round,
        "num_rounds": config.num_rounds,
        "finished": current_round >= config.num_rounds,
        "sites": sorted(sites),
        "history": [dict(h) for h in history],
    }


def write_state(workspace: Path, state: Mapping[str, Any]) -> None:
    """Writes ``state.json`` atomically."""
    save_json_atomic(workspace / STATE_FILE, state)


def save_model(
    workspace: Path, model: Mapping[str, np.ndarray], task: str, current_round: int
) -> None:
    """Writes the global model of ``current_round`` atomically (the round in its file).

    A model holding ciphertexts (homomorphic encryption) is marked so in the file's meta: its
    ciphertexts load back as ciphertexts, not as the uint8 arrays an ``.npz`` keeps.
    """
    meta: dict[str, Any] = {"task": task, "round": current_round}
    if any(he.is_ciphertext(v) for v in model.values()):
        meta["he"] = he.CKKS
    save_npz_atomic(workspace / MODEL_FILE, model, meta=meta)


def _load_model(path: Path) -> dict[str, np.ndarray]:
    model = load_npz(path)
    return he.mark_ciphertexts(model) if read_npz_meta(path).get("he") == he.CKKS else model


def load_saved_model(workspace: Path) -> dict[str, np.ndarray] | None:
    """The last saved global model of a server workspace, if any (ciphertexts as such)."""
    path = Path(workspace) / MODEL_FILE
    return _load_model(path) if path.exists() else None


def read_resumable(
    workspace: Path, config: ServerConfig, ours: Mapping[str, np.ndarray]
) -> Resumable | None:
    """The workspace's saved state, if it holds an unfinished federation of ``config``'s task.

    The model file says which round it belongs to (its zip comment); the state may be one
    round ahead of it (a crash between the two writes), never behind. The round restored is
    the model's; history beyond it is dropped, so its contributions are taken again.

    Raises:
        ConfigError: the saved state cannot be resumed (unreadable, another task, another
            model's shapes, a model that is not finite, files not of one federation).
    """
    state_path = workspace / STATE_FILE
    model_path = workspace / MODEL_FILE
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        saved_round = int(state["current_round"])
        history = [dict(h) for h in state.get("history", [])]
        task = str(state.get("task", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            state_path,
            "",
            f"unreadable saved state ({exc}); move it away to start a new federation",
        ) from exc
    if task != config.task_name:
        raise ConfigError(
            state_path,
            "task",
            f"this workspace holds the state of task {task!r}, not "
            f"{config.task_name!r}: use another workspace, or move state.json away",
        )
    if bool(state.get("finished")) or saved_round >= config.num_rounds:
        log.info(
            "the federation saved in %s finished (%d rounds): starting a new one",
            workspace,
            saved_round,
        )
        return None
    model_round = config.start_round
    model: dict[str, np.ndarray] | None = None
    if model_path.exists():
        try:
            meta = read_npz_meta(model_path)
            model = _load_model(model_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                model_path, "", f"unreadable saved global model ({exc}); move it away"
            ) from exc
        # A model saved before the round was written into its file: trust the state.
        model_round = int(meta.get("round", saved_round))
    detail = []
    if model is None or model_round <= config.start_round:
        model, model_round = None, config.start_round  # the initial model's round
    else:
        check_same_shapes(ours, model, model_path)
        bad = non_finite_variables(model)
        if bad:
            raise ConfigError(
                model_path,
                "",
                f"the saved global model holds NaN or Inf in {', '.join(bad)} (saved by a "
                "server that did not check); move it away, or put a good model there",
            )
    if model_round > saved_round:
        raise ConfigError(
            model_path,
            "",
            f"the saved model is of round {model_round} but state.json of round "
            f"{saved_round}: these files are not of one federation; move them away",
        )
    if model_round < saved_round:
        detail.append(
            f"round {saved_round} was saved only in part; round {model_round + 1} is "
            "trained again from its saved model"
        )
    kept = [h for h in history if int(h.get("round", 0)) <= model_round]
    sites = sorted(str(s) for s in state.get("sites", []))
    detail.insert(0, f"{len(kept)} round{'s' if len(kept) != 1 else ''} done")
    return Resumable(model, model_round, kept, sites, "; ".join(detail))


def check_same_shapes(
    ours: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray], path: Path
) -> None:
    """Refuses a saved model whose variables, dtypes or shapes are not those of ``ours``
    (a ciphertext counts as the dtype and shape of the plaintext it holds)."""

    def spec(v: Any) -> tuple[str, tuple[int, ...]]:
        if he.is_ciphertext(v):
            try:
                dtype, shape, _ = he.plain_spec(v)
            except he.HEError:
                return ("ckks?", ())
            return (np.dtype(dtype).str, shape)
        return (np.asarray(v).dtype.str, tuple(np.shape(v)))

    mine = {k: spec(v) for k, v in ours.items()}
    saved = {k: spec(v) for k, v in model.items()}
    if mine != saved:
        differ = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        raise ConfigError(
            path,
            "",
            f"the saved global model is not of this federation's model (variables differ: "
            f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); move it away to "
            "start a new federation",
        )
