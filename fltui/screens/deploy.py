"""DeployScreen: pick an MMAR from transfer/ (or type a path) and the run number."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList

__all__ = ["DeployScreen"]


class DeployScreen(ModalScreen[tuple[str, int] | None]):
    """Dismisses with ``(mmar name or path, run number)``, or None."""

    DEFAULT_CSS = """
    DeployScreen { align: center middle; }
    DeployScreen > Vertical {
        width: 70; height: auto; max-height: 90%; border: thick $primary; background: $surface;
        padding: 1 2;
    }
    DeployScreen OptionList { height: auto; max-height: 10; }
    DeployScreen #error { color: $error; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, mmars: list[str], run_number: int) -> None:
        super().__init__()
        self.mmars = mmars
        self.run_number = run_number

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Deploy an MMAR from transfer/ (or type a folder path below)")
            yield OptionList(*self.mmars, id="mmars")
            yield Input(placeholder="MMAR name or /path/to/mmar", id="path")
            yield Label("Run number")
            yield Input(str(self.run_number), id="run", type="integer")
            yield Label("", id="error")
            yield Button("Deploy (Enter)", variant="primary", id="deploy")

    def on_mount(self) -> None:
        if self.mmars:
            self.query_one("#path", Input).value = self.mmars[0]
            self.query_one("#mmars", OptionList).focus()
        else:
            self.query_one("#path", Input).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#path", Input).value = str(event.option.prompt)
        self.query_one("#run", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._done()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._done()

    def _done(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        run = self.query_one("#run", Input).value.strip()
        error = self.query_one("#error", Label)
        if not path:
            error.update("choose an MMAR")
            return
        if not run.isdigit() or int(run) < 1:
            error.update("the run number must be a whole number >= 1")
            return
        self.dismiss((path, int(run)))

    def action_cancel(self) -> None:
        self.dismiss(None)
