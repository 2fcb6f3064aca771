"""The control socket's wire format: the protocol version, the longest line, the actions.

One JSON object per line, UTF-8:

    service → client  {"type": "hello", "protocol": 1, "pid": …, "site": …, "mode": …, …}
                      {"type": "snapshot", "state": {…SiteState.to_dict()…}}
                      {"type": "event", "event": {…Event.to_dict()…}}
                      {"type": "reply", "id": N, "ok": true|false, "result": …, "error": "…"}
                      {"type": "refused", "error": "…"}      (then the connection closes)
    client → service  {"op": "action", "id": N, "name": "abort", "args": [...]}
"""

from __future__ import annotations

__all__ = ["ACTIONS", "MAX_LINE", "PROTOCOL"]

PROTOCOL = 1
MAX_LINE = 1 << 20  # a request line longer than this is refused
# What a client may ask; each maps to a SiteActions method (status/shutdown are the server's own).
ACTIONS = (
    "transfer_mmars",
    "latest_run",
    "deploy",
    "start_training",
    "abort",
    "restart",
    "validate",
    "status",
    "shutdown",
)
