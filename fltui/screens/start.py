"""StartScreen: the run number to train and, where there are several GPUs, how many to use."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

__all__ = ["StartScreen"]


class StartScreen(ModalScreen[tuple[int, int] | None]):
    """Dismisses with ``(run number, gpus)``, or None."""

    DEFAULT_CSS = """
    StartScreen { align: center middle; }
    StartScreen > Vertical {
        width: 60; height: auto; border: thick $success; background: $surface; padding: 1 2;
    }
    StartScreen #error { color: $error; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, run_number: int | None, gpu_count: int) -> None:
        super().__init__()
        self.run_number = run_number
        self.gpu_count = gpu_count

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Start training: run number")
            yield Input(str(self.run_number or ""), id="run", type="integer")
            if self.gpu_count > 1:
                yield Label(f"GPUs to use (1–{self.gpu_count})")
                yield Input("1", id="gpus", type="integer")
            yield Label("", id="error")
            yield Button("Start (Enter)", variant="success", id="start")

    def on_mount(self) -> None:
        self.query_one("#run", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._done()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._done()

    def _done(self) -> None:
        run = self.query_one("#run", Input).value.strip()
        error = self.query_one("#error", Label)
        if not run.isdigit() or int(run) < 1:
            error.update("the run number must be a whole number >= 1")
            return
        gpus = 1
        if self.gpu_count > 1:
            text = self.query_one("#gpus", Input).value.strip()
            if not text.isdigit() or not 1 <= int(text) <= self.gpu_count:
                error.update(f"GPUs must be between 1 and {self.gpu_count}")
                return
            gpus = int(text)
        self.dismiss((int(run), gpus))

    def action_cancel(self) -> None:
        self.dismiss(None)
