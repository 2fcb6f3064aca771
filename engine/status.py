"""ClientStatus: the training status of a site, with the Clara 3.1 messages."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ClientStatus", "get_status_message"]


class ClientStatus:
    """Status codes and messages of the Clara 3.1 lineage (plus cross-site validation)."""

    TRAINING_NOT_STARTED = 0
    TRAINING_STARTING = 1
    TRAINING_STARTED = 2
    TRAINING_STOPPED = 3
    TRAINING_EXCEPTION = 4
    CROSS_SITE_VALIDATION = 5

    status_messages: ClassVar[dict[int, str]] = {
        TRAINING_NOT_STARTED: "training not started",
        TRAINING_STARTING: "training starting",
        TRAINING_STARTED: "training started",
        TRAINING_STOPPED: "training stopped",
        TRAINING_EXCEPTION: "training exception",
        CROSS_SITE_VALIDATION: "cross site validation",
    }

    @classmethod
    def get_status_message(cls, status: int) -> str:
        """The message of a status code, for display ("unknown status N" for others).

        The module-level ``get_status_message`` is the lineage's lookup (None when unknown).
        """
        return cls.status_messages.get(status, f"unknown status {status}")


def get_status_message(status: int) -> str | None:
    """The message of a status code, or None for a code that is not one (as in the lineage's
    ``client_status`` module, where code written for Clara looks it up)."""
    return ClientStatus.status_messages.get(status)
