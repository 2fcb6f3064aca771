"""``set_text``: update a Static only when its text changed, re-laying out only when it must."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

__all__ = ["set_text"]


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
