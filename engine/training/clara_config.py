"""Clara's PyTorch MMAR form of ``config/config_train.json``, parsed and checked (no torch).

The form (``../shared/reference/clara-lineage.md`` §4.5): top-level variables (``epochs``,
``learning_rate``, ``amp``, ``determinism: {random_seed}``, ...) and a ``train`` and a
``validate`` section of MONAI / torch / ignite components, each ``{"name"|"path", "args"}`` with
the form's own keys beside them (``disabled``, ``rank``, ``ref``, ``log_label``,
``is_key_metric``, and a dataset's ``data_list_file_path`` / ``data_file_base_dir`` /
``data_list_key``). ``"{name}"`` anywhere is replaced by the top-level variable of that name or by
an ``environment.json`` variable. Building it (MONAI's engines) is ``engine.training.clara_monai``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.config import ComponentSpec, ConfigError, MMAREnvironment
from engine.training.errors import TrainConfigError

__all__ = [
    "MONAI_EXTRA",
    "ClaraConfig",
    "Part",
    "is_clara_pytorch",
    "parse_clara_config",
    "require_monai",
]

#: What a site without MONAI installs to train these MMARs.
MONAI_EXTRA = "pip install 'fltui[monai]'"

#: Keys of a component of this form, beside ``name`` / ``path`` / ``args``.
_PART_KEYS = (
    "name",
    "path",
    "args",
    "disabled",
    "rank",
    "ref",
    "log_label",
    "is_key_metric",
    "data_list_file_path",
    "data_file_base_dir",
    "data_list_key",
)
# (key, a list?, required) per section.
_SECTIONS: dict[str, tuple[tuple[str, bool, bool], ...]] = {
    "train": (
        ("model", False, True),
        ("loss", False, True),
        ("optimizer", False, True),
        ("lr_scheduler", False, False),
        ("pre_transforms", True, False),
        ("dataset", False, True),
        ("dataloader", False, True),
        ("inferer", False, False),
        ("handlers", True, False),
        ("post_transforms", True, False),
        ("metrics", True, False),
        ("trainer", False, True),
    ),
    "validate": (
        ("pre_transforms", True, False),
        ("dataset", False, True),
        ("dataloader", False, True),
        ("inferer", False, False),
        ("handlers", True, False),
        ("post_transforms", True, False),
        ("metrics", True, True),
        ("evaluator", False, True),
    ),
}
# Keys that mark a Clara 3.1 TensorFlow train section (refused elsewhere, with replacements).
_TENSORFLOW_KEYS = ("image_pipeline", "lr_policy")
_TORCH_KEYS = ("trainer", "dataset", "dataloader", "evaluator")


def require_monai(file: Path, key: str | None = None) -> None:
    """Raises a TrainConfigError naming the extra when MONAI (or ignite) is not installed."""
    for module in ("monai", "ignite"):
        if importlib.util.find_spec(module) is None:
            raise TrainConfigError(
                file,
                key,
                f"this MMAR trains with MONAI, and {module!r} is not installed on this site: "
                f"install the extra with {MONAI_EXTRA}",
            )


def is_clara_pytorch(data: object) -> bool:
    """Whether a decoded ``config_train.json`` is Clara's PyTorch (MONAI) form."""
    if not isinstance(data, Mapping) or "model" in data:
        return False
    train = data.get("train")
    if not isinstance(train, Mapping) or any(k in train for k in _TENSORFLOW_KEYS):
        return False
    return any(k in train for k in _TORCH_KEYS)


@dataclass(frozen=True)
class Part:
    """One component of the form: the component and the form's keys beside it.

    Attributes:
        spec: ``name`` / ``path`` / ``args``, with its file and key (``train.handlers[2]``).
        disabled: the component is skipped (``"disabled": true``).
        rank: when not None, built only on that rank of a multi-GPU run.
        ref: a ``validate`` entry that reuses the ``train`` component of this name.
        extra: the form's other keys (``log_label``, ``is_key_metric``, datalist keys).
    """

    spec: ComponentSpec
    disabled: bool = False
    rank: int | None = None
    ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def label(self) -> str:
        return self.ref or self.spec.label


