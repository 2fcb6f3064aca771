"""Processes: whether one is alive, and the one watch on a parent that may die (even by SIGKILL)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

__all__ = ["parent_gone", "pid_alive", "watch_parent"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parent_gone(parent: int) -> bool:
    """Whether ``parent``, the process that started this one, has died (even by SIGKILL).

    Re-parenting says so at once; a pid that no longer exists says so too.
    """
    return os.getppid() != parent or not pid_alive(parent)


def watch_parent(
    parent: int, on_gone: Callable[[], None], period: float = 1.0, name: str = "parent-watch"
) -> threading.Thread:
    """Calls ``on_gone`` (in a daemon thread) once process ``parent`` is gone.

    A training worker whose site service died, or a demo whose console died, must not go on
    alone holding a GPU or a port.
    """

    def watch() -> None:
        while not parent_gone(parent):
            time.sleep(period)
        on_gone()

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread
