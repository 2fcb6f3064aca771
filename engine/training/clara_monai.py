"""Clara's PyTorch MMAR form, trained through MONAI's own engines.

``config_train.json``'s ``train`` section becomes a ``monai.engines.SupervisedTrainer`` (or the
trainer it names) with its loss, optimizer, scheduler, transforms, dataset, loader, inferer,
handlers and metrics; ``validate`` becomes a ``SupervisedEvaluator``. A federated round runs
the trainer for ``local_epochs`` epochs (or ``steps_aggregation`` iterations) from the global
model; the evaluator's metrics (named by each metric's ``log_label``) are the site's metrics,
the one marked ``is_key_metric`` choosing the best local model.

Component names are looked up in MONAI, torch and ignite by what the key holds (a ``loss`` in
``monai.losses`` then ``torch.nn``, a handler in ``monai.handlers`` then ``ignite.handlers``,
...). Configs written for MONAI 0.5-0.6 keep working: arguments MONAI has since renamed or
removed are translated (``_translate``), each with one notice in the run's log.
"""

from __future__ import annotations

import builtins
import contextvars
import importlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import components
from engine.config import ComponentSpec, ConfigError, MMAREnvironment
from engine.training.clara_config import ClaraConfig, Part, require_monai
from engine.training.errors import TrainConfigError, TrainingAborted
from engine.training.evaluation import higher_is_better, save_validation_metrics
from engine.training.weights import (
    BestModel,
    TrainerFacts,
    checked_tensors,
    load_weights,
    to_numpy,
)

__all__ = [
    "ClaraMonaiTrainer",
    "build_clara_model",
    "build_clara_trainer",
    "check_clara_config",
    "require_monai",
]

log = logging.getLogger(__name__)

_PROGRESS_PERIOD_S = 0.1

# Where a "name" is looked up, by the key that holds it (first match wins).
_NAMESPACES: dict[str, tuple[str, ...]] = {
    "model": ("monai.networks.nets", "torch.nn"),
    "loss": ("monai.losses", "torch.nn"),
    "optimizer": ("monai.optimizers", "torch.optim"),
    "lr_scheduler": ("monai.optimizers", "torch.optim.lr_scheduler"),
    "pre_transforms": ("monai.transforms",),
    "post_transforms": ("monai.transforms",),
    "dataset": ("monai.data", "torch.utils.data"),
    "dataloader": ("monai.data", "torch.utils.data"),
    "inferer": ("monai.inferers",),
    "handlers": ("monai.handlers", "ignite.handlers"),
    "metrics": ("monai.handlers", "ignite.metrics"),
    "trainer": ("monai.engines",),
    "evaluator": ("monai.engines",),
}
# Train handlers that would undo federated learning: loading a local checkpoint at the start of
# every run would replace the global model each round (MONAI's MonaiAlgo drops them too).
_DROPPED_TRAIN_HANDLERS = {"CheckpointLoader"}
# Old-form lambdas MONAI's decollated outputs no longer fit, and what does the same today.
_KNOWN_LAMBDAS = {
    "lambda x: (x['pred'], x['label'])": ("pred", "label"),
    'lambda x: (x["pred"], x["label"])': ("pred", "label"),
    "lambda x: x['loss']": ("loss",),
    'lambda x: x["loss"]': ("loss",),
}


# -- resolving names --------------------------------------------------------------------------


def _section_key(key: str) -> str:
    """``train.handlers[2]`` -> ``handlers``."""
    return key.split(".", 1)[-1].split("[", 1)[0]


def _lookup(name: str, section_key: str) -> tuple[Any, list[str], str]:
    where = _NAMESPACES.get(section_key, ())
    known: list[str] = []
    for module_name in where:
        module = importlib.import_module(module_name)
        obj = getattr(module, name, None)
        if obj is not None and callable(obj) and not name.startswith("_"):
            return obj, [], module_name
        known += [n for n in dir(module) if not n.startswith("_")]
    return None, known, " and ".join(where) or "nowhere"


