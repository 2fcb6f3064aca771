"""The console's actions on a site (deploy, train, abort, ...) and the checks on their arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.site.lock import ActionError

__all__ = ["SiteActions"]


class SiteActions:
    """The console's actions on a site, for the in-console engine and the control socket alike.

    Args:
        site_root: the site workspace (its ``transfer/`` holds MMARs to deploy).
        interface: returns the live ClientAdminInterface (it changes when the engine restarts),
            or None while the engine is starting.
        site: returns the site's name.
    """

    def __init__(
        self,
        site_root: Path,
        interface: Callable[[], Any],
        site: Callable[[], str],
    ) -> None:
        self.site_root = Path(site_root)
        self._interface = interface
        self._site = site

    @property
    def interface(self) -> Any:
        found = self._interface()
        if found is None:
            raise ActionError("the site engine is still starting; try again in a moment")
        return found

    def _local(self, topic: str, action: Any, *args: Any) -> str:
        from engine.site.admin_interface import AdminError  # deferred: numpy, protobuf

        try:
            return str(self.interface.local(topic, action, *args))
        except AdminError as exc:
            raise ActionError(str(exc)) from None

    def transfer_mmars(self) -> list[str]:
        from engine.site.paths import holds_mmar  # deferred: numpy; the console's start path

        folder = self.site_root / "transfer"
        return sorted(p.name for p in folder.glob("*") if holds_mmar(p))

    def latest_run(self) -> int | None:
        from engine.site.paths import latest_run  # deferred: numpy; the console's start path

        return latest_run(self.site_root, self._site())

    def deploy(self, mmar: str, run_number: int) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic  # deferred: protobuf
        from engine.site.deploy import make_mmar_zip  # deferred: numpy
        from engine.site.paths import holds_mmar  # deferred: with the deploy code above

        if not isinstance(mmar, str) or not mmar:
            raise ActionError("deploy needs an MMAR: a name in transfer/ or a path")
        _check_run(run_number)
        path = Path(mmar)
        folder = path if path.is_absolute() else self.site_root / "transfer" / mmar
        if not holds_mmar(folder):
            why = f"{folder} is not an MMAR (no config/ folder, nor a bundle's configs/)"
            found = self._interface()
            if found is not None:  # a wrong path is an audit line and a Requests row too
                found.record("local", Topic.DEPLOY, "error", why)
            raise ActionError(why)
        interface = self.interface

        def deploy() -> str:
            request = Message(
                Topic.DEPLOY,
                make_mmar_zip(folder),
                {MsgHeader.RUN_NUMBER: str(run_number), MsgHeader.APP_NAME: folder.name},
            )
            return str(interface.deploy_mmar(request))

        return self._local(Topic.DEPLOY, deploy)

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        _check_run(run_number)
        _whole("GPU count", gpus)
        if gpus > 1:
            return self._local(Topic.START_MGPU, self.interface.start_mgpu_client, run_number, gpus)
        return self._local(Topic.START, self.interface.start_client, run_number)

    def abort(self) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        return self._local(Topic.ABORT, self.interface.abort_client)

    def restart(self) -> str:
        from engine.admin_defs import Topic  # deferred: protobuf; the console's start path

        return self._local(Topic.RESTART, self.interface.restart_client)

    def validate(self) -> str:
        from engine.admin_defs import Message, MsgHeader, Topic  # deferred: protobuf

        request = Message(Topic.VALIDATE, "", {MsgHeader.USER_NAME: "local"})
        return self._local(Topic.VALIDATE, self.interface.do_validate, request)


def _check_run(value: Any) -> None:
    """Refuses what is not a run number (over the socket, JSON can carry anything)."""
    from engine.site.paths import check_run_number  # deferred: numpy; the console's start path

    try:
        check_run_number(value)
    except ValueError as exc:
        raise ActionError(str(exc)) from None


def _whole(name: str, value: Any) -> None:
    """Refuses what is not a whole number >= 1 (over the socket, JSON can carry anything)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ActionError(f"the {name} must be a whole number of 1 or more, not {value!r}")