@dataclass(frozen=True)
class ClaraConfig:
    """A checked Clara PyTorch ``config_train.json``.

    Attributes:
        file: where it came from.
        variables: the top-level variables (``epochs``, ``learning_rate``, ``amp``,
            ``determinism.random_seed``, ...), after substitution.
        train: ``key -> Part`` or ``key -> [Part]`` of the train section.
        validate: the same for the validate section.
        environment: the MMAR's environment it was filled from.
    """

    file: Path
    variables: dict[str, Any]
    train: dict[str, Any]
    validate: dict[str, Any]
    environment: MMAREnvironment | None = None

    @property
    def epochs(self) -> int:
        value = self.variables.get("epochs", 1)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    @property
    def amp(self) -> bool:
        return self.variables.get("amp") is True

    @property
    def seed(self) -> int | None:
        value = self.variables.get("determinism.random_seed")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def parts(self) -> Iterator[Part]:
        """Every component of both sections, in file order."""
        for section in (self.train, self.validate):
            for value in section.values():
                yield from value if isinstance(value, list) else [value]

    def key_metric(self) -> Part | None:
        """The validate metric marked ``is_key_metric`` (else the first one)."""
        metrics = [p for p in self.validate.get("metrics", []) if not p.disabled]
        for part in metrics:
            if part.extra.get("is_key_metric") is True:
                return part
        return metrics[0] if metrics else None


