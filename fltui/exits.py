"""The exit codes of ``fltui`` and its commands, in one table (3, refused, is the engine's).

0 done (the federation finished, or the service was asked to stop); 1 it failed or was aborted,
or a ``ctl`` action was refused; 2 bad usage or configuration; 3 refused by TLS or
authentication (``engine.tls.EXIT_REFUSED``); 4 the workspace already has a running service;
5 no site service runs for the workspace; 130 interrupted.
"""

from __future__ import annotations

__all__ = [
    "EXIT_BUSY",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_SERVICE",
    "EXIT_OK",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BUSY = 4
EXIT_NO_SERVICE = 5
EXIT_INTERRUPTED = 130
