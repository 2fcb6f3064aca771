"""Parsing and checking of an MMAR's ``config/config_train.json`` (no torch needed).

``{NAME}`` placeholders are filled from the MMAR's ``config/environment.json`` as Clara did
(``"{DATASET_JSON}"``, ``"{DATA_ROOT}"``, ``"{MMAR_CKPT_DIR}"``). A Clara 3.1 TensorFlow training
config (``train`` / ``validate`` sections) is refused, each TensorFlow component named with the
torch component that replaces it.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.config import (
    ComponentSpec,
    ConfigError,
    ConfigProblems,
    MMAREnvironment,
    local_environment_file,
    refusal,
)
from engine.config import load_environment as _load_environment
from engine.training.clara_config import (
    ClaraConfig,
    is_clara_pytorch,
    parse_clara_config,
    require_monai,
)
from engine.training.errors import TrainConfigError

__all__ = [
    "METRICS",
    "TRAIN_CONFIG",
    "ComponentSpec",
    "TrainConfig",
    "TrainConfigProblems",
    "bundle_layout_problems",
    "is_bundle",
    "load_train_config",
    "parse_train_config",
    "read_train_config",
    "train_config_problems",
]

#: Where the training config lives inside an MMAR.
TRAIN_CONFIG = Path("config") / "config_train.json"

#: Built-in validation metrics and whether a higher value is better.
METRICS: dict[str, bool] = {"accuracy": True, "loss": False}

_COMPONENT_KEYS = ("model", "train_data", "validation_data", "loss", "optimizer")
_TOP_KEYS = ("epochs", "batch_size", "seed", *_COMPONENT_KEYS, "validation")
_SPEC_KEYS = ("name", "path", "args")
_VALIDATION_KEYS = ("metric", "batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """A checked ``config_train.json``.

    Attributes:
        file: The file it was read from (for messages).
        epochs: Local epochs per round, unless the caller overrides them.
        batch_size: Training batch size.
        seed: Seed for weight initialisation, shuffling and dropout.
        model: The network.
        train_data: The site's training dataset.
        validation_data: The site's validation dataset.
        loss: The loss function (called as ``loss(output, target)``).
        optimizer: The optimizer (built with the model's parameters first).
        metric: The key validation metric; one of ``METRICS``.
        validation_batch_size: Batch size for validation.
        environment: The MMAR's ``environment.json`` variables (None: not read from an MMAR).
    """

    file: Path
    epochs: int
    batch_size: int
    seed: int
    model: ComponentSpec
    train_data: ComponentSpec
    validation_data: ComponentSpec
    loss: ComponentSpec
    optimizer: ComponentSpec
    metric: str
    validation_batch_size: int
    environment: MMAREnvironment | None = None


def is_bundle(mmar_root: str | Path) -> bool:
    """Whether the MMAR is (or carries at its root) a MONAI bundle: ``configs/train.json``
    (or ``.yaml`` / ``.yml``); cheap, nothing is imported."""
    root = Path(mmar_root)
    return any((root / "configs" / f"train{ext}").is_file() for ext in (".json", ".yaml", ".yml"))


def bundle_layout_problems(mmar_root: str | Path) -> list[ConfigError]:
    """What a bundle at the MMAR's root lacks to train here, found from its files alone (no
    torch, nothing evaluated): MONAI installed, ``train.trainer``, ``validate.evaluator``
    (in train.json or evaluate.json) and ``network_def``. YAML bundles are read by MONAI in
    the training worker."""
    root = Path(mmar_root)
    files = [root / "configs" / f"{stem}.json" for stem in ("train", "evaluate")]
    train = next(
        (
            root / "configs" / f"train{ext}"
            for ext in (".json", ".yaml", ".yml")
            if (root / "configs" / f"train{ext}").is_file()
        ),
        files[0],
    )
    try:
        require_monai(train, None)
    except TrainConfigError as exc:
        return [exc]
    if train.suffix != ".json":
        return []
    data: dict[str, Any] = {}
    for file in files:
        if not file.is_file():
            continue
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [TrainConfigError(file, None, f"cannot be read as JSON: {exc}")]
        if not isinstance(loaded, dict):
            return [TrainConfigError(file, None, "expected a JSON object at the top")]
        data.update(loaded)

    def has(key: str) -> bool:
        if key in data:  # MONAI's flat "train#trainer" form
            return True
        node: Any = data
        for part in key.split("#"):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    problems: list[ConfigError] = []
    for key, what in (
        ("train#trainer", "a SupervisedTrainer that trains the network"),
        ("validate#evaluator", "a SupervisedEvaluator with a key metric (train or evaluate.json)"),
    ):
        if not has(key):
            problems.append(
                TrainConfigError(train, key, f"missing: a bundle trained here needs {what}")
            )
    if not (has("network_def") or has("network")):
        problems.append(
            TrainConfigError(train, "network_def", "missing: the network (MONAI's bundle layout)")
        )
    return problems


def load_train_config(
    mmar_root: str | Path, environment: MMAREnvironment | None = None
) -> TrainConfig | ClaraConfig:
    """Read and check ``<mmar_root>/config/config_train.json``.

    Args:
        mmar_root: The MMAR folder.
        environment: Its ``environment.json`` (when None: read from the MMAR, with the site's
            ``local/environment.json`` over it for an MMAR in a site workspace).

    Returns:
        The checked config, its ``{NAME}`` placeholders filled in.

    Raises:
        TrainConfigError: The file is missing, is not JSON, or breaks the format (several
            problems: a ConfigProblems listing every one).
        ConfigError: ``environment.json`` is unusable.
    """
    return _strict(lambda sink: _load(Path(mmar_root), environment, sink))


def train_config_problems(mmar_root: str | Path) -> list[ConfigError]:
    """Every problem of an MMAR's ``config_train.json`` (and its placeholders); empty: none."""
    return read_train_config(mmar_root)[1]