def _variables(top: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level scalars, and those of top-level objects as ``object.key``."""
    out: dict[str, Any] = {}
    for name, value in top.items():
        if name in _SECTIONS:
            continue
        if isinstance(value, Mapping):
            for inner, v in value.items():
                if not isinstance(v, (Mapping, list)):
                    out[f"{name}.{inner}"] = v
        else:
            out[name] = value
    return out


def _flag(value: Any, file: Path, key: str, sink: list[ConfigError]) -> bool:
    """``disabled``: a boolean, or the strings "true" / "false" a substitution left."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    sink.append(TrainConfigError(file, key, f"expected true or false, got {value!r}"))
    return False


def _part(item: Any, file: Path, key: str, sink: list[ConfigError]) -> Part | None:
    if not isinstance(item, Mapping):
        sink.append(
            TrainConfigError(
                file, key, f'expected an object {{"name": ..., "args": {{...}}}}, got {item!r}'
            )
        )
        return None
    bad = [k for k in item if k not in _PART_KEYS]
    if bad:
        sink.append(
            TrainConfigError(
                file,
                f"{key}.{bad[0]}",
                f"unknown key {bad[0]!r}; a component of this form has {', '.join(_PART_KEYS)}",
            )
        )
    disabled = (
        _flag(item["disabled"], file, f"{key}.disabled", sink) if "disabled" in item else False
    )
    rank = item.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        sink.append(TrainConfigError(file, f"{key}.rank", f"expected a rank >= 0, got {rank!r}"))
        rank = None
    ref = item.get("ref")
    if ref is not None:
        if not isinstance(ref, str) or not ref or "name" in item or "path" in item:
            sink.append(
                TrainConfigError(
                    file,
                    f"{key}.ref",
                    'expected {"ref": "<name of a train component>"} alone, got '
                    + json.dumps(dict(item)),
                )
            )
            return None
        spec = ComponentSpec(name=ref, path=None, args={}, key=key, file=file)
        return Part(spec=spec, disabled=disabled, rank=rank, ref=ref)
    name, path = item.get("name"), item.get("path")
    if (name is None) == (path is None) or not isinstance(name or path, str) or not (name or path):
        sink.append(
            TrainConfigError(
                file,
                key,
                'expected exactly one of "name" (a MONAI, torch or ignite class) or "path" '
                f"(module.Class), a non-empty string; got {json.dumps(dict(item))[:200]}",
            )
        )
        return None
    args = item.get("args", {})
    if not isinstance(args, Mapping):
        sink.append(TrainConfigError(file, f"{key}.args", f"expected an object, got {args!r}"))
        return None
    extra = {k: item[k] for k in _PART_KEYS[6:] if k in item}
    for flag in ("is_key_metric",):
        if flag in extra and not isinstance(extra[flag], bool):
            sink.append(TrainConfigError(file, f"{key}.{flag}", "expected true or false"))
    if "log_label" in extra and (not isinstance(extra["log_label"], str) or not extra["log_label"]):
        sink.append(TrainConfigError(file, f"{key}.log_label", "expected a non-empty name"))
    spec = ComponentSpec(name=name, path=path, args=dict(args), key=key, file=file)
    return Part(spec=spec, disabled=disabled, rank=rank, extra=extra)


def _section(
    top: Mapping[str, Any], name: str, file: Path, sink: list[ConfigError]
) -> dict[str, Any]:
    section = top.get(name)
    if not isinstance(section, Mapping):
        sink.append(
            TrainConfigError(
                file,
                name,
                "missing; Clara's PyTorch form has a train and a validate section"
                if section is None
                else f"expected an object, got {section!r}",
            )
        )
        return {}
    known = {key for key, _, _ in _SECTIONS[name]}
    for key in section:
        if key not in known:
            sink.append(
                TrainConfigError(
                    file,
                    f"{name}.{key}",
                    f"unknown key {key!r}; the {name} section has {', '.join(sorted(known))}",
                )
            )
    out: dict[str, Any] = {}
    for key, many, required in _SECTIONS[name]:
        where = f"{name}.{key}"
        if key not in section:
            if required:
                sink.append(TrainConfigError(file, where, "missing"))
            continue
        value = section[key]
        if many:
            if not isinstance(value, list):
                sink.append(TrainConfigError(file, where, f"expected a list, got {value!r}"))
                continue
            parts = [_part(item, file, f"{where}[{i}]", sink) for i, item in enumerate(value)]
            out[key] = [p for p in parts if p is not None]
        else:
            part = _part(value, file, where, sink)
            if part is not None:
                out[key] = part
    return out


def parse_clara_config(
    data: Mapping[str, Any], file: Path, environment: MMAREnvironment, sink: list[ConfigError]
) -> ClaraConfig | None:
    """Checks Clara's PyTorch form; every problem goes to ``sink`` (None when there are any).

    ``{name}`` is filled from the top-level variables and ``environment`` (its variables win
    for the same name); an undefined upper-case name is a problem.
    """
    variables = _variables(data)
    filled = replace(environment, variables={**variables, **environment.variables})
    data, undefined = filled.substitute(dict(data), file)
    sink.extend(TrainConfigError(file, p.key, p.problem) for p in undefined)
    before = len(sink)
    train = _section(data, "train", file, sink)
    validate = _section(data, "validate", file, sink)
    for section, parts in (("train", train), ("validate", validate)):
        dataset = parts.get("dataset")
        if dataset is not None and dataset.ref is None:
            for key in ("data_list_file_path", "data_file_base_dir"):
                value = dataset.extra.get(key)
                if value is not None and not isinstance(value, str):
                    sink.append(
                        TrainConfigError(file, f"{section}.dataset.{key}", "expected a path")
                    )
    refs = {p.spec.name for k, v in train.items() for p in (v if isinstance(v, list) else [v])}
    for part in (p for v in validate.values() for p in (v if isinstance(v, list) else [v])):
        if part.ref is not None and part.ref not in refs:
            sink.append(
                TrainConfigError(
                    file,
                    f"{part.key}.ref",
                    f"no train component is named {part.ref!r}; "
                    f"train has {', '.join(sorted(n for n in refs if n)) or 'none'}",
                )
            )
    metrics = validate.get("metrics", [])
    keys = [p for p in metrics if p.extra.get("is_key_metric") is True]
    if len(keys) > 1:
        sink.append(
            TrainConfigError(
                file,
                keys[1].key + ".is_key_metric",
                f"only one validate metric can be the key metric ({keys[0].key} is already)",
            )
        )
    if len(sink) > before or sink:
        return None
    return ClaraConfig(
        file=file,
        variables={k: v for k, v in _variables(data).items()},
        train=train,
        validate=validate,
        environment=environment,
    )