def _resolve(spec: ComponentSpec) -> Callable[..., Any]:
    section_key = _section_key(spec.key)
    if spec.path is None:
        # MONAI's names first: SupervisedTrainer here is MONAI's engine, not the Clara 3.1
        # TensorFlow trainer that config_fed_client.json refuses by the same name. The name
        # becomes its full path, judged as any path is (trusted package, the deny-list of
        # entry points that run code, the site policy) before it is imported.
        found, _, where = _lookup(str(spec.name), section_key)
        if found is not None:
            spec = ComponentSpec(
                name=None, path=f"{where}.{spec.name}", args=spec.args, key=spec.key, file=spec.file
            )

    def fallback(name: str) -> tuple[Any, list[str], str]:
        return _lookup(name, section_key)

    return components.resolve_component(
        spec,
        {},
        "component",
        custom_dir=_custom_dir(spec.file),
        fallback=fallback,
        error=TrainConfigError,
    )


def _custom_dir(file: Path | None) -> Path | None:
    if file is None:
        return None
    custom = file.parent.parent / "custom"
    return custom if custom.is_dir() else None


# -- MONAI 0.5-0.6 configs ---------------------------------------------------------------------


def _translate(spec: ComponentSpec, factory: Callable[..., Any]) -> ComponentSpec:
    """The component with arguments MONAI renamed or removed since 0.5 turned into today's."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return spec
    args = dict(spec.args)
    label = spec.label
    notices: list[str] = []

    def rename(old: str, new: str) -> None:
        if old in args and old not in params and new in params and new not in args:
            args[new] = args.pop(old)
            notices.append(f"{old!r} is {new!r} in this MONAI")

    rename("dimensions", "spatial_dims")
    rename("do_sigmoid", "sigmoid")
    rename("do_softmax", "softmax")
    rename("n_classes", "num_classes")
    rename("batch_transform", "output_transform")
    if label.startswith("AsDiscrete"):
        classes = args.pop("n_classes", args.pop("num_classes", None))
        if isinstance(args.get("to_onehot"), bool):
            onehot = args.pop("to_onehot")
            if onehot and classes is not None:
                args["to_onehot"] = classes
            notices.append(
                "boolean 'to_onehot' with 'n_classes' is 'to_onehot=<classes>' in this MONAI"
            )
        elif classes is not None:
            notices.append("'n_classes' without 'to_onehot' has no meaning in this MONAI: dropped")
        if "threshold_values" in args:
            on = args.pop("threshold_values")
            thresh = args.pop("logit_thresh", 0.5)
            if on:
                args["threshold"] = thresh
            notices.append("'threshold_values'/'logit_thresh' is 'threshold' in this MONAI")
    for gone in ("mutually_exclusive", "to_onehot_y", "sigmoid", "logit_thresh", "other_act"):
        metric = label in ("MeanDice", "HausdorffDistance", "SurfaceDistance")
        if metric and gone in args and gone not in params:
            args.pop(gone)
            notices.append(f"{gone!r} was removed (do it in post_transforms): dropped")
    for note in notices:
        log.warning("%s %s (%s): %s; translated", spec.file, spec.key, label, note)
    if not notices:
        return spec
    return ComponentSpec(name=spec.name, path=spec.path, args=args, key=spec.key, file=spec.file)


def _factory(spec: ComponentSpec) -> tuple[Callable[..., Any], ComponentSpec]:
    if spec.name in ("AddChanneld", "AddChannel") and spec.path is None:
        import monai.transforms as mt  # deferred: MONAI is an extra, loaded only for this form

        args = dict(spec.args)
        args.setdefault("channel_dim", "no_channel")
        new = ComponentSpec(
            name="EnsureChannelFirst" + ("d" if spec.name.endswith("d") else ""),
            path=None,
            args=args,
            key=spec.key,
            file=spec.file,
        )
        log.warning(
            "%s %s: %s was removed from MONAI; translated to %s(channel_dim='no_channel')",
            spec.file,
            spec.key,
            spec.name,
            new.name,
        )
        return getattr(mt, str(new.name)), new
    factory = _resolve(spec)
    return factory, _translate(spec, factory)


# -- expressions ---------------------------------------------------------------------------


def _expression(text: str, file: Path | None, key: str) -> Any:
    """A Python expression of the config (an ``output_transform`` lambda), under the policy."""
    check = getattr(components, "check_expression", None)
    if check is not None:
        check(key, text, file)  # the site policy's gate: raises when expressions are refused
    known = _KNOWN_LAMBDAS.get(" ".join(text.split()))
    if known is not None:
        # MONAI now decollates a batch into a list of dicts, which these lambdas cannot index;
        # from_engine picks the same keys from either form.
        from monai.handlers import from_engine  # deferred: MONAI is an extra

        pick = from_engine(list(known), first=len(known) == 1)
        log.warning(
            "%s %s: %r written for MONAI 0.5 is from_engine(%s) in this MONAI; translated",
            file,
            key,
            text,
            list(known),
        )
        return pick
    try:
        return eval(
            text, {"__builtins__": builtins, "torch": torch, "np": np}
        )  # the site policy allowed expressions
    except Exception as exc:
        raise TrainConfigError(
            file or Path("<config>"), key, f"the expression {text!r} failed: {exc}"
        ) from exc


def _with_expressions(spec: ComponentSpec) -> ComponentSpec:
    args = {}
    changed = False
    for name, value in spec.args.items():
        if _is_expression(value):
            args[name] = _expression(value, spec.file, f"{spec.key}.args.{name}")
            changed = True
        else:
            args[name] = value
    if not changed:
        return spec
    return ComponentSpec(name=spec.name, path=spec.path, args=args, key=spec.key, file=spec.file)


# Arguments of MONAI's handlers and transforms that name a folder they write into
# (CheckpointSaver, TensorBoardStatsHandler, MetricsSaver, SaveImaged, CSVSaver, ...).
_WRITTEN_DIRS = ("save_dir", "log_dir", "output_dir")
_WRITE_ROOTS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar(
    "write_roots", default=()
)


def _confined(spec: ComponentSpec) -> ComponentSpec:
    """The component with its written folders under the MMAR (relative ones resolved against
    it, not the worker's working folder); a folder outside the MMAR is refused: a deployed MMAR
    writes only inside itself, whatever its components are."""
    if spec.file is None or not any(k in spec.args for k in _WRITTEN_DIRS):
        return spec
    mmar = spec.file.parent.parent.resolve()
    # The MMAR, and the checkpoint and evaluation folders the site's environment names (its
    # own local/environment.json may put them elsewhere; the MMAR's cannot).
    roots = [mmar, *(p.resolve() for p in _WRITE_ROOTS.get())]
    args = dict(spec.args)
    for key in _WRITTEN_DIRS:
        value = args.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise TrainConfigError(spec.file, f"{spec.key}.args.{key}", "expected a folder")
        folder = Path(value) if Path(value).is_absolute() else mmar / value
        resolved = folder.resolve()
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise TrainConfigError(
                spec.file,
                f"{spec.key}.args.{key}",
                f"{value!r} is outside the MMAR ({resolved}); a deployed MMAR writes only "
                'inside its own folder (e.g. "{MMAR_CKPT_DIR}" or "eval/...")',
            )
        args[key] = str(resolved)
    return ComponentSpec(name=spec.name, path=spec.path, args=args, key=spec.key, file=spec.file)


def _build(part: Part, *leading: Any, **injected: Any) -> Any:
    """Builds one component: its args, then what the form injects (only where it takes them)."""
    factory, spec = _factory(part.spec)
    spec = _confined(_with_expressions(spec))
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, True  # type: ignore[assignment]
    extra = {k: v for k, v in injected.items() if k not in spec.args and (k in params or takes_any)}
    spec = ComponentSpec(
        name=spec.name, path=spec.path, args={**spec.args, **extra}, key=spec.key, file=spec.file
    )
    kwargs = components.bind_arguments(spec, factory, leading=leading, error=TrainConfigError)
    try:
        return factory(*leading, **kwargs)
    except Exception as exc:  # a MONAI constructor says what was wrong; keep where it was
        raise TrainConfigError(
            spec.file or Path("<config>"),
            f"{spec.key}.args",
            f"{spec.label} rejected its arguments: {type(exc).__name__}: {exc}",
        ) from exc


def check_clara_config(config: ClaraConfig) -> list[ConfigError]:
    """Every problem found without data or training: names resolve, arguments bind."""
    try:
        require_monai(config.file, "train")
    except TrainConfigError as exc:
        return [exc]
    problems: list[ConfigError] = []
    for part in config.parts():
        if part.ref is not None or part.disabled:
            continue
        try:
            factory, spec = _factory(part.spec)
            if spec.path is None:
                leading: tuple[Any, ...] = ()
                key = _section_key(spec.key)
                if key == "optimizer":
                    leading = ([torch.zeros(1, requires_grad=True)],)
                args = {k: v for k, v in spec.args.items() if not _is_expression(v)}
                probe = ComponentSpec(
                    name=spec.name, path=None, args=args, key=spec.key, file=spec.file
                )
                _bind_loosely(probe, factory, leading)
        except ConfigError as exc:
            problems.append(exc)
    return problems


def _is_expression(value: Any) -> bool:
    """A lambda, as the site policy's one predicate finds it (``$`` strings are a bundle's
    syntax, not this form's)."""
    return components.is_expression(value) and not str(value).lstrip().startswith("$")


def _bind_loosely(
    spec: ComponentSpec, factory: Callable[..., Any], leading: tuple[Any, ...]
) -> None:
    """Unknown arguments are problems; missing ones may be what the form injects."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in spec.args:
        if name not in params:
            known = [n for n in params if n != "self"]
            import difflib  # deferred: only for a message

            hint = difflib.get_close_matches(name, known, n=1)
            raise TrainConfigError(
                spec.file or Path("<config>"),
                f"{spec.key}.args.{name}",
                f"{spec.label} takes no argument {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; it accepts {', '.join(known)}",
            )


# -- building ----------------------------------------------------------------------------------


def _active(parts: list[Part], rank: int) -> list[Part]:
    return [p for p in parts if not p.disabled and (p.rank is None or p.rank == rank)]


def _transforms(parts: list[Part], rank: int, train_built: dict[str, Any]) -> Any:
    from monai.transforms import Compose  # deferred: MONAI is an extra

    built = []
    for part in _active(parts, rank):
        if part.ref is not None:
            built.append(train_built[part.ref])
            continue
        transform = _build(part)
        train_built.setdefault(str(part.spec.name or part.spec.path), transform)
        built.append(transform)
    return Compose(built)


def _datalist(part: Part, environment: MMAREnvironment | None, default_key: str) -> list[Any]:
    from monai.data import load_decathlon_datalist  # deferred: MONAI is an extra

    file = part.spec.file or Path("<config>")
    listed = part.extra.get("data_list_file_path")
    if listed is None:
        raise TrainConfigError(
            file,
            f"{part.key}.data_list_file_path",
            'missing: a Clara dataset names its datalist (e.g. "{DATASET_JSON}")',
        )
    mmar = file.parent.parent
    path = Path(listed) if Path(listed).is_absolute() else mmar / listed
    base = part.extra.get("data_file_base_dir")
    base_dir = Path(base) if base else path.parent
    if not base_dir.is_absolute():
        base_dir = mmar / base_dir
    key = part.extra.get("data_list_key", default_key)
    if not path.is_file():
        raise TrainConfigError(
            file,
            f"{part.key}.data_list_file_path",
            f"the datalist {path} does not exist on this site; set DATASET_JSON (and DATA_ROOT) "
            "for this site in its local/environment.json",
        )
    try:
        items = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(base_dir))
    except TypeError as exc:
        raise TrainConfigError(
            file,
            f"{part.key}.data_list_file_path",
            f"the datalist {path} {key!r}: {exc}; Clara's datalist items are objects like "
            '{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}',
        ) from exc
    except (ValueError, KeyError, OSError) as exc:
        raise TrainConfigError(
            file, f"{part.key}.data_list_key", f"cannot read key {key!r} of {path}: {exc}"
        ) from exc
    if not items:
        raise TrainConfigError(file, f"{part.key}.data_list_key", f"{path} lists no {key!r} items")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TrainConfigError(
                file,
                f"{part.key}.data_list_file_path",
                f"{path} {key}[{i}] is {type(item).__name__}; Clara's datalist items are "
                'objects like {"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}',
            )
    return items


def _pick(*keys: str) -> Any:
    """What Clara's handlers read from an engine's output by default (MONAI now decollates a
    batch into a list of dicts: ``from_engine`` reads either form)."""
    from monai.handlers import from_engine  # deferred: MONAI is an extra

    return from_engine(list(keys), first=len(keys) == 1)


def _metrics(parts: list[Part], rank: int) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(key metric, additional metrics, key metric's name) by ``log_label``."""
    key: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    active = _active(parts, rank)
    chosen = next((p for p in active if p.extra.get("is_key_metric") is True), None)
    if chosen is None and active:
        chosen = active[0]
    for part in active:
        name = str(part.extra.get("log_label") or part.spec.name or part.spec.path)
        (key if part is chosen else extra)[name] = _build(
            part, output_transform=_pick("pred", "label")
        )
    return key, extra, next(iter(key), None)


def build_clara_model(config: ClaraConfig) -> torch.nn.Module:
    """The network alone (seeded as for training): a server's initial model, without data."""
    require_monai(config.file, "train.model")
    with torch.random.fork_rng(devices=[]):
        if config.seed is not None:
            torch.manual_seed(config.seed)
        network = _build(config.train["model"])
    if not isinstance(network, torch.nn.Module):
        raise TrainConfigError(config.file, "train.model", "expected a torch.nn.Module")
    return network


def build_clara_trainer(
    config: ClaraConfig,
    *,
    site_name: str,
    local_epochs: int | None,
    steps_aggregation: int,
    on_progress: Callable[[int, int, int, float], None] | None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    device: torch.device,
    ckpt_dir: Path,
    eval_dir: Path,
    rank: int = 0,
) -> ClaraMonaiTrainer:
    """Builds MONAI's trainer and evaluator from a checked Clara config.

    Raises:
        TrainConfigError: MONAI is missing, a component is unknown or rejects its arguments, or
            the data is not where the config says.
    """
    require_monai(config.file, "train")
    from monai.utils import set_determinism  # deferred: MONAI is an extra

    _WRITE_ROOTS.set((ckpt_dir, eval_dir))

    train, validate = config.train, config.validate
    if config.seed is not None:
        set_determinism(seed=config.seed)
    amp = config.amp
    if amp and device.type != "cuda":
        log.info("%s: amp is true, but this site trains on %s: amp is off", config.file, device)
        amp = False
    network = _build(train["model"]).to(device)
    if not isinstance(network, torch.nn.Module):
        raise TrainConfigError(config.file, "train.model", "expected a torch.nn.Module")
    loss = _build(train["loss"])
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device)
    optimizer = _build(train["optimizer"], network.parameters())
    scheduler = _build(train["lr_scheduler"], optimizer) if "lr_scheduler" in train else None
    built: dict[str, Any] = {}
    train_transforms = _transforms(train.get("pre_transforms", []), rank, built)
    val_transforms = _transforms(validate.get("pre_transforms", []), rank, built)

    def loader(section: dict[str, Any], transforms: Any, default_key: str) -> Any:
        part = section["dataset"]
        items = _datalist(part, config.environment, default_key)
        dataset = _build(part, data=items, transform=transforms)
        if len(dataset) == 0:
            raise TrainConfigError(config.file, part.key, "the dataset has no samples")
        return _build(section["dataloader"], dataset)

    train_loader = loader(train, train_transforms, "training")
    val_loader = loader(validate, val_transforms, "validation")
    post_built: dict[str, Any] = {}
    train_post = _transforms(train.get("post_transforms", []), rank, post_built)
    val_post = _transforms(validate.get("post_transforms", []), rank, post_built)
    train_key, train_more, _ = _metrics(train.get("metrics", []), rank)
    val_key, val_more, key_name = _metrics(validate.get("metrics", []), rank)
    if key_name is None:
        raise TrainConfigError(config.file, "validate.metrics", "names no metric")
    train_inferer = _build(train["inferer"]) if "inferer" in train else None
    val_inferer = _build(validate["inferer"]) if "inferer" in validate else None
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}
    val_handlers = [
        _handler(p, objects, None, scheduler, ckpt_dir)
        for p in _active(validate.get("handlers", []), rank)
    ]
    evaluator = _build(
        validate["evaluator"],
        device=device,
        val_data_loader=val_loader,
        network=network,
        inferer=val_inferer,
        postprocessing=val_post,
        key_val_metric=val_key,
        additional_metrics=val_more or None,
        val_handlers=[h for h in val_handlers if h is not None] or None,
        amp=amp,
    )
    train_handlers = []
    for part in _active(train.get("handlers", []), rank):
        if part.spec.name in _DROPPED_TRAIN_HANDLERS:
            log.warning(
                "%s %s: %s is not used in federated training: each round starts from the "
                "global model",
                config.file,
                part.key,
                part.spec.name,
            )
            continue
        handler = _handler(part, objects, evaluator, scheduler, ckpt_dir)
        if handler is not None:
            train_handlers.append(handler)
    trainer = _build(
        train["trainer"],
        device=device,
        max_epochs=config.epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        inferer=train_inferer,
        postprocessing=train_post,
        key_train_metric=train_key or None,
        additional_metrics=train_more or None,
        train_handlers=train_handlers or None,
        amp=amp,
    )
    return ClaraMonaiTrainer(
        config=config,
        site_name=site_name,
        network=network,
        trainer=trainer,
        evaluator=evaluator,
        key_metric=key_name,
        device=device,
        local_epochs=local_epochs if local_epochs is not None else config.epochs,
        steps_aggregation=steps_aggregation,
        on_progress=on_progress,
        on_epoch_end=on_epoch_end,
        ckpt_dir=ckpt_dir,
        eval_dir=eval_dir,
    )


def _handler(
    part: Part, objects: dict[str, Any], evaluator: Any, scheduler: Any, ckpt_dir: Path
) -> Any:
    """A handler, with what Clara injected: the validator, the scheduler, the save dict."""
    args = dict(part.spec.args)
    name = part.spec.name
    injected: dict[str, Any] = {}
    if name == "ValidationHandler":
        injected["validator"] = evaluator
    if name == "LrScheduleHandler":
        if scheduler is None:
            raise TrainConfigError(
                part.spec.file or Path("<config>"),
                part.key,
                "LrScheduleHandler needs train.lr_scheduler",
            )
        injected["lr_scheduler"] = scheduler
    for key in ("save_dict", "load_dict"):
        if isinstance(args.get(key), list):  # Clara: a list of names of the objects to save
            names = args.pop(key)
            unknown = [n for n in names if n not in objects and n != "train_conf"]
            if unknown:
                raise TrainConfigError(
                    part.spec.file or Path("<config>"),
                    f"{part.key}.args.{key}",
                    f"unknown object {unknown[0]!r}; can save {', '.join(objects)}",
                )
            injected[key] = {n: objects[n] for n in names if objects.get(n) is not None}
    if name in ("StatsHandler", "TensorBoardStatsHandler") and "output_transform" not in args:
        injected["output_transform"] = _pick("loss")
    if name == "TensorBoardStatsHandler":
        # MONAI's default ./runs is the worker's working folder: the MMAR's eval/ instead
        mmar = (part.spec.file or Path("config/x")).parent.parent
        args.setdefault("log_dir", str(mmar / "eval" / "tensorboard"))
    if name == "CheckpointSaver":
        args.setdefault("save_dir", str(ckpt_dir))
        injected.setdefault("save_dict", {"model": objects["model"]})
    spec = ComponentSpec(
        name=part.spec.name, path=part.spec.path, args=args, key=part.key, file=part.spec.file
    )
    return _build(Part(spec=spec), **injected)


