"""The reference server's cross-site validation store: best local models, deliveries, results."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.fileio import save_json_atomic, save_npz_atomic

__all__ = ["SERVER_OWNER", "CrossSiteStore"]

SERVER_OWNER = "server"
RESULTS_FILE = "cross_val_results.json"


class CrossSiteStore:
    """What cross-site validation gathers, guarded by the server's condition ``cond``.

    Args:
        workspace: the server's folder (``cross_site/<site>/best_model.npz``, the results file).
        cond: the server's condition: the store's dicts change under it, with the round state.
    """

    def __init__(self, workspace: Path, cond: threading.Condition) -> None:
        self.workspace = workspace
        self._cond = cond
        self.best_models: dict[str, dict[str, np.ndarray]] = {}
        self.results: dict[str, dict[str, dict[str, Any]]] = {}
        self._delivered: dict[str, set[str]] = {}
        # Owners each site has sent results for since its validation began (progress).
        self._validated: dict[str, list[str]] = {}

    def put_best(self, site: str, params: dict[str, np.ndarray]) -> None:
        """Keeps (and saves) a site's best local model; an empty one: it does not take part."""
        if params:
            save_npz_atomic(self.workspace / "cross_site" / site / "best_model.npz", params)
        with self._cond:
            self.best_models[site] = params
            # A site's validation begins with its best model: it gets every model again.
            self._delivered.pop(site, None)
            self._validated.pop(site, None)
            self._cond.notify_all()

    def due(
        self,
        site: str,
        finished: bool,
        global_model: dict[str, np.ndarray],
        registered: Iterable[str],
    ) -> tuple[set[str], list[str], dict[str, dict[str, np.ndarray]], bool]:
        """What ``site`` has not got yet (call with ``cond`` held).

        Returns its delivered set, the owners due, their models, and whether more will come.
        """
        delivered = self._delivered.setdefault(site, set())
        owners = [o for o in sorted(self.best_models) if o not in delivered and self.best_models[o]]
        models = {o: self.best_models[o] for o in owners}
        if finished and SERVER_OWNER not in delivered:
            owners.append(SERVER_OWNER)
            models[SERVER_OWNER] = global_model
        # More will come from registered sites that have not submitted their best model yet.
        more = any(s not in self.best_models for s in registered) or not finished
        return delivered, owners, models, more

    def delivered(self, delivered: set[str], owners: list[str]) -> None:
        """Records a stream that went through (after a broken one the site gets them again)."""
        with self._cond:
            delivered.update(owners)

    def add_results(self, site: str, results: Mapping[str, dict[str, Any]]) -> None:
        """Keeps ``site``'s metrics of the models it validated (owner -> metrics), and saves all."""
        with self._cond:
            mine = self.results.setdefault(site, {})
            mine.update(results)
            done = self._validated.setdefault(site, [])
            done.extend(o for o in results if o not in done)
            snapshot = {k: dict(v) for k, v in self.results.items()}
        save_json_atomic(self.workspace / RESULTS_FILE, snapshot)

    def reset(self, sites: list[str]) -> None:
        """These sites get every model again (an admin's ``validate``)."""
        with self._cond:
            for site in sites:
                self._delivered.pop(site, None)
                self._validated.pop(site, None)

    def progress(self, sites: Iterable[str], finished: bool) -> dict[str, dict[str, Any]]:
        """Per site: models received / expected, validated, and the one it validates now."""
        with self._cond:
            owners = sorted(o for o, m in self.best_models.items() if m)
            if finished:
                owners.append(SERVER_OWNER)
            out: dict[str, dict[str, Any]] = {}
            for site in sites:
                delivered = sorted(self._delivered.get(site, ()))
                validated = list(self._validated.get(site, ()))
                current = next((o for o in delivered if o not in validated), "")
                out[site] = {
                    "received": len(delivered),
                    "expected": max(len(owners), len(delivered)),
                    "validated": len(validated),
                    "current": current,
                }
            return out

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{data_site: {model_owner: metrics}}`` as received so far."""
        with self._cond:
            return {k: dict(v) for k, v in self.results.items()}
