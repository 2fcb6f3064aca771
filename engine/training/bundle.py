"""MONAI bundles: an MMAR that carries ``configs/train.json`` trains through MONAI's FL client.

A MONAI bundle (``configs/train.json`` with ``network_def``, ``train#trainer``,
``validate#evaluator``, ...) is the maintained successor of Clara's PyTorch MMAR form. MONAI's
own federated-learning adapter, ``monai.fl.client.MonaiAlgo``, parses and initialises it (two
workflows: the bundle's trainer, and a second parse for the evaluator, so validation never
touches the model being trained), loads weights into the trainer and runs its rounds.
:class:`BundleTrainer` wraps it in the interface the federated client uses on the torch fitter
(:class:`engine.training.fitter.Fitter`): numpy weights in ``state_dict`` order, one round per
:meth:`~BundleTrainer.train`, :meth:`~BundleTrainer.validate` with the bundle's key metric, the
best local model, a thread-safe abort and progress callbacks.

What is driven here rather than through MonaiAlgo: the round's length when
``steps_aggregation`` counts iterations (MonaiAlgo counts epochs; an ignite handler ends the
run after exactly that many), the abort (MonaiAlgo's ``abort`` *interrupts* the ignite engines,
which pauses them for the next ``run`` to resume and leaves an idle engine's next run
interrupted; here a flag ends the run and :meth:`~BundleTrainer.train` raises
``TrainingAborted``), and the weights (read straight from the network's ``state_dict``, one copy;
``MonaiAlgo.get_weights`` copies twice on a GPU).

Bundle configs are code: ``"$..."`` strings are Python expressions MONAI evaluates. Every one of
them is shown to the site policy's gate (``engine.components.check_expression``) before MONAI
reads the bundle.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine.components
from engine.config import load_environment, local_environment_file
from engine.config.environment import MMAREnvironment
from engine.training.clara_config import require_monai
from engine.training.config import is_bundle
from engine.training.errors import TrainConfigError, TrainingAborted
from engine.training.evaluation import higher_is_better, save_validation_metrics
from engine.training.fitter import (
    EpochCallback,
    ProgressCallback,
    check_round_args,
    pick_device,
)
from engine.training.weights import (
    BestModel,
    TrainerFacts,
    checked_tensors,
    load_weights,
    to_numpy,
)

__all__ = [
    "BundleTrainer",
    "build_bundle_trainer",
    "bundle_config_files",
    "bundle_problems",
    "initial_bundle_weights",
    "is_bundle",
]

log = logging.getLogger(__name__)

#: Where a bundle keeps its configs, relative to its root (MONAI's layout).
CONFIGS = Path("configs")
_SUFFIXES = (".json", ".yaml", ".yml")
# Progress callbacks drive a UI; more than ~10 updates a second are invisible and cost time.
_PROGRESS_PERIOD_S = 0.1
_NO_MULTI_GPU = (
    "multi-GPU training of a MONAI bundle is not supported: MonaiAlgo trains one process on one "
    "device; deploy the bundle to a single-GPU site (or set multi_gpu to false for it)"
)


def _config_file(root: Path, stem: str) -> Path | None:
    for suffix in _SUFFIXES:
        path = root / CONFIGS / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def bundle_config_files(mmar_root: str | Path) -> dict[str, Path]:
    """The bundle config files MonaiAlgo reads: ``train`` always, ``evaluate`` and ``metadata``
    when present (``configs/<name>.json``, ``.yaml`` or ``.yml``).

    Raises:
        TrainConfigError: The MMAR has no ``configs/train.json``.
    """
    root = Path(mmar_root)
    train = _config_file(root, "train")
    if train is None:
        raise TrainConfigError(
            root / CONFIGS / "train.json",
            None,
            "missing: a MONAI bundle needs configs/train.json (or .yaml) at the MMAR's root",
        )
    files = {"train": train}
    for stem in ("evaluate", "metadata"):
        path = _config_file(root, stem)
        if path is not None:
            files[stem] = path
    return files


def build_bundle_trainer(
    mmar_root: str | Path,
    *,
    site_name: str,
    local_epochs: int | None = None,
    steps_aggregation: int = 0,
    on_progress: ProgressCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    device: str | None = None,
    environment: MMAREnvironment | None = None,
) -> BundleTrainer:
    """Build the trainer of the MONAI bundle an MMAR carries, through ``MonaiAlgo``.

    Args:
        mmar_root: The (deployed) MMAR folder: the bundle root. MonaiAlgo and the bundle's own
            handlers write into it (``models/``, ``eval/``); the best local model goes to
            ``best_model.pt`` in its ``MMAR_CKPT_DIR`` (``models/``), the last validation's
            metrics to ``validation_metrics.json`` in its ``MMAR_EVAL_OUTPUT_PATH`` (``eval/``).
        site_name: This site's name (MonaiAlgo's client name).
        local_epochs: Epochs per round; default 1 (MonaiAlgo's default: a bundle's own
            ``max_epochs`` is the length of a whole centralised training, not of a round).
        steps_aggregation: When > 0, each round runs exactly this many iterations instead of
            whole epochs.
        on_progress: Called with ``(step, total_steps, epoch, loss)`` at most ~10 times a second
            and always on a round's last step; ``loss`` is the mean training loss of the current
            epoch so far.
        on_epoch_end: Called with ``(epoch, {"train_loss": ...})`` after each epoch of a round
            (and after the last, partial one when ``steps_aggregation`` ends a round mid-epoch).
        device: A torch device for the bundle's ``device``; default: the bundle's own choice.
        environment: The MMAR's variables (default: its ``config/environment.json``, which may
            be absent). ``DATA_ROOT``, when given, becomes the bundle's ``dataset_dir``.

    Raises:
        TrainConfigError: MONAI is not installed, or the bundle is unusable (the file and key
            are named); also whatever the site policy's expression gate raises.
        ValueError: An argument is out of range, or the device is unavailable.
    """
    check_round_args(site_name, local_epochs, steps_aggregation)
    torch_device = pick_device(device) if device is not None else None
    epochs = local_epochs or 1
    root = Path(mmar_root).resolve()
    files = bundle_config_files(root)
    train_file = files["train"]
    require_monai(train_file, None)
    if environment is None:
        environment = load_environment(root, local_environment_file(root))

    raw = _read_configs(files)
    _check_expressions(raw, root)
    train_files = [files["train"]]
    eval_files = [files["train"], *([files["evaluate"]] if "evaluate" in files else [])]
    train_config = _merged(train_files)
    eval_config = _merged(eval_files)
    _require(train_config, "train#trainer", train_file, "a SupervisedTrainer that trains `network`")
    _require(
        eval_config,
        "validate#evaluator",
        files.get("evaluate", train_file),
        "a SupervisedEvaluator with a key metric: it validates each round and picks the best "
        "local model",
    )

    # Overrides go in as MONAI's own `id: value` pairs (ConfigWorkflow's **override); none is an
    # expression.
    common: dict[str, Any] = {"bundle_root": str(root)}
    if torch_device is not None:
        if "device" in train_config:
            common["device"] = torch_device
        else:
            log.warning(
                "%s has no top-level 'device'; the bundle picks its own, not %s",
                train_file,
                torch_device,
            )
    data_root = environment.variables.get("DATA_ROOT")
    if data_root and "dataset_dir" in train_config:
        common["dataset_dir"] = str(data_root)
    train_overrides = {**common, **_checkpoint_loaders_off(train_config, "train#handlers")}
    if isinstance(train_config.get("train#trainer"), dict):
        # MonaiAlgo sets it too, and fails on a trainer that does not name one.
        train_overrides["train#trainer#max_epochs"] = epochs
    eval_overrides = {**common, **_checkpoint_loaders_off(eval_config, "validate#handlers")}

    algo = _initialise(
        root,
        site_name,
        train_file,
        files,
        local_epochs=epochs,
        train_overrides=train_overrides,
        eval_overrides=eval_overrides,
        raw=raw,
    )
    return BundleTrainer(
        algo=algo,
        mmar_root=root,
        site_name=site_name,
        train_file=train_file,
        local_epochs=epochs,
        steps_aggregation=steps_aggregation,
        on_progress=on_progress,
        on_epoch_end=on_epoch_end,
        ckpt_dir=environment.ckpt_dir,
        eval_dir=environment.eval_dir,
    )


def bundle_problems(mmar_root: str | Path) -> list[TrainConfigError]:
    """What keeps a bundle from training here, found without building it (nothing runs): the
    files read, the trainer and evaluator a round needs, the network a server starts from.
    Whether its ``$`` expressions may run is the site policy's question, not this one's."""
    root = Path(mmar_root)
    try:
        files = bundle_config_files(root)
        require_monai(files["train"], None)
        _read_configs(files)
    except TrainConfigError as exc:
        return [exc]
    problems: list[TrainConfigError] = []
    train = _merged([files["train"]])
    evaluate = _merged([files["train"], *([files["evaluate"]] if "evaluate" in files else [])])
    for config, key, file, what in (
        (train, "train#trainer", files["train"], "a SupervisedTrainer that trains `network`"),
        (
            evaluate,
            "validate#evaluator",
            files.get("evaluate", files["train"]),
            "a SupervisedEvaluator with a key metric",
        ),
        (
            train,
            "network_def" if "network" not in train else "network",
            files["train"],
            "the network (MONAI's bundle layout)",
        ),
    ):
        try:
            _require(config, key, file, what)
        except TrainConfigError as exc:
            problems.append(exc)
    return problems


def initial_bundle_weights(mmar_root: str | Path) -> dict[str, np.ndarray]:
    """The bundle's network alone (``network_def``), seeded: a server's initial model, no data.

    Raises:
        TrainConfigError: MONAI is missing, or the bundle has no buildable ``network_def``.
    """
    root = Path(mmar_root).resolve()
    files = bundle_config_files(root)
    train_file = files["train"]
    require_monai(train_file, None)
    raw = _read_configs({"train": train_file})
    _check_expressions(raw, root)
    config = _merged([train_file])
    key = "network_def" if "network_def" in config else "network"
    _require(config, key, train_file, "the network (MONAI's bundle layout: network_def)")
    config["bundle_root"] = str(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            network = config.get_parsed_content(key, instantiate=True)
        except Exception as exc:
            raise TrainConfigError(
                train_file, key, f"cannot be built: {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(network, nn.Module):
        raise TrainConfigError(
            train_file, key, f"built {type(network).__name__}, not a torch module"
        )
    return to_numpy(network.state_dict())


def _initialise(
    root: Path,
    site_name: str,
    train_file: Path,
    files: Mapping[str, Path],
    *,
    local_epochs: int,
    train_overrides: dict[str, Any],
    eval_overrides: dict[str, Any],
    raw: Mapping[Path, Any],
) -> Any:
    from monai.fl.client import MonaiAlgo  # deferred: monai is the optional extra fltui[monai]
    from monai.fl.utils.constants import ExtraItems  # deferred: monai, the optional extra

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    eval_names = [rel(files["train"])]
    if "evaluate" in files:
        eval_names.append(rel(files["evaluate"]))
    algo = MonaiAlgo(
        bundle_root=str(root),
        local_epochs=local_epochs,
        send_weight_diff=False,  # Δ, privacy and exclude_vars are the federated client's job
        config_train_filename=rel(train_file),
        train_kwargs=train_overrides,
        config_evaluate_filename=eval_names,
        eval_kwargs=eval_overrides,
        config_filters_filename=None,  # config_fed_client.json's processors and privacy apply
        disable_ckpt_loading=True,
        eval_workflow_name="train",
    )
    # MONAI logs, as an ERROR, that the optional metadata.json is absent, and as a WARNING that
    # the bundle's logging.conf is not applied (our choice): noise in the worker's log.
    noise = ["Logging file is set to False"]
    if "metadata" not in files:
        noise.append("Cannot find the metadata config file")
    quiet = _Drop(*noise)
    workflows_log = logging.getLogger("monai.bundle.workflows")
    workflows_log.addFilter(quiet)
    try:
        # LOGGING_FILE False: the bundle's logging.conf is not applied (fileConfig evaluates it).
        algo.initialize(extra={ExtraItems.CLIENT_NAME: site_name, ExtraItems.LOGGING_FILE: False})
    except Exception as exc:
        file, key, problem = _explain(exc, raw)
        raise TrainConfigError(
            file or train_file,
            key,
            f"the bundle could not be built ({problem}); fix it in the bundle's config "
            "(`python -m monai.bundle run --config_file configs/train.json` reproduces it)",
        ) from exc
    finally:
        workflows_log.removeFilter(quiet)
    network = getattr(algo.trainer, "network", None)
    if not isinstance(network, nn.Module):
        raise TrainConfigError(
            train_file,
            "train#trainer#network",
            f"the trainer's network is {type(network).__name__}; expected a torch.nn.Module "
            "(e.g. `@network`)",
        )
    evaluator = algo.evaluator
    if evaluator is None or getattr(evaluator.state, "key_metric_name", None) is None:
        raise TrainConfigError(
            files.get("evaluate", train_file),
            "validate#evaluator#key_val_metric",
            "the evaluator has no key metric; give it one (e.g. `@validate#key_metric` with "
            "MeanDice as val_mean_dice): it is reported each round and picks the best local model",
        )
    return algo


class _Drop(logging.Filter):
    """Drops the log records whose message starts with one of the given texts."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _explain(exc: Exception, raw: Mapping[Path, Any]) -> tuple[Path | None, str | None, str]:
    """Where MONAI's error points (file and config id, when one can be found) and one line
    saying what it is.

    MONAI's messages quote the failing expression or ``_target_`` but not its id: the id is the
    config string the message quotes (the longest, when several do).
    """
    message = str(exc)
    key = None
    if isinstance(exc, KeyError) and "config ID '" in message:
        key = message.split("config ID '", 1)[1].split("'", 1)[0]
    elif "trainer must be SupervisedTrainer" in message:
        key = "train#trainer"
    elif "evaluator must be SupervisedEvaluator" in message:
        key = "validate#evaluator"
    file = None
    if key is None:
        best = ""
        for path, data in raw.items():
            for where, text in _strings(data, ""):
                code = text.startswith("$") or where.endswith("_target_")
                if code and len(text) > len(best) and text in message:
                    best, file, key = text, path, where.removesuffix("#_target_")
    causes = [f"{type(exc).__name__}: {' '.join(message.split())}"]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        causes.append(f"{type(cause).__name__}: {' '.join(str(cause).split())}")
    problem = " <- ".join(causes)
    if len(problem) > 400:
        problem = problem[:397] + "..."
    return file, key, problem


