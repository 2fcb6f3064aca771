"""SiteHeader: site, server, TLS, connection, token age, last heartbeat and its round trip; how
sure the console is of each (the service's and the server's ages: stale dimmed, lost in the error
colour)."""

from __future__ import annotations

import time

from textual.widgets import Static

from engine.site.state import SiteState
from fltui.widgets._text import set_text

__all__ = ["SiteHeader", "ago"]


def ago(seconds: float | None) -> str:
    """'3 s', '4 min', '2 h' (or '—')."""
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SiteHeader(Static):
    """The top of the dashboard: one line where it fits, else the site on one and where the
    engine runs (``label``) on a second."""

    DEFAULT_CSS = """
    SiteHeader { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    SiteHeader.-stale { text-style: dim; }
    SiteHeader.-bad { background: $error 30%; text-style: bold; }
    """

    def refresh_from(
        self, state: SiteState, label: str = "fltui", now: float | None = None
    ) -> None:
        self._last = (state, label, now)
        now = time.time() if now is None else now
        conn = state.connection
        hb = (
            f"heartbeat {ago(now - state.last_heartbeat)} ago ({state.heartbeat_rtt_ms:.1f} ms)"
            if state.last_heartbeat is not None and state.heartbeat_rtt_ms is not None
            else "heartbeat —"
        )
        service, service_age = state.service_freshness(now)
        # The server is judged only through a live service (its heartbeats come that way).
        server, server_age = state.server_freshness(now) if service == "fresh" else ("", None)
        if server == "stale":
            hb = f"heartbeat {ago(server_age)} ago, unanswered"
        elif server == "lost":
            hb = f"server lost: no heartbeat answered for {ago(server_age)}"
        if service == "stale":
            label = f"{label} · last heard {ago(service_age)} ago"
        elif service == "lost":  # what the server said is as old as the service's last word
            label = f"service lost {ago(service_age)} ago — state unknown"
            hb = "heartbeat unknown"
            conn = f"{conn}?"  # the service's last word on the server: not vouched for now
        parts = [
            state.site or "site ?",
            f"server {state.server or '?'}",
            f"TLS {'on' if state.tls else 'off'}",
            conn,
            f"token {ago(state.token_age(now))}",
            hb,
        ]
        line = " │ ".join([label, *parts])
        width = self.size.width - 2  # padding 0 1 (0 before the first layout: two lines)
        if len(line) <= width:
            text, height = line, 1
        else:  # a narrow terminal: the connection on one line, its health and the engine below
            second = [*parts[4:], label] if service == "fresh" else [label, *parts[4:]]
            text, height = " │ ".join(parts[:4]) + "\n" + " │ ".join(second), 2
        if self.styles.height is None or self.styles.height.value != height:
            self.styles.height = height
        set_text(self, text)
        bad = state.connection in ("failed", "retrying", "disconnected") or "lost" in (
            service,
            server,
        )
        self.set_class(bad, "-bad")
        self.set_class(not bad and "stale" in (service, server), "-stale")

    def on_resize(self) -> None:
        last = getattr(self, "_last", None)
        if last is not None:
            self.refresh_from(*last)
