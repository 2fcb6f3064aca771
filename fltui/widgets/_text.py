"""Text helpers of the panels: ``set_text`` (update a Static only when its text changed),
``elide``/``summary_line`` (one line that keeps what matters), ``wrap_line`` (a log line to a
width) and ``show_whole`` (the whole of an outcome in a popup, for Enter)."""

from __future__ import annotations

from textual.app import App
from textual.content import Content
from textual.widgets import Static

from fltui.screens.detail import DetailScreen

__all__ = ["ELLIPSIS", "elide", "set_text", "show_whole", "summary_line", "wrap_line"]

ELLIPSIS = "…"


def set_text(widget: Static, text: str) -> bool:
    """Shows ``text`` in ``widget``; returns whether anything changed.

    An unchanged text costs nothing; a change of the same number of lines repaints the widget
    without a layout pass of the whole screen (Textual's default for ``update``).
    """
    old = getattr(widget, "_fltui_text", None)
    if old == text:
        return False
    same_height = old is not None and old.count("\n") == text.count("\n")
    # Content, not a str: text from the federation or a log is never read as markup.
    widget.update(Content(text), layout=not same_height)
    widget._fltui_text = text  # type: ignore[attr-defined]
    return True


def elide(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, its end replaced by an ellipsis when cut."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return text[: width - 1] + ELLIPSIS if width > 1 else ELLIPSIS


def summary_line(text: str, width: int | None = None) -> str:
    """The line of a (possibly long, multi-line) outcome that says what happened.

    A Python traceback is summarised by its last line (the exception and its message), anything
    else by its first non-empty line; with ``width``, elided to it. A panel shows this line and
    offers the whole with ``show_whole`` (Enter), so a 14-line error never pushes the other
    panels off an 80x24 screen.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    if any(x.startswith("Traceback (most recent call last)") for x in lines):
        line = lines[-1]
    return elide(line, width) if width is not None else line


def wrap_line(line: str, width: int, indent: int = 2) -> list[str]:
    """``line`` cut into rows of at most ``width`` cells; rows after the first are indented.

    A log line is never cut off at the panel's edge: what does not fit goes on the next rows.
    """
    if width <= indent + 4 or len(line) <= width:
        return [line]

    def cut(text: str, room: int) -> int:
        # after the last space of the row where it leaves the row at least half full
        if len(text) <= room:
            return len(text)
        space = text.rfind(" ", 0, room)
        return space + 1 if space >= room // 2 else room

    n = cut(line, width)
    rows, rest = [line[:n]], line[n:]
    while rest:
        n = cut(rest, width - indent)
        rows.append(" " * indent + rest[:n])
        rest = rest[n:]
    return rows


def show_whole(app: App[object], title: str, text: str) -> None:
    """Opens the whole of ``text`` (an outcome, an error with its traceback) in a popup.

    For a panel that shows ``summary_line(text)``: bind ``enter`` (and make the panel
    focusable) to an action that calls this.
    """
    app.push_screen(DetailScreen(title, text))