def read_train_config(mmar_root: str | Path) -> tuple[list[ComponentSpec], list[ConfigError]]:
    """The components of ``config_train.json`` that parsed, and every problem of the file:
    for checks that go on past the first."""
    sink: list[ConfigError] = []
    specs: list[ComponentSpec] = []
    try:
        config = _load(Path(mmar_root), None, sink, specs)
    except ConfigError as exc:
        sink.extend(getattr(exc, "problems", [exc]))
        config = None
    if isinstance(config, ClaraConfig):
        from engine.training.clara_monai import check_clara_config  # deferred: torch, MONAI

        sink.extend(check_clara_config(config))
    return specs, sink


def _load(
    root: Path,
    environment: MMAREnvironment | None,
    sink: list[ConfigError],
    parsed: list[ComponentSpec] | None = None,
) -> TrainConfig | ClaraConfig | None:
    file = root / TRAIN_CONFIG
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(
            file, None, "file not found; an MMAR needs config/config_train.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainConfigError(file, None, f"cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainConfigError(
            file, None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if environment is None:
        # An MMAR in a site workspace: the site's own local/environment.json wins.
        environment = _load_environment(root, local_environment_file(root))
    if is_clara_pytorch(data):
        # Clara's PyTorch form (MONAI engines): its own sections and top-level variables.
        require_monai(file, "train")
        return parse_clara_config(data, file, environment, sink)
    data, undefined = environment.substitute(data, file)
    sink.extend(TrainConfigError(file, p.key, p.problem) for p in undefined)
    return _parse(data, file, environment, sink, parsed)


T = TypeVar("T")


class TrainConfigProblems(ConfigProblems, TrainConfigError):
    """Several problems of one ``config_train.json``; a TrainConfigError naming the first."""


def _strict(parse: Callable[[list[ConfigError]], T | None]) -> T:
    sink: list[ConfigError] = []
    result = None
    try:
        result = parse(sink)
    except ConfigError as exc:
        sink.append(exc)
    if sink:
        raise sink[0] if len(sink) == 1 else TrainConfigProblems(sink)
    assert result is not None  # a parse that found no problem returns its config
    return result


def parse_train_config(
    data: object, file: str | Path, environment: MMAREnvironment | None = None
) -> TrainConfig:
    """Check the decoded JSON of a training config.

    Args:
        data: The decoded JSON document (placeholders already filled in).
        file: The file it came from, for messages.
        environment: The MMAR's environment, kept with the config.

    Returns:
        The checked config.

    Raises:
        TrainConfigError: The document breaks the format (ConfigProblems: several problems).
    """
    return _strict(lambda sink: _parse(data, Path(file), environment, sink))


def _parse(
    data: object,
    file: Path,
    environment: MMAREnvironment | None,
    sink: list[ConfigError],
    parsed: list[ComponentSpec] | None = None,
) -> TrainConfig | None:
    top = _mapping(data, file, None, "a JSON object with the training settings")
    clara = _clara_tensorflow(top, file)
    if clara:
        sink.extend(clara)
        return None

    def attempt(fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except TrainConfigError as exc:
            sink.append(exc)
            return None

    sink.extend(_unknown_keys(top, _TOP_KEYS, file, None))
    epochs = attempt(lambda: _positive_int(top, "epochs", file))
    batch_size = attempt(lambda: _positive_int(top, "batch_size", file))
    seed = attempt(lambda: _int(top, "seed", file, default=0))
    specs: dict[str, ComponentSpec | None] = {}
    for key in _COMPONENT_KEYS:
        try:
            specs[key] = _component(top, key, file)
        except TrainConfigError as exc:
            sink.append(exc)
            specs[key] = None
    if parsed is not None:
        parsed.extend(spec for spec in specs.values() if spec is not None)
    metric = "accuracy"
    val_batch = batch_size
    validation = attempt(
        lambda: _mapping(
            top.get("validation", {}), file, "validation", 'an object like {"metric": "accuracy"}'
        )
    )
    if validation is not None:
        sink.extend(_unknown_keys(validation, _VALIDATION_KEYS, file, "validation"))
        metric = validation.get("metric", "accuracy")
        if not isinstance(metric, str) or metric not in METRICS:
            sink.append(
                TrainConfigError(
                    file,
                    "validation.metric",
                    f"expected one of {_choices(METRICS)}, got {metric!r}",
                )
            )
        if batch_size is not None:
            val_batch = attempt(
                lambda: _positive_int(
                    validation, "batch_size", file, default=batch_size, prefix="validation"
                )
            )
    if sink:
        return None
    return TrainConfig(
        file=file,
        epochs=epochs,  # type: ignore[arg-type]
        batch_size=batch_size,  # type: ignore[arg-type]
        seed=seed,  # type: ignore[arg-type]
        metric=metric,
        validation_batch_size=val_batch,  # type: ignore[arg-type]
        environment=environment,
        **specs,  # type: ignore[arg-type]
    )


# Sections of a Clara 3.1 (TensorFlow) config_train.json and what replaces each here.
_CLARA_TF_REPLACEMENTS = {
    "model": "model: a torch.nn.Module (a MONAI network such as UNet in Clara's PyTorch form, "
    "or MLP / a torch.nn class / your own under custom/ in the torch form)",
    "loss": "loss: a MONAI or torch.nn loss (e.g. DiceLoss, CrossEntropyLoss)",
    "optimizer": "optimizer: a torch.optim optimizer (e.g. SGD, Adam)",
    "image_pipeline": "dataset + dataloader with MONAI transforms in Clara's PyTorch form "
    "(CacheDataset with data_list_file_path), or train_data / validation_data in the torch form "
    '(e.g. DatalistDataset with "data_list_file_path": "{DATASET_JSON}")',
    "pre_transforms": "MONAI dictionary transforms (LoadImaged, EnsureChannelFirstd, ...) in "
    "Clara's PyTorch form",
    "post_transforms": "MONAI post transforms (Activationsd, AsDiscreted) in Clara's PyTorch form",
    "lr_policy": "lr_scheduler (e.g. StepLR) with an LrScheduleHandler in Clara's PyTorch form",
    "metrics": "MONAI metrics (e.g. MeanDice with log_label and is_key_metric) in Clara's "
    'PyTorch form, or validation.metric ("accuracy" or "loss") in the torch form',
    "inferer": "a MONAI inferer (SimpleInferer, SlidingWindowInferer) in Clara's PyTorch form, "
    "or the torch model's forward pass (the torch form runs it directly)",
    "trainer": "MONAI's SupervisedTrainer in Clara's PyTorch form",
}
_CLARA_TF_MARKERS = ("train", "validate", "learning_rate", "num_training_epoch_per_valid")


def _clara_tensorflow(top: Mapping[str, Any], file: Path) -> list[ConfigError]:
    """Problems naming each TensorFlow component of a Clara 3.1 config_train.json, or []."""
    if "model" in top or not any(k in top for k in _CLARA_TF_MARKERS):
        return []
    marker = next(k for k in _CLARA_TF_MARKERS if k in top)
    problems: list[ConfigError] = [
        TrainConfigError(
            file,
            marker,
            "a Clara 3.1 TensorFlow training config (train/validate sections); TensorFlow "
            "trainers cannot run here. Write it in Clara's PyTorch form (the same train/validate "
            "sections with MONAI components: README, Training with MONAI) or the torch form "
            f'({_choices(_TOP_KEYS)} as {{"name"|"path", "args"}} components)',
        )
    ]

    def component(value: Any, key: str, section: str) -> None:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if not isinstance(item, Mapping):
                continue
            label = item.get("name") or item.get("path") or "?"
            problems.append(
                TrainConfigError(
                    file,
                    where,
                    f"TensorFlow component {label!r} (Clara 3.1); use "
                    f"{_CLARA_TF_REPLACEMENTS[section]} instead",
                )
            )

    for section_name in ("train", "validate"):
        section = top.get(section_name)
        if not isinstance(section, Mapping):
            continue
        for key, value in section.items():
            if key in _CLARA_TF_REPLACEMENTS:
                component(value, f"{section_name}.{key}", key)
    if isinstance(top.get("trainer"), Mapping):
        component(top["trainer"], "trainer", "trainer")
    return problems


def _component(top: Mapping[str, Any], key: str, file: Path) -> ComponentSpec:
    expected = (
        'an object {"name": "<built-in>", "args": {...}} or {"path": "module.Class", "args": {...}}'
    )
    if key not in top:
        raise TrainConfigError(file, key, f"missing; expected {expected}")
    spec = _mapping(top[key], file, key, expected)
    for problem in _unknown_keys(spec, _SPEC_KEYS, file, key):
        raise problem
    has_name, has_path = "name" in spec, "path" in spec
    if has_name == has_path:
        raise TrainConfigError(
            file, key, f'give exactly one of "name" and "path"; expected {expected}'
        )
    which = "name" if has_name else "path"
    value = spec[which]
    if not isinstance(value, str) or not value.strip():
        raise TrainConfigError(
            file, f"{key}.{which}", f"expected a non-empty string, got {value!r}"
        )
    if which == "path" and ("." not in value or value.startswith(".") or value.endswith(".")):
        raise TrainConfigError(
            file, f"{key}.path", f'expected "module.Class" (a dotted import path), got {value!r}'
        )
    args = _mapping(spec.get("args", {}), file, f"{key}.args", "an object of keyword arguments")
    component = ComponentSpec(
        name=value if has_name else None,
        path=value if has_path else None,
        args=dict(args),
        key=key,
        file=file,
    )
    why = refusal(component)
    if why:
        raise TrainConfigError(file, f"{key}.{which}", why)
    return component


def _mapping(value: object, file: Path, key: str | None, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TrainConfigError(file, key, f"expected {expected}, got {_kind(value)}")
    return value


def _unknown_keys(
    obj: Mapping[str, Any], allowed: tuple[str, ...], file: Path, prefix: str | None
) -> list[ConfigError]:
    problems: list[ConfigError] = []
    for name in obj:
        if name not in allowed:
            key = f"{prefix}.{name}" if prefix else str(name)
            hint = difflib.get_close_matches(str(name), allowed, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                TrainConfigError(file, key, f"unknown key{also}; expected only {_choices(allowed)}")
            )
    return problems


def _int(obj: Mapping[str, Any], name: str, file: Path, *, default: int | None = None) -> int:
    if name not in obj and default is not None:
        return default
    if name not in obj:
        raise TrainConfigError(file, name, "missing; expected an integer")
    value = obj[name]
    # bool is an int subclass; "true" epochs is a typo, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainConfigError(file, name, f"expected an integer, got {value!r}")
    return value


def _positive_int(
    obj: Mapping[str, Any],
    name: str,
    file: Path,
    *,
    default: int | None = None,
    prefix: str | None = None,
) -> int:
    key = f"{prefix}.{name}" if prefix else name
    if name not in obj:
        if default is not None:
            return default
        raise TrainConfigError(file, key, "missing; expected a positive integer")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainConfigError(file, key, f"expected a positive integer, got {value!r}")
    return value


def _choices(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )
