"""The torch trainer ("fitter") built from an MMAR's config_train.json, and the demo MMAR."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import load_environment, local_environment_file
from engine.training.clara_config import ClaraConfig
from engine.training.config import is_bundle, load_train_config
from engine.training.errors import TrainConfigError, TrainingAborted

if TYPE_CHECKING:
    from engine.config.mmar import ScriptSpec
    from engine.training.fitter import EpochCallback, Fitter, ProgressCallback

__all__ = [
    "Fitter",
    "TrainConfigError",
    "TrainingAborted",
    "build_fitter",
    "demo_mmar_path",
    "is_bundle",
]


def demo_mmar_path() -> Path:
    """The folder of the bundled demo MMAR (shipped inside the package).

    Deploy a copy before training: the fitter writes ``models/best_model.pt`` into its MMAR.
    """
    return Path(__file__).resolve().parent / "demo_mmar"


def build_fitter(
    mmar_root: str | Path,
    *,
    site_name: str,
    local_epochs: int | None = None,
    steps_aggregation: int = 0,
    on_progress: ProgressCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    device: str | None = None,
    script: ScriptSpec | None = None,
    round_info: Callable[[], tuple[int, int]] | None = None,
    ranks: int = 1,
) -> Fitter:
    """Build the fitter for an MMAR from its ``config/config_train.json``.

    torch is imported here, on first use, so that importing this package stays cheap.

    Args:
        mmar_root: The (deployed) MMAR folder. ``custom/`` in it goes on ``sys.path``; the best
            model is saved to ``best_model.pt`` in its ``MMAR_CKPT_DIR`` (``models/``), and
            ``config/environment.json`` fills the config's ``{NAME}`` placeholders.
        site_name: This site's name (passed to components that take a ``context``).
        local_epochs: Epochs per round, overriding the config's ``epochs``.
        steps_aggregation: When > 0, each round takes exactly this many optimizer steps instead
            of whole epochs.
        on_progress: Called with ``(step, total_steps, epoch, loss)`` at most ~10 times a
            second, and always on a round's last step; ``loss`` is the mean training loss of
            the current epoch so far.
        on_epoch_end: Called with ``(epoch, metrics)`` after each epoch of a round, e.g.
            ``{"train_loss": 0.61, "train_accuracy": 0.78}``.
        device: A torch device; default ``"cuda"`` when available, else ``"cpu"``.
        script: ``config_fed_client.json``'s ``script`` (and its args and timeout): the MMAR
            trains with the research team's own script through ``fltui.client`` instead
            (``engine.training.script``; ``device`` is then the script's to choose).
        round_info: For a script: gives ``(current_round, total_rounds)`` of the federation.
        ranks: For a script: how many ranks it runs as (``torchrun`` semantics).

    Returns:
        The fitter, with a freshly initialised model (seeded from the config's ``seed``).

    Raises:
        TrainConfigError: The config or one of its components is unusable.
        ValueError: An argument is out of range, or the device is unavailable.
    """
    from engine.training import fitter  # deferred: torch; `import engine.training` must not load it

    root = Path(mmar_root).resolve()
    if script is not None:
        from engine.training import script as script_form  # deferred: only for the script form

        return script_form.build_script_trainer(  # type: ignore[return-value]
            root,
            script,
            site_name=site_name,
            local_epochs=local_epochs,
            steps_aggregation=steps_aggregation,
            on_progress=on_progress,
            on_epoch_end=on_epoch_end,
            round_info=round_info,
            ranks=ranks,
        )
    if is_bundle(root):
        from engine.training import bundle  # deferred: MONAI, only for bundles

        return bundle.build_bundle_trainer(  # type: ignore[return-value]
            root,
            site_name=site_name,
            local_epochs=local_epochs,
            steps_aggregation=steps_aggregation,
            on_progress=on_progress,
            on_epoch_end=on_epoch_end,
            device=device,
        )
    config = load_train_config(root)
    if isinstance(config, ClaraConfig):
        from engine.training import clara_monai  # deferred: MONAI, only for this form

        fitter.check_round_args(site_name, local_epochs, steps_aggregation)

        environment = config.environment or load_environment(root, local_environment_file(root))
        return clara_monai.build_clara_trainer(  # type: ignore[return-value]
            config,
            site_name=site_name,
            local_epochs=local_epochs,
            steps_aggregation=steps_aggregation,
            on_progress=on_progress,
            on_epoch_end=on_epoch_end,
            device=fitter.pick_device(device),
            ckpt_dir=environment.ckpt_dir,
            eval_dir=environment.eval_dir,
        )
    return fitter.build_fitter(
        mmar_root,
        site_name=site_name,
        local_epochs=local_epochs,
        steps_aggregation=steps_aggregation,
        on_progress=on_progress,
        on_epoch_end=on_epoch_end,
        device=device,
        config=config,
    )


def __getattr__(name: str) -> Any:
    # Fitter is importable from here for type hints and isinstance checks, without making
    # `import engine.training` pay for torch.
    if name == "Fitter":
        from engine.training.fitter import Fitter  # deferred: torch, on first use of the name

        return Fitter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