def _read_configs(files: Mapping[str, Path]) -> dict[Path, Any]:
    """Each config file as plain data (JSON or YAML: nothing is evaluated)."""
    from monai.bundle import ConfigParser  # deferred: monai is the optional extra fltui[monai]

    raw: dict[Path, Any] = {}
    for path in files.values():
        try:
            raw[path] = ConfigParser.load_config_file(path)
        except Exception as exc:
            raise TrainConfigError(
                path, None, f"cannot be read as a bundle config ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(raw[path], dict):
            raise TrainConfigError(
                path, None, f"expected an object at the top, got {type(raw[path]).__name__}"
            )
    return raw


def _merged(files: list[Path]) -> Any:
    """A parser over the files merged as MONAI merges them, never parsed (nothing runs)."""
    from monai.bundle import ConfigParser  # deferred: monai is the optional extra fltui[monai]

    return ConfigParser(ConfigParser.load_config_files([str(f) for f in files]))


def _require(config: Any, key: str, file: Path, what: str) -> None:
    if key not in config:
        raise TrainConfigError(file, key, f"missing: a bundle trained here needs {key}, {what}")


def _checkpoint_loaders_off(config: Any, key: str) -> dict[str, Any]:
    """Overrides that disable every CheckpointLoader among ``config[key]``.

    MonaiAlgo disables those of ``validate#handlers``; a loader among ``train#handlers`` would
    reload its checkpoint over the global model at the start of every round.
    """
    handlers = config.get(key)
    if not isinstance(handlers, list):
        return {}
    return {
        f"{key}#{i}#_disabled_": True
        for i, handler in enumerate(handlers)
        if isinstance(handler, dict) and "CheckpointLoader" in str(handler.get("_target_", ""))
    }


def _check_expressions(raw: Mapping[Path, Any], root: Path) -> None:
    """Shows every ``"$..."`` expression of the bundle's configs to the site policy's gate.

    ``engine.components.check_expression(key, text, file)`` is the policy gate for config
    expressions: it raises when the site does not allow them. A ``"%file#id"`` macro naming
    another config file brings that file's expressions in, so it is walked too.
    """
    gate: Callable[[str, str, Path], Any] | None = getattr(
        engine.components, "check_expression", None
    )
    if gate is None:
        return
    from monai.bundle import ConfigParser  # deferred: monai is the optional extra fltui[monai]

    pending = list(raw.items())
    seen = {path.resolve() for path in raw}
    while pending:
        file, data = pending.pop()
        for key, text in _strings(data, ""):
            if text.startswith("$"):
                gate(key, text, file)
            elif text.startswith("%"):
                other, _ = ConfigParser.split_path_id(text[1:])
                if not other:
                    continue
                # MONAI opens a macro's file as given (relative to the working folder).
                path = Path(other)
                candidates = [path] if path.is_absolute() else [Path.cwd() / path, root / path]
                for candidate in candidates:
                    resolved = candidate.resolve()
                    if resolved.is_file() and resolved not in seen:
                        seen.add(resolved)
                        pending.extend(_read_configs({"macro": resolved}).items())


def _strings(data: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string of a config with its MONAI id (``train#handlers#0#_target_``)."""
    if isinstance(data, str):
        yield where, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(value, f"{where}#{key}" if where else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, f"{where}#{i}" if where else str(i))


@dataclass
class _Round:
    """What one :meth:`BundleTrainer.train` has done so far (seen by the ignite handlers)."""

    total: int
    steps_only: bool
    start_epoch: int
    step: int = 0
    epoch_steps: int = 0
    loss_sum: Any = 0.0
    loss_count: int = 0
    last_report: float = -math.inf
    aborted: bool = False
    diverged: str | None = None

    def mean_loss(self) -> float:
        return float(self.loss_sum) / self.loss_count if self.loss_count else math.nan


class BundleTrainer(TrainerFacts):
    """A MONAI bundle's model and engines, with the operations a federated round needs.

    Build it with :func:`build_bundle_trainer`. The same interface as
    :class:`engine.training.fitter.Fitter`; all methods are thread-safe (they serialise on one
    lock) except :meth:`abort`, which only sets a flag that a running :meth:`train` sees before
    its next iteration.
    """

    def __init__(
        self,
        *,
        algo: Any,
        mmar_root: Path,
        site_name: str,
        train_file: Path,
        local_epochs: int,
        steps_aggregation: int,
        on_progress: ProgressCallback | None,
        on_epoch_end: EpochCallback | None,
        ckpt_dir: Path,
        eval_dir: Path,
    ) -> None:
        self.algo = algo
        self.mmar_root = mmar_root
        self.site_name = site_name
        self.train_file = train_file
        self.local_epochs = local_epochs
        self.steps_aggregation = steps_aggregation
        self.ckpt_dir = ckpt_dir
        self.eval_dir = eval_dir
        self._on_progress = on_progress
        self._on_epoch_end = on_epoch_end
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._round: _Round | None = None
        self._rounds = 0
        self._n_iter = 0
        self._trainer = algo.trainer
        self._evaluator = algo.evaluator
        self._best = BestModel(ckpt_dir, self.higher_is_better)
        self._attach()

    def _attach(self) -> None:
        from ignite.engine import Events  # deferred: ignite comes with the optional monai extra

        trainer = self._trainer
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._before_batch)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._after_epoch)
        # The bundle's own validation during training (ValidationHandler) runs the train
        # workflow's evaluator inside the trainer's run: an abort ends it too.
        inner = _optional(lambda: self.algo.train_workflow.evaluator)
        if inner is not None and inner is not self._evaluator and hasattr(inner, "terminate"):
            inner.add_event_handler(Events.GET_BATCH_STARTED, self._before_inner_batch)

    # -- read-only facts ---------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The torch network being trained (unwrapped from DataParallel, if any)."""
        return _unwrap(self._trainer.network)

    @property
    def device(self) -> torch.device:
        """The device the network is on."""
        for tensor in self.model.parameters():
            return tensor.device
        state_device = getattr(self._trainer.state, "device", None)
        return torch.device(state_device) if state_device is not None else torch.device("cpu")

    @property
    def metric_name(self) -> str:
        """The evaluator's key metric (the bundle's ``validate#key_metric``, e.g.
        ``"val_mean_dice"``)."""
        return str(self._evaluator.state.key_metric_name)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger key metric is better, as the evaluator's ``metric_cmp_fn`` says
        (MONAI's default: greater is better; a loss-like metric's bundle sets its own)."""
        compare = getattr(self._evaluator, "metric_cmp_fn", None)
        try:
            return bool(compare(1.0, 0.0))  # type: ignore[misc]
        except Exception:
            return higher_is_better(self.metric_name)

    @property
    def epoch_length(self) -> int | None:
        """Iterations in one epoch of the bundle's training data loader (None: unknown)."""
        length = self._trainer.state.epoch_length
        return int(length) if length else None

    @property
    def steps_per_round(self) -> int:
        """Iterations one :meth:`train` runs (0 when the data loader has no length)."""
        if self.steps_aggregation > 0:
            return self.steps_aggregation
        return self.local_epochs * (self.epoch_length or 0)

    # -- multi-GPU: not for bundles ----------------------------------------------------------

    def enable_distributed(self, rank: int, world_size: int) -> None:
        """Not supported for bundles (MonaiAlgo trains one process on one device)."""
        raise NotImplementedError(_NO_MULTI_GPU)

    def broadcast_weights(self, src: int = 0) -> None:
        """Not supported for bundles (MonaiAlgo trains one process on one device)."""
        raise NotImplementedError(_NO_MULTI_GPU)

    # -- weights ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        from monai.networks.utils import get_state_dict  # deferred: monai, the optional extra

        return get_state_dict(self._trainer.network)

    def get_weights(self) -> dict[str, np.ndarray]:
        """A CPU numpy copy of every variable of the network, in ``state_dict`` order."""
        with self._lock:
            return to_numpy(self._state())

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load some or all variables into the network (names not given keep their values).

        Raises:
            ValueError: A name is not a variable of the network, or a shape does not match.
                Then nothing has been changed.
        """
        with self._lock:
            load_weights(self.model, weights)

    def best_weights(self) -> dict[str, np.ndarray] | None:
        """The weights with the best key metric :meth:`validate` saw after local training, or
        those an earlier run saved in ``best_model.pt``, or ``None``."""
        with self._lock:
            return self._best.weights()

    # -- training ---------------------------------------------------------------------------

    def abort(self) -> None:
        """Ask a running :meth:`train` to stop before its next iteration (thread-safe).

        The request is consumed by the :meth:`train` it stops; made while no round runs, it
        stops the next one before its first iteration.
        """
        self._abort.set()

    def train(self) -> int:
        """Run one local round through MonaiAlgo: ``local_epochs`` epochs, or exactly
        ``steps_aggregation`` iterations.

        Returns:
            The number of iterations run (``n_iter``).

        Raises:
            TrainingAborted: :meth:`abort` was called; the network keeps the iterations run.
            FloatingPointError: The training loss of an epoch became NaN or infinite.
        """
        from monai.fl.utils.constants import WeightType  # deferred: monai, the optional extra
        from monai.fl.utils.exchange_object import ExchangeObject  # deferred: monai extra

        with self._lock:
            self._rounds += 1
            self._n_iter = 0
            self._check_abort(0)
            trainer = self._trainer
            steps_only = self.steps_aggregation > 0
            if steps_only:
                # MonaiAlgo counts epochs: give it enough, and end the run after the steps.
                length = self.epoch_length
                self.algo.local_epochs = (
                    math.ceil(self.steps_aggregation / length) if length else self.steps_aggregation
                )
            else:
                self.algo.local_epochs = self.local_epochs
            self._round = _Round(
                total=self.steps_per_round,
                steps_only=steps_only,
                start_epoch=int(trainer.state.epoch),
            )
            try:
                # The "global" weights MonaiAlgo loads are the network's own: the federated
                # client has already put the global model in with set_weights.
                self.algo.train(
                    ExchangeObject(weights=self._state(), weight_type=WeightType.WEIGHTS)
                )
                current = self._round
                self._n_iter = current.step
                if current.diverged is not None:
                    raise FloatingPointError(current.diverged)
                if not current.aborted and current.epoch_steps > 0:
                    self._end_epoch(current, int(trainer.state.epoch))  # the last, partial one
                self._check_abort(current.step)
                return current.step
            finally:
                self._round = None

    def _check_abort(self, step: int) -> None:
        if self._abort.is_set():
            self._abort.clear()
            raise TrainingAborted(
                f"training aborted on site {self.site_name!r} after {step} of "
                f"{self.steps_per_round} steps"
            )

    def _before_batch(self, engine: Any) -> None:
        current = self._round
        if current is not None and self._abort.is_set() and not current.aborted:
            current.aborted = True
            engine.terminate(skip_completed=True)

    def _before_inner_batch(self, engine: Any) -> None:
        # The flag stays set: the trainer sees it at its next batch and ends the round.
        if self._round is not None and self._abort.is_set():
            engine.terminate(skip_completed=True)

    def _after_iteration(self, engine: Any) -> None:
        current = self._round
        if current is None:
            return
        current.step += 1
        current.epoch_steps += 1
        loss = _loss_of(engine.state.output)
        if loss is not None:
            # Sums stay on the device: reading one forces a GPU sync, done only for a callback.
            current.loss_sum = current.loss_sum + loss
            current.loss_count += 1
        done = current.steps_only and current.step >= current.total
        now = time.monotonic()
        if self._on_progress is not None and (
            done or current.step == current.total or now - current.last_report >= _PROGRESS_PERIOD_S
        ):
            current.last_report = now
            epoch = int(engine.state.epoch) - current.start_epoch
            self._on_progress(current.step, current.total, epoch, current.mean_loss())
        if done:
            engine.terminate()

    def _after_epoch(self, engine: Any) -> None:
        current = self._round
        if current is None or current.epoch_steps == 0:
            return
        self._end_epoch(current, int(engine.state.epoch))
        if current.diverged is not None:
            engine.terminate(skip_completed=True)

    def _end_epoch(self, current: _Round, engine_epoch: int) -> None:
        epoch = engine_epoch - current.start_epoch
        counted = current.loss_count > 0
        train_loss = current.mean_loss()
        current.loss_sum, current.loss_count, current.epoch_steps = 0.0, 0, 0
        metrics = {"train_loss": train_loss} if counted else {}
        if counted and not math.isfinite(train_loss):
            current.diverged = (
                f"training loss is {train_loss} in epoch {epoch} (step {current.step}); the model "
                f"diverged, try a lower learning rate in {self.train_file}"
            )
            return
        if self._on_epoch_end is not None:
            self._on_epoch_end(epoch, metrics)

    # -- validation -------------------------------------------------------------------------

    def validate(
        self, weights: Mapping[str, np.ndarray] | None = None, *, after_training: bool = True
    ) -> dict[str, float]:
        """Evaluate on this site's validation set with the bundle's evaluator (MonaiAlgo's
        ``evaluate``: the evaluator has its own copy of the network, so the trained one is
        never touched).

        Without ``weights`` the trained network is evaluated, and (``after_training``: it is
        the model local training just made) an improvement of the key metric updates
        :attr:`best_metric`, :meth:`best_weights` and ``best_model.pt``; a global model just
        loaded is validated with ``after_training=False``: measured, never kept as best. With
        ``weights`` (names not given fall back to the network's own) those are evaluated and
        the trained network and the best model stay as they are.

        Returns:
            The evaluator's scalar metrics, e.g. ``{"val_mean_dice": 0.71}``.

        Raises:
            ValueError: ``weights`` has an unknown name or a wrong shape.
        """
        from monai.fl.utils.constants import WeightType  # deferred: monai, the optional extra
        from monai.fl.utils.exchange_object import ExchangeObject  # deferred: monai extra

        with self._lock:
            state = self._state()
            if weights is not None:
                state = {**state, **checked_tensors(state, weights)}
            result = self.algo.evaluate(
                ExchangeObject(weights=state, weight_type=WeightType.WEIGHTS)
            )
            metrics = _scalars(result.metrics or {})
            if self.metric_name not in metrics:
                raise TrainConfigError(
                    self.train_file,
                    "validate#key_metric",
                    f"the evaluator gave no scalar {self.metric_name!r} (it gave "
                    f"{sorted(metrics) or 'nothing'}); the key metric must reduce to one number",
                )
            if weights is None:
                if after_training:
                    self._best.offer(metrics[self.metric_name], self._state())
                self._save_metrics(metrics)
            return metrics

    def _save_metrics(self, metrics: Mapping[str, float]) -> None:
        save_validation_metrics(
            self.eval_dir,
            site=self.site_name,
            metric=self.metric_name,
            metrics=metrics,
            best_metric=self._best.metric,
            local_rounds=self._rounds,
        )

    def finalize(self) -> None:
        """Ends the bundle's workflows (MonaiAlgo's ``finalize``: the bundle's ``finalize``
        expressions, handlers' closing)."""
        with self._lock:
            self.algo.finalize()


def _optional(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception:
        return None


def _unwrap(network: nn.Module) -> nn.Module:
    inner = getattr(network, "module", None)
    return inner if isinstance(inner, nn.Module) else network


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss of one iteration from a MONAI trainer's ``engine.state.output``: a dict with
    ``"loss"``, or (decollated by postprocessing) a list of such dicts."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output.detach().float().reshape(())
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        return torch.tensor(float(output))
    return None


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        elif isinstance(value, np.ndarray):
            if value.size != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out
