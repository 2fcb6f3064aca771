"""DeployScreen: pick an MMAR from transfer/ (or type a path) and the run number; one Enter
deploys, and a refusal (a wrong path, a bad MMAR) stays in the dialog to be corrected."""

from __future__ import annotations

from collections.abc import Callable

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList

from fltui.bridge import BridgeError

__all__ = ["DeployScreen"]


class DeployScreen(ModalScreen[str | None]):
    """Deploys with ``deploy(mmar name or path, run number)``; dismisses with its reply, or None.

    Enter on an MMAR of the list, in either field or on the button deploys at once (the run
    number is filled in: the next free one). The dialog stays open while the site deploys and,
    where it refuses, shows why in red under the fields: the operator corrects the path there,
    and the same line is in the console's notices.
    """

    DEFAULT_CSS = """
    DeployScreen { align: center middle; }
    DeployScreen > Vertical {
        width: 70; max-width: 100%; height: auto; max-height: 100%; border: thick $primary;
        background: $surface; padding: 0 1;
    }
    DeployScreen OptionList { height: auto; max-height: 8; }
    DeployScreen #error { color: $error; text-style: bold; }
    DeployScreen #error.busy { color: $foreground; text-style: none; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(
        self,
        mmars: list[str],
        run_number: int,
        deploy: Callable[[str, int], str],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.mmars = mmars
        self.run_number = run_number
        self.deploy = deploy
        self.on_error = on_error
        self.busy = False
        self.error = ""

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

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.query_one("#path", Input).value = str(event.option.prompt)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#path", Input).value = str(event.option.prompt)
        self._done()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._done()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._done()

    def _say(self, text: str, busy: bool = False) -> None:
        label = self.query_one("#error", Label)
        label.update(Content(text))  # Content: a path or a reply is never markup
        label.set_class(busy, "busy")

    def _done(self) -> None:
        if self.busy:  # a second Enter while the site deploys changes nothing
            return
        path = self.query_one("#path", Input).value.strip()
        run = self.query_one("#run", Input).value.strip()
        if not path:
            self._say("choose an MMAR")
            return
        if not run.isdigit() or int(run) < 1:
            self._say("the run number must be a whole number >= 1")
            return
        self.busy = True
        self._say(f"deploying {path} as run {run}…", busy=True)
        self._deploy(path, int(run))

    @work(thread=True, exclusive=True, group="deploy")
    def _deploy(self, path: str, run: int) -> None:
        try:
            reply = self.deploy(path, run)
        except BridgeError as exc:
            self.app.call_from_thread(self._refused, str(exc))
        except Exception as exc:  # the dialog stays up; the operator sees what broke
            self.app.call_from_thread(self._refused, f"{type(exc).__name__}: {exc}")
        else:
            self.app.call_from_thread(self.dismiss, reply)

    def _refused(self, why: str) -> None:
        self.busy = False
        self.error = why
        self._say(f"not deployed: {why}")
        if self.on_error is not None:
            self.on_error(why)

    def action_cancel(self) -> None:
        self.dismiss(None)
