"""The fitter: trains and validates one site's torch model as an MMAR's config_train.json says."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from engine.config import load_environment, local_environment_file
from engine.training.components import build_component
from engine.training.config import METRICS, ComponentSpec, TrainConfig, load_train_config
from engine.training.errors import TrainConfigError, TrainingAborted
from engine.training.evaluation import save_validation_metrics
from engine.training.weights import (
    BEST_MODEL_NAME,
    BestModel,
    TrainerFacts,
    checked_tensors,
    to_numpy,
)

__all__ = [
    "BEST_MODEL",
    "EpochCallback",
    "Fitter",
    "ProgressCallback",
    "build_fitter",
    "check_round_args",
    "pick_device",
]

log = logging.getLogger(__name__)

#: ``(step, total_steps, epoch, loss)``: 1-based step and epoch of the current round, and the
#: mean training loss of the current epoch so far.
ProgressCallback = Callable[[int, int, int, float], None]
#: ``(epoch, metrics)``: 1-based epoch of the current round and its training metrics.
EpochCallback = Callable[[int, dict[str, float]], None]

#: Where the best local model is kept, relative to the MMAR, unless environment.json's
#: MMAR_CKPT_DIR names another folder (Clara's default is models/).
BEST_MODEL = Path("models") / BEST_MODEL_NAME

# Progress callbacks drive a UI; more than ~10 updates a second are invisible and cost time.
_PROGRESS_PERIOD_S = 0.1


def build_fitter(
    mmar_root: str | Path,
    *,
    site_name: str,
    local_epochs: int | None = None,
    steps_aggregation: int = 0,
    on_progress: ProgressCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    device: str | None = None,
    config: TrainConfig | None = None,
) -> Fitter:
    """Build the fitter for an MMAR from its ``config/config_train.json``.

    Args:
        mmar_root: The (deployed) MMAR folder. ``custom/`` in it goes on ``sys.path``; the best
            model is saved to ``best_model.pt`` in its ``MMAR_CKPT_DIR`` (``models/``), the
            last validation's metrics to ``validation_metrics.json`` in its
            ``MMAR_EVAL_OUTPUT_PATH`` (``eval/``); ``{NAME}`` placeholders of the config are
            filled from its ``config/environment.json``.
        site_name: This site's name (passed to components that take a ``context``).
        local_epochs: Epochs per round, overriding the config's ``epochs``.
        steps_aggregation: When > 0, each round takes exactly this many optimizer steps instead
            of whole epochs.
        on_progress: Called with ``(step, total_steps, epoch, loss)`` at most ~10 times a
            second, and always on a round's last step.
        on_epoch_end: Called with ``(epoch, metrics)`` after each epoch of a round.
        device: A torch device; default ``"cuda"`` when available, else ``"cpu"``.
        config: The MMAR's config when the caller has read it already (else read here).

    Returns:
        The fitter, with a freshly initialised model (seeded from the config's ``seed``).

    Raises:
        TrainConfigError: The config or one of its components is unusable.
        ValueError: An argument is out of range, or the device is unavailable.
    """
    check_round_args(site_name, local_epochs, steps_aggregation)
    torch_device = pick_device(device)

    root = Path(mmar_root).resolve()
    if config is None:  # (engine.training.build_fitter has read it already, to pick the form)
        loaded = load_train_config(root)
        if not isinstance(loaded, TrainConfig):
            raise TrainConfigError(
                root / "config" / "config_train.json",
                "train",
                "Clara's PyTorch form: build it with engine.training.build_fitter",
            )
        config = loaded
    # load_train_config reads the site's local/environment.json over the MMAR's too.
    environment = config.environment or load_environment(root, local_environment_file(root))
    custom = root / "custom"
    custom_dir = custom if custom.is_dir() else None
    context = {
        "site_name": site_name,
        "mmar_root": root,
        "environment": dict(environment.variables),
    }

    def make(spec: ComponentSpec, *leading: Any) -> Any:
        return build_component(spec, config.file, custom_dir, context, *leading)

    with _seeded(config.seed, torch_device):
        train_data = _check_dataset(make(config.train_data), config.train_data, config.file)
        validation_data = _check_dataset(
            make(config.validation_data), config.validation_data, config.file
        )
        model = make(config.model)
        if not isinstance(model, nn.Module):
            raise TrainConfigError(
                config.file,
                "model",
                f"{config.model.label} built {type(model).__name__}; expected a torch.nn.Module",
            )
        loss_fn = make(config.loss)
        if not callable(loss_fn):
            raise TrainConfigError(
                config.file,
                "loss",
                f"{config.loss.label} built {type(loss_fn).__name__}; expected a callable "
                "loss(output, target)",
            )
    model.to(torch_device)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(torch_device)  # losses with weights (class weights) hold tensors
    # The optimizer is built after the move so its state lives on the training device.
    optimizer = make(config.optimizer, model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrainConfigError(
            config.file,
            "optimizer",
            f"{config.optimizer.label} built {type(optimizer).__name__}; "
            "expected a torch.optim.Optimizer",
        )
    return Fitter(
        config=config,
        mmar_root=root,
        site_name=site_name,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        train_data=train_data,
        validation_data=validation_data,
        device=torch_device,
        local_epochs=local_epochs if local_epochs is not None else config.epochs,
        steps_aggregation=steps_aggregation,
        on_progress=on_progress,
        on_epoch_end=on_epoch_end,
        ckpt_dir=environment.ckpt_dir,
        eval_dir=environment.eval_dir,
    )


class Fitter(TrainerFacts):
    """One site's model, data, loss and optimizer, with the operations a federated round needs.

    Build it with :func:`build_fitter`. All methods are thread-safe: they serialise on one lock,
    except :meth:`abort`, which only sets a flag that a running :meth:`train` sees at its next
    step.
    """

    def __init__(
        self,
        *,
        config: TrainConfig,
        mmar_root: Path,
        site_name: str,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        train_data: Any,
        validation_data: Any,
        device: torch.device,
        local_epochs: int,
        steps_aggregation: int,
        on_progress: ProgressCallback | None,
        on_epoch_end: EpochCallback | None,
        ckpt_dir: Path | None = None,
        eval_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.ckpt_dir = ckpt_dir if ckpt_dir is not None else mmar_root / BEST_MODEL.parent
        self.eval_dir = eval_dir if eval_dir is not None else mmar_root / "eval"
        self.mmar_root = mmar_root
        self.site_name = site_name
        self.device = device
        self.local_epochs = local_epochs
        self.steps_aggregation = steps_aggregation
        self._model = model
        self._loss_fn = loss_fn
        self._optimizer = optimizer
        self._on_progress = on_progress
        self._on_epoch_end = on_epoch_end
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._rounds = 0
        self._n_iter = 0
        self._best = BestModel(self.ckpt_dir, METRICS[config.metric])
        pin = device.type == "cuda"
        self._shuffle = torch.Generator()
        self._train_loader = DataLoader(
            train_data,
            batch_size=config.batch_size,
            shuffle=True,
            generator=self._shuffle,
            pin_memory=pin,
        )
        self._validation_loader = DataLoader(
            validation_data, batch_size=config.validation_batch_size, pin_memory=pin
        )
        self._train_data = train_data
        self._forward: nn.Module = model  # the DDP wrapper under multi-GPU training
        self.rank = 0
        self.world_size = 1
        self._sampler: Any = None

    def enable_distributed(self, rank: int, world_size: int) -> None:
        """Trains as one rank of ``world_size`` (torch.distributed must be initialised).

        Each rank gets its own shard of the training data (DistributedSampler) and gradients are
        averaged across ranks (DistributedDataParallel), so every rank keeps the same weights.
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        with self._lock:
            self.rank, self.world_size = rank, world_size
            sampler: Any = DistributedSampler(
                self._train_data,
                num_replicas=world_size,
                rank=rank,
                shuffle=True,
                seed=self.config.seed,
            )
            self._sampler = sampler
            self._train_loader = DataLoader(
                self._train_data,
                batch_size=self.config.batch_size,
                sampler=sampler,
                pin_memory=self.device.type == "cuda",
            )
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._forward = DistributedDataParallel(self._model, device_ids=ids)

    def broadcast_weights(self, src: int = 0) -> None:
        """Makes every rank's model equal to rank ``src``'s (after rank 0 loaded a global model)."""
        with self._lock, torch.no_grad():
            for tensor in self._model.state_dict().values():
                dist.broadcast(tensor, src=src)

    # -- read-only facts ---------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The torch model being trained (for callers that need torch-level access)."""
        return self._model

    @property
    def metric_name(self) -> str:
        """The key validation metric named by the config (e.g. ``"accuracy"``)."""
        return self.config.metric

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger key metric is better (accuracy) or worse (loss)."""
        return METRICS[self.config.metric]

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps one :meth:`train` takes."""
        if self.steps_aggregation > 0:
            return self.steps_aggregation
        return self.local_epochs * len(self._train_loader)

    # -- weights ----------------------------------------------------------------------------

    def get_weights(self, *, copy: bool = True) -> dict[str, np.ndarray]:
        """Every variable as a numpy array, in ``state_dict`` order.

        Args:
            copy: True: a CPU copy of every variable (bfloat16, which numpy lacks, as
                float32). False: for a CPU tensor of a dtype numpy has, a view of the model's
                own memory (no copy of a model that may be most of the machine's memory); the
                others are copied as with True. A view changes with the model: read it and
                drop it before the next :meth:`train` or :meth:`set_weights`.
        """
        with self._lock:
            state = self._model.state_dict()  # detached tensors sharing the model's memory
            if copy:
                return to_numpy(state)
            return {
                name: t.numpy()
                if t.device.type == "cpu" and t.dtype != torch.bfloat16
                else to_numpy({name: t})[name]
                for name, t in state.items()
            }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load some or all variables into the model.

        Args:
            weights: Variable name → array. Names not given keep their values. Values are cast
                to the variable's dtype.

        Raises:
            ValueError: A name is not a variable of the model, or a shape does not match. Then
                nothing has been changed.
        """
        with self._lock:
            tensors = self._checked(weights)
            state = self._model.state_dict()
            with torch.no_grad():
                for name, tensor in tensors.items():
                    state[name].copy_(tensor)

    def best_weights(self) -> dict[str, np.ndarray] | None:
        """The weights with the best key metric :meth:`validate` saw, or ``None`` before any.

        A fitter that has not validated yet (a new process after a run) reads the best model
        saved in ``models/best_model.pt`` by an earlier run, if there is one.
        """
        with self._lock:
            return self._best.weights()

    # -- training ---------------------------------------------------------------------------

    def abort(self) -> None:
        """Ask a running :meth:`train` to stop at its next step (thread-safe).

        The request is consumed by the :meth:`train` it stops; made while no round runs, it
        stops the next one before its first step.
        """
        self._abort.set()

    def train(self) -> int:
        """Run one local round: ``local_epochs`` epochs, or ``steps_aggregation`` steps.

        Returns:
            The number of optimizer steps taken (``n_iter``).

        Raises:
            TrainingAborted: :meth:`abort` was called; the model keeps the steps taken so far.
            FloatingPointError: The training loss became NaN or infinite.
        """
        with self._lock:
            self._rounds += 1
            self._n_iter = 0
            total = self.steps_per_round
            # A fresh, seeded shuffle per round: repeatable runs, different order each round.
            self._shuffle.manual_seed(_mix(self.config.seed, self._rounds))
            if self.world_size > 1:
                self._sampler.set_epoch(self._rounds)
            model = self._forward
            was_training = model.training
            model.train()
            step = 0
            epoch = 0
            last_report = -math.inf
            try:
                with _seeded(_mix(self.config.seed, self._rounds, 1), self.device):
                    while step < total:
                        epoch += 1
                        loss_sum = torch.zeros((), device=self.device)
                        correct = torch.zeros((), device=self.device, dtype=torch.long)
                        seen = 0
                        counted = True
                        for batch in self._train_loader:
                            self._check_abort(step)
                            x, y = self._to_device(batch)
                            self._optimizer.zero_grad(set_to_none=True)
                            output = model(x)
                            loss = self._loss_fn(output, y)
                            loss.backward()
                            self._optimizer.step()
                            step += 1
                            self._n_iter = step
                            size = _batch_size(y)
                            seen += size
                            # Sums stay on the device: reading a value forces a GPU sync, so
                            # it happens only when a callback needs it.
                            loss_sum += loss.detach() * size
                            hits = _hits(output, y)
                            if hits is None:
                                counted = False
                            else:
                                correct += hits
                            now = time.monotonic()
                            if self._on_progress is not None and (
                                step == total or now - last_report >= _PROGRESS_PERIOD_S
                            ):
                                last_report = now
                                self._on_progress(step, total, epoch, float(loss_sum) / seen)
                            if step == total:
                                break
                        if seen == 0:
                            raise RuntimeError("the training dataset yielded no batches")
                        metrics = {"train_loss": float(loss_sum) / seen}
                        if counted:
                            metrics["train_accuracy"] = float(correct) / seen
                        if not math.isfinite(metrics["train_loss"]):
                            raise FloatingPointError(
                                f"training loss is {metrics['train_loss']} in epoch {epoch} "
                                f"(step {step}); the model diverged, try a lower "
                                f"optimizer.args.lr in {self.config.file}"
                            )
                        if self._on_epoch_end is not None:
                            self._on_epoch_end(epoch, metrics)
                    self._check_abort(step)
            finally:
                model.train(was_training)
            return step

    def _check_abort(self, step: int) -> None:
        if self._abort.is_set():
            self._abort.clear()
            raise TrainingAborted(
                f"training aborted on site {self.site_name!r} after {step} of "
                f"{self.steps_per_round} steps"
            )

    # -- validation -------------------------------------------------------------------------

    def validate(
        self, weights: Mapping[str, np.ndarray] | None = None, *, after_training: bool = True
    ) -> dict[str, float]:
        """Evaluate on this site's validation set.

        Without ``weights`` the fitter's own model is evaluated, and (``after_training``: it is
        the model local training just made) an improvement of the key metric updates
        :attr:`best_metric`, :meth:`best_weights` and ``models/best_model.pt``. A global model
        just loaded is validated with ``after_training=False``: measured, never kept as best.
        With ``weights`` (e.g. another site's model, for cross-site validation) those weights
        are evaluated and the fitter's own model and best model stay as they are.

        Args:
            weights: Variables to evaluate instead of the model's own (names not given fall
                back to the model's own values).

        Returns:
            ``{"accuracy": ..., "loss": ...}`` (accuracy only for class-logit outputs).

        Raises:
            ValueError: ``weights`` has an unknown name or a wrong shape.
        """
        with self._lock:
            substitute = self._checked(weights) if weights is not None else None
            metrics = self._evaluate(substitute)
            if substitute is None:
                if after_training:
                    self._note(metrics)
                self._save_metrics(metrics)
            return metrics

    def _evaluate(self, substitute: dict[str, torch.Tensor] | None) -> dict[str, float]:
        model = self._model
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        counted = True
        try:
            with torch.no_grad():
                for batch in self._validation_loader:
                    x, y = self._to_device(batch)
                    if substitute is None:
                        output = model(x)
                    else:
                        # Runs the module with the given tensors in place of its own, so the
                        # fitter's model is never touched, not even for a moment.
                        output = torch.func.functional_call(model, substitute, (x,))
                    size = _batch_size(y)
                    seen += size
                    loss_sum += self._loss_fn(output, y).double() * size
                    hits = _hits(output, y)
                    if hits is None:
                        counted = False
                    else:
                        correct += hits
        finally:
            model.train(was_training)
        if seen == 0:
            raise RuntimeError("the validation dataset yielded no batches")
        metrics = {"loss": float(loss_sum) / seen}
        if counted:
            metrics = {"accuracy": float(correct) / seen, **metrics}
        if self.metric_name not in metrics:
            raise TrainConfigError(
                self.config.file,
                "validation.metric",
                f"{self.metric_name!r} cannot be computed for this model's outputs "
                "(accuracy needs class logits of shape (N, classes) and integer labels)",
            )
        return metrics

    def _note(self, metrics: Mapping[str, float]) -> None:
        self._best.offer(metrics[self.metric_name], self._model.state_dict())

    def _save_metrics(self, metrics: Mapping[str, float]) -> None:
        save_validation_metrics(
            self.eval_dir,
            site=self.site_name,
            metric=self.metric_name,
            metrics=metrics,
            best_metric=self._best.metric,
            local_rounds=self._rounds,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _checked(self, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Check every entry, then convert to tensors of the model's dtype on its device."""
        return checked_tensors(self._model.state_dict(), weights)

    def _to_device(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, Mapping) and "image" in batch and "label" in batch:
            x, y = batch["image"], batch["label"]  # MONAI's dictionary items
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
            raise TypeError(
                'a dataset item must be an (input, target) pair or a {"image", "label"} '
                f"dict; got a batch of type {type(batch).__name__}{keys}. For MONAI "
                "transforms and datalists, write config_train.json in Clara's PyTorch form "
                "(train / validate sections)"
            )
        non_blocking = self.device.type == "cuda"
        return _move(x, self.device, non_blocking), _move(y, self.device, non_blocking)


def check_round_args(site_name: object, local_epochs: object, steps_aggregation: object) -> None:
    """The arguments every training form takes, checked the one way.

    Raises:
        ValueError: naming the argument and what it must be.
    """
    if not isinstance(site_name, str) or not site_name:
        raise ValueError(f"site_name must be a non-empty string, got {site_name!r}")
    if local_epochs is not None and (
        isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1
    ):
        raise ValueError(f"local_epochs must be a positive integer or None, got {local_epochs!r}")
    if isinstance(steps_aggregation, bool) or not isinstance(steps_aggregation, int):
        raise ValueError(f"steps_aggregation must be an integer, got {steps_aggregation!r}")
    if steps_aggregation < 0:
        raise ValueError(
            f"steps_aggregation must be >= 0 (0 means epochs), got {steps_aggregation}"
        )


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"not a torch device: {device!r} ({exc})") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available here")
    return chosen


def _check_dataset(data: Any, spec: ComponentSpec, file: Path) -> Any:
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TrainConfigError(
            file,
            spec.key,
            f"{spec.label} built {type(data).__name__}; expected a map-style "
            "torch.utils.data.Dataset (with __len__ and __getitem__)",
        )
    if len(data) == 0:
        raise TrainConfigError(file, spec.key, f"{spec.label} has no samples")
    return data


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs for a block and restore the caller's RNG state afterwards."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
        yield


def _mix(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, round, purpose)."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def _move(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    return value


def _batch_size(target: Any) -> int:
    if isinstance(target, torch.Tensor) and target.ndim > 0:
        return int(target.shape[0])
    return 1


def _hits(output: Any, target: Any) -> torch.Tensor | None:
    """Correct predictions in a batch, or ``None`` when accuracy does not apply."""
    if (
        isinstance(output, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and output.ndim == 2
        and target.ndim == 1
        and not target.is_floating_point()
        and output.shape[0] == target.shape[0]
    ):
        return (output.argmax(dim=1) == target).sum()
    return None