# -- the trainer -------------------------------------------------------------------------------


class ClaraMonaiTrainer(TrainerFacts):
    """One site's MONAI trainer and evaluator, with the operations a federated round needs.

    The same interface as the torch fitter (``engine.training.fitter.Fitter``); build it with
    :func:`build_clara_trainer`.
    """

    def __init__(
        self,
        *,
        config: ClaraConfig,
        site_name: str,
        network: torch.nn.Module,
        trainer: Any,
        evaluator: Any,
        key_metric: str,
        device: torch.device,
        local_epochs: int,
        steps_aggregation: int,
        on_progress: Callable[[int, int, int, float], None] | None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None,
        ckpt_dir: Path,
        eval_dir: Path,
    ) -> None:
        from ignite.engine import Events  # deferred: ignite comes with the monai extra

        self.config = config
        self.site_name = site_name
        self.device = device
        self.local_epochs = local_epochs
        self.steps_aggregation = steps_aggregation
        self.eval_dir = eval_dir
        self._network = network
        self._trainer = trainer
        self._evaluator = evaluator
        self._metric = key_metric
        self._best = BestModel(ckpt_dir, higher_is_better(key_metric))
        self._on_progress = on_progress
        self._on_epoch_end = on_epoch_end
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._aborted = False
        self._n_iter = 0
        self._rounds = 0
        self._last_report = -math.inf
        self._loss_sum = 0.0
        self._loss_n = 0
        self._epoch = 0
        self.rank = 0
        self.world_size = 1
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._after_step)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._after_epoch)

    # -- facts --------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self._network

    @property
    def metric_name(self) -> str:
        """The key validation metric (its ``log_label``, e.g. ``val_mean_dice``)."""
        return self._metric

    @property
    def higher_is_better(self) -> bool:
        return self._best.higher_is_better

    @property
    def steps_per_round(self) -> int:
        if self.steps_aggregation > 0:
            return self.steps_aggregation
        return self.local_epochs * self._epoch_length()

    def _epoch_length(self) -> int:
        length = getattr(self._trainer.state, "epoch_length", None)
        return int(length or len(self._trainer.data_loader))

    # -- weights ------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        with self._lock:
            return to_numpy(self._network.state_dict())

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            load_weights(self._network, weights)

    def best_weights(self) -> dict[str, np.ndarray] | None:
        with self._lock:
            return self._best.weights()

    def enable_distributed(self, rank: int, world_size: int) -> None:
        raise NotImplementedError(
            "multi-GPU training of Clara's MONAI form is not supported here yet; "
            "start this MMAR on one GPU (start, not start_mgpu)"
        )

    def broadcast_weights(self, src: int = 0) -> None:
        self.enable_distributed(0, 1)

    # -- training -----------------------------------------------------------------------------

    def abort(self) -> None:
        """Stops a running :meth:`train` at its next iteration (or the next round's first)."""
        self._abort.set()

    def train(self) -> int:
        """One local round from the model's current weights; returns the iterations run.

        Raises:
            TrainingAborted: :meth:`abort` was called.
            FloatingPointError: the training loss became NaN or infinite.
        """
        with self._lock:
            self._rounds += 1
            self._n_iter = 0
            self._aborted = False
            self._epoch = 0
            if self._abort.is_set():
                self._abort.clear()
                raise TrainingAborted(
                    f"training aborted on site {self.site_name!r} before it began"
                )
            state = self._trainer.state
            # A fresh run each round (ignite resumes a run that has not reached its end).
            state.iteration = 0
            state.epoch = 0
            if self.steps_aggregation > 0:
                state.epoch_length = self.steps_aggregation
                state.max_epochs = 1
            else:
                state.epoch_length = len(self._trainer.data_loader)
                state.max_epochs = self.local_epochs
            self._trainer.run()
            if self._aborted:
                raise TrainingAborted(
                    f"training aborted on site {self.site_name!r} after {self._n_iter} of "
                    f"{self.steps_per_round} steps"
                )
            if self._n_iter == 0:
                raise RuntimeError("the training dataset yielded no batches")
            return self._n_iter

    def _after_step(self, engine: Any) -> None:
        self._n_iter += 1
        loss = _loss_of(engine.state.output)
        if loss is not None:
            if not math.isfinite(loss):
                engine.terminate()
                raise FloatingPointError(
                    f"training loss is {loss} at step {self._n_iter}; the model diverged, try a "
                    f"lower learning rate in {self.config.file}"
                )
            self._loss_sum += loss
            self._loss_n += 1
        if self._abort.is_set():
            self._abort.clear()
            self._aborted = True
            engine.terminate()
            return
        total = self.steps_per_round
        now = time.monotonic()
        if self._on_progress is not None and (
            self._n_iter >= total or now - self._last_report >= _PROGRESS_PERIOD_S
        ):
            self._last_report = now
            mean = self._loss_sum / self._loss_n if self._loss_n else float("nan")
            self._on_progress(self._n_iter, total, engine.state.epoch, mean)

    def _after_epoch(self, engine: Any) -> None:
        self._epoch += 1
        metrics: dict[str, float] = {}
        if self._loss_n:
            metrics["train_loss"] = self._loss_sum / self._loss_n
        metrics.update(_floats(engine.state.metrics))
        self._loss_sum, self._loss_n = 0.0, 0
        if self._on_epoch_end is not None:
            self._on_epoch_end(self._epoch, metrics)

    # -- validation ---------------------------------------------------------------------------

    def validate(
        self, weights: Mapping[str, np.ndarray] | None = None, *, after_training: bool = True
    ) -> dict[str, float]:
        """The evaluator's metrics on this site's validation data (named by ``log_label``).

        With ``weights`` those are evaluated and the model is restored after. Without, the
        model's own; ``after_training``: it is what local training made and may become best.
        """
        with self._lock:
            if weights is None:
                metrics = self._evaluate()
                if after_training:
                    self._best.offer(metrics[self._metric], self._network.state_dict())
                self._save_metrics(metrics)
                return metrics
            tensors = checked_tensors(self._network.state_dict(), weights)
            kept = {k: v.detach().clone() for k, v in self._network.state_dict().items()}
            try:
                load_weights(self._network, {k: t for k, t in tensors.items()})
                return self._evaluate()
            finally:
                with torch.no_grad():
                    state = self._network.state_dict()
                    for name, tensor in kept.items():
                        state[name].copy_(tensor)

    def _evaluate(self) -> dict[str, float]:
        evaluator = self._evaluator
        evaluator.state.iteration = 0
        evaluator.state.epoch = 0
        evaluator.state.max_epochs = 1
        evaluator.run()
        metrics = _floats(evaluator.state.metrics)
        if self._metric not in metrics:
            raise TrainConfigError(
                self.config.file,
                "validate.metrics",
                f"the key metric {self._metric!r} was not computed "
                f"(the evaluator reported {', '.join(metrics) or 'nothing'})",
            )
        return metrics

    def _save_metrics(self, metrics: Mapping[str, float]) -> None:
        save_validation_metrics(
            self.eval_dir,
            site=self.site_name,
            metric=self._metric,
            metrics=metrics,
            best_metric=self._best.metric,
            local_rounds=self._rounds,
        )


def _loss_of(output: Any) -> float | None:
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, Mapping) and "loss" in output:
        value = output["loss"]
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    return None


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out
