"""GpuPanel: per-GPU utilisation with history, memory, temperature, power and our processes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.scalar import Scalar
from textual.events import Resize
from textual.markup import escape
from textual.widgets import Static

from engine.events import GpuSampled
from engine.gpu import (
    HISTORY_LEN,
    REASON_DRIVER_NOT_LOADED,
    REASON_NO_DRIVER,
    REASON_NO_GPU,
    REASON_NO_LIBRARY,
    REASON_NO_PERMISSION,
    REASON_VERSION_MISMATCH,
    GpuInfo,
    GpuProcess,
)

__all__ = ["GpuPanel", "hint_for", "spark_text"]

_BARS = " ▁▂▃▄▅▆▇█"
_NA = "[$text-muted]N/A[/]"

_HINTS = {
    REASON_NO_LIBRARY: "Install nvidia-ml-py to see GPUs here. Training and everything else work.",
    REASON_NO_DRIVER: "Install the NVIDIA driver (nvidia-smi should work), or train on the CPU.",
    REASON_NO_GPU: "nvidia-smi lists no GPU here; training runs on the CPU.",
    REASON_DRIVER_NOT_LOADED: "Load the NVIDIA kernel module (nvidia-smi should work).",
    REASON_VERSION_MISMATCH: "The driver was upgraded: reload it or reboot the machine.",
    REASON_NO_PERMISSION: "Run as a user who may open /dev/nvidia*, or ask the admin.",
}


def hint_for(reason: str) -> str:
    """What an operator can do about a missing GPU panel, for a sampler's ``reason``."""
    if reason in _HINTS:
        return _HINTS[reason]
    return "The sampler retries NVML every 30 s; training and everything else still work."


def spark_text(values: list[float | None], width: int) -> str:
    """The last ``width`` utilisation values as bars on a fixed 0–100 % scale.

    A fixed scale (not Textual's min–max Sparkline) keeps a steady 98 % looking full, not noisy.
    Missing readings are blanks; the line is right-aligned so the newest sample is at the end.
    """
    if width <= 0:
        return ""
    top = len(_BARS) - 1
    cells = []
    for value in values[-width:]:
        if value is None:
            cells.append(" ")
        else:
            level = round(max(0.0, min(100.0, float(value))) / 100 * top)
            cells.append(_BARS[max(1, level)])  # a thin bar even at 0 % shows a reading exists
    return "".join(cells).rjust(width)


def _gib(nbytes: int | None) -> str:
    return _NA if nbytes is None else f"{nbytes / 2**30:.1f}"


def _total(procs: list[GpuProcess]) -> int | None:
    """Memory of ``procs`` together; None when NVML gave none of it."""
    known = [p.used_memory for p in procs if p.used_memory is not None]
    return sum(known) if known else None


def _short_name(name: str) -> str:
    return name.removeprefix("NVIDIA ").removeprefix("Tesla ")


@dataclass
class _Block:
    """The widgets of one GPU (plain references: the panel reuses them every sample)."""

    box: Vertical
    head: Static
    util: Static
    spark: Static
    stats: Static
    procs: Static
    history: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    uuid: str = ""
    shown: dict[int, str] = field(default_factory=dict)

    def set(self, widget: Static, text: str) -> None:
        """Updates ``widget`` only when its text changed (no redraw for equal readings)."""
        if self.shown.get(id(widget)) != text:
            self.shown[id(widget)] = text
            widget.update(text)


class GpuPanel(VerticalScroll):
    """The GPUs of this site, fed with ``update_sample(GpuSampled)``.

    Two lines per GPU in a small terminal (name, utilisation with history; memory,
    temperature, power and our processes in short), three where there is room (our processes
    on a line of their own). Without GPUs it says why and what to do. Child widgets are built
    once per GPU index and updated in place.
    """

    can_focus = False

    DEFAULT_CSS = """
    GpuPanel {
        border: round $primary;
        border-title-color: $primary;
        height: auto;
        max-height: 100%;
        padding: 0 1;
        scrollbar-size-vertical: 1;
    }
    GpuPanel.-simulated { border: round $warning; border-title-color: $warning; }
    GpuPanel #gpu-message { height: auto; }
    GpuPanel .gpu-block { height: auto; }
    GpuPanel.-roomy .gpu-block { margin-bottom: 1; }
    GpuPanel.-roomy .gpu-block:last-of-type { margin-bottom: 0; }
    GpuPanel .gpu-row { height: 1; }
    GpuPanel .gpu-head {
        width: auto; max-width: 60%; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis;
    }
    GpuPanel .gpu-util { width: 6; text-align: right; }
    GpuPanel .gpu-spark { width: 1fr; height: 1; margin-left: 1; color: $accent; }
    GpuPanel .gpu-stats, GpuPanel .gpu-procs {
        height: 1; text-wrap: nowrap; text-overflow: ellipsis;
    }
    GpuPanel .gpu-procs { color: $text-muted; }
    GpuPanel.-compact .gpu-procs { display: none; }
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._event: GpuSampled | None = None
        self._blocks: dict[int, _Block] = {}
        self._message = Static("Waiting for the first GPU sample…", id="gpu-message")
        self._message_text = ""
        self._title = ""

    # -- public API ----------------------------------------------------------------------

    @property
    def blocks(self) -> dict[int, Vertical]:
        """The container widget of each GPU block, by GPU index (for tests and runbooks)."""
        return {index: block.box for index, block in self._blocks.items()}

    def history(self, index: int) -> list[float | None]:
        """The utilisation history the panel holds for GPU ``index``."""
        block = self._blocks.get(index)
        return list(block.history) if block else []

    def update_sample(self, event: GpuSampled) -> None:
        """Shows a new sample; only the texts that changed are redrawn.

        Args:
            event: the latest GpuSampled (real or SIMULATED).
        """
        fresh = self._event is None or self._event.ts != event.ts  # the same sample twice
        self._event = event
        gpus = [GpuInfo.from_dict(g) for g in event.gpus] if event.available else []
        for gpu in gpus:
            block = self._block(gpu)
            if fresh:
                block.history.append(gpu.utilization)
        if self.is_mounted:
            self._apply()

    # -- Textual hooks -------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield self._message

    def on_mount(self) -> None:
        self._set_title(simulated=False)
        self._apply()

    def on_resize(self, event: Resize) -> None:
        self._apply()
        # the sparklines' widths are known only after the children are laid out again
        self.call_after_refresh(self._draw_sparks)

    # -- internals -----------------------------------------------------------------------

    def _block(self, gpu: GpuInfo) -> _Block:
        block = self._blocks.get(gpu.index)
        if block is not None:
            if gpu.uuid and block.uuid and gpu.uuid != block.uuid:
                block.history.clear()  # another device took this index: its past is not ours
            block.uuid = gpu.uuid or block.uuid
            return block
        head, util = Static(classes="gpu-head"), Static(classes="gpu-util")
        spark = Static(classes="gpu-spark")
        stats, procs = Static(classes="gpu-stats"), Static(classes="gpu-procs")
        box = Vertical(
            Horizontal(head, util, spark, classes="gpu-row"),
            stats,
            procs,
            classes="gpu-block",
            id=f"gpu-{gpu.index}",
        )
        block = _Block(box, head, util, spark, stats, procs, uuid=gpu.uuid)
        self._blocks[gpu.index] = block
        return block

    def _set_title(self, simulated: bool) -> None:
        title = "GPUs · SIMULATED" if simulated else "GPUs"
        if title != self._title:
            self._title = title
            self.border_title = title
            self.set_class(simulated, "-simulated")

    def _set_message(self, text: str) -> None:
        if text != self._message_text:
            self._message_text = text
            self._message.update(text)
        self._message.display = bool(text)

    def _compact(self, count: int) -> bool:
        # A panel of auto height grows to fit, so ask whether the terminal is small; a panel
        # given a height by the layout is compact when three lines per GPU do not fit.
        height = self.styles.height
        if height is None or height.is_auto:
            return self.app.size.height < 32
        return self.size.height < 3 * count

    def _apply(self) -> None:
        event = self._event
        if event is None:
            return
        self._set_title(event.simulated)
        gpus = [GpuInfo.from_dict(g) for g in event.gpus] if event.available else []
        if not gpus:
            label = "SIMULATED: " if event.simulated else ""
            reason = event.reason or "unknown reason"
            self._set_message(
                f"[b $warning]{label}No GPU:[/] {escape(reason)}\n"
                f"[$text-muted]{escape(hint_for(reason))}[/]"
            )
        else:
            self._set_message("")
        compact = self._compact(len(gpus))
        self.set_class(compact, "-compact")
        self.set_class(not compact and bool(gpus), "-roomy")
        seen = set()
        mounted = False
        # one name width for all GPUs, so that the utilisation columns line up
        name_width = max((len(self._head_text(g)) for g in gpus), default=0)
        for gpu in gpus:
            seen.add(gpu.index)
            block = self._block(gpu)
            if block.box.parent is None:
                self.mount(block.box)
                mounted = True
            block.box.display = True
            if block.head.styles.width != Scalar.parse(str(name_width)):
                block.head.styles.width = name_width
            self._fill(block, gpu, compact)
        for index, block in list(self._blocks.items()):
            if index in seen:
                continue
            if gpus:  # this GPU is gone from a live feed: drop its widgets
                del self._blocks[index]
                if block.box.parent is not None:
                    block.box.remove()
            else:  # no GPU now (NVML hiccup?): keep the widgets for when they come back
                block.box.display = False
        self._draw_sparks()
        if mounted:  # new sparklines have a width only once laid out
            self.call_after_refresh(self._draw_sparks)

    def _fill(self, block: _Block, gpu: GpuInfo, compact: bool) -> None:
        block.set(block.head, escape(self._head_text(gpu)))
        util = gpu.utilization
        block.set(block.util, _NA if util is None else f"{util:.0f}%")
        block.set(block.stats, self._stats_text(gpu, compact))
        block.set(block.procs, self._procs_text(gpu))

    @staticmethod
    def _head_text(gpu: GpuInfo) -> str:
        return f"{gpu.index} {_short_name(gpu.name)}"

    def _stats_text(self, gpu: GpuInfo, compact: bool) -> str:
        memory = f"{_gib(gpu.memory_used)}/{_gib(gpu.memory_total)} GiB"
        if not compact:  # a narrow panel drops the words that the numbers make obvious
            memory = f"mem {memory}"
        fraction = gpu.memory_fraction
        if fraction is not None and not compact:
            memory += f" ({fraction:.0%})"
        if fraction is not None and fraction >= 0.9:
            memory = f"[$warning]{memory}[/]"
        if gpu.temperature is None:
            temp = _NA
        else:
            style = (
                "$error" if gpu.temperature >= 90 else "$warning" if gpu.temperature >= 80 else ""
            )
            temp = f"{gpu.temperature:.0f}°C"
            temp = f"[{style}]{temp}[/]" if style else temp
        if gpu.power is None:
            power = _NA
        else:
            limit = "" if gpu.power_limit is None else f"/{gpu.power_limit:.0f}"
            power = f"{gpu.power:.0f}{limit} W"
        sep = " " if compact else "  "
        text = f"{memory}{sep}{temp}{sep}{power}"
        if compact:
            ours = [p for p in gpu.processes if p.ours]
            if ours:
                text += f" [$text-muted]· ours {_gib(_total(ours))} GiB[/]"
        return text

    def _procs_text(self, gpu: GpuInfo) -> str:
        ours = [p for p in gpu.processes if p.ours]
        others = [p for p in gpu.processes if not p.ours]
        if ours:
            text = "ours: " + ", ".join(
                f"pid {p.pid} ({_gib(p.used_memory)} GiB)"
                if p.used_memory is not None
                else f"pid {p.pid}"
                for p in ours
            )
        else:
            text = "no process of ours"
        if others:
            text += f" · others: {len(others)} ({_gib(_total(others))} GiB)"
        return text

    def _draw_sparks(self) -> None:
        for block in self._blocks.values():
            width = block.spark.size.width
            if width > 0:
                block.set(block.spark, spark_text(list(block.history), width))
