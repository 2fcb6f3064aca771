"""The one builder of ``{"name"|"path", "args"}`` config components, for every config file.

Privacy protocols, data processors (``config_fed_client.json``) and the model, data, loss and
optimizer (``config_train.json``) are all built here: a ``name`` is looked up among the built-ins
of its kind (then in a fallback, e.g. ``torch.nn``), a ``path`` is imported with the MMAR's
``custom/`` first on ``sys.path`` (as Clara put ``custom/`` on ``PYTHONPATH``). Every failure is
a ConfigError (or the subclass the caller asks for) naming the file, the key and what is
expected. TensorFlow-only components are refused by name before anything is imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import inspect
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine import clara_compat
from engine.config import ComponentSpec, ConfigError, clara_base, refusal

__all__ = [
    "Fallback",
    "bind_arguments",
    "build_component",
    "code_in_config",
    "import_path",
    "is_installed",
    "missing_module",
    "own_code",
    "resolve_component",
    "set_code_policy",
]

#: ``fallback(name) -> (factory or None, names it knows, where it looked)``, e.g. ``torch.nn``.
Fallback = Callable[[str], tuple[Any, list[str], str]]

# Packages a Clara 3.1 custom module may import that do not exist here, and what to do instead.
_FOREIGN_PACKAGES = {
    "fed_learn": "a module of Clara's package that is not provided here (engine.clara_compat."
    "ALIASES lists those that are: fed_learn.client.fed_privacy, "
    "fed_learn.components.data_processor, ...)",
    "nvmidl": "Clara's TensorFlow training package; write the component with torch",
    "tensorflow": "TensorFlow components cannot run here; write the component with torch",
    "keras": "TensorFlow components cannot run here; write the component with torch",
    "horovod": "multi-GPU training here is torch.distributed (start_mgpu), not Horovod",
}

# custom/ folders this process has put on sys.path; a cached module loaded from one of them
# must not answer for another MMAR's custom/ code of the same name.
_custom_dirs: set[Path] = set()


# Whether this process may import the code a component names by path: None until a process that
# runs one site's training (the worker) says, from that site's policy (set_code_policy).
_code_policy: tuple[bool, str] | None = None


def own_code(spec: ComponentSpec) -> str | None:
    """The import path this component would run that is not one of ours, or None.

    The one rule for "may this component be imported" under a site policy without BYOC: a
    ``name`` is looked up among our built-ins (and torch classes by name) and never imports the
    MMAR's code; a Clara module path (``fed_learn.client.fed_privacy.SVTProtocol``) names one of
    our built-ins and is never imported (one we lack is refused by name). Every other ``path`` is
    code: a module under the MMAR's ``custom/`` or anything importable (``os.getpid``).
    """
    if spec.path is None or clara_base(spec.path) is not None:
        return None
    return spec.path


def code_in_config(data: Any) -> str | None:
    """The first component in a parsed JSON config that names code by path, or None.

    Walks every object at any depth (nested processors, sections, lists): an object with a
    ``"path"`` key is a component whose path is code unless it is a Clara module path alone
    (no ``"name"`` beside it: such a component is malformed and judged as code). A ``"path"``
    that is not a string is code too, for the config check to name; nothing is imported.
    """
    if isinstance(data, dict):
        if "path" in data:
            path = data["path"]
            clara = isinstance(path, str) and "name" not in data and clara_base(path) is not None
            if not clara:
                return path if isinstance(path, str) else json.dumps(path)
        values: list[Any] = list(data.values())
    elif isinstance(data, list):
        values = data
    else:
        return None
    for value in values:
        found = code_in_config(value)
        if found is not None:
            return found
    return None


def set_code_policy(allow: bool, source: str) -> None:
    """Says, for this whole process, whether components may import code by path.

    A training worker runs one site's MMAR and calls this before building anything, from the
    site's ``allow_byoc``: every later ``resolve_component`` then refuses a component that
    ``own_code`` flags, whichever config or builder it came through.

    Args:
        allow: the site policy's ``allow_byoc``.
        source: where the policy came from, for the refusal ("startup/site_policy.json").
    """
    global _code_policy
    _code_policy = (bool(allow), source)


def _code_refusal(spec: ComponentSpec) -> str | None:
    code = own_code(spec)
    if code is None or _code_policy is None or _code_policy[0]:
        return None
    return (
        f"refused by site policy ({_code_policy[1]}): {code!r} names code by path and "
        "allow_byoc is false; nothing was imported"
    )


def _err(error: type[ConfigError], spec: ComponentSpec, suffix: str, problem: str) -> ConfigError:
    key = f"{spec.key}.{suffix}" if spec.key and suffix else (spec.key or suffix)
    return error(spec.file or Path("<config>"), key, problem)


def import_path(dotted: str, custom_dir: Path | None = None) -> Any:
    """Imports ``module.attr`` with ``custom_dir`` (an MMAR's ``custom/``) first on sys.path.

    Raises:
        ImportError: not of the form ``module.attr``, the module cannot be imported (its own
            error is chained and named), or it has no such attribute.
    """
    module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{dotted!r} is not of the form module.Class")
    if custom_dir is not None and custom_dir.is_dir():
        custom_dir = custom_dir.resolve()
        _use_custom_dir(custom_dir, module_name)
    # Code written for Clara imports fed_learn.client.fed_privacy and the like: ours, aliased.
    clara_compat.install()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        hint = _FOREIGN_PACKAGES.get(top)
        where = f" (custom/ is {custom_dir})" if custom_dir is not None else ""
        if hint and top != module_name.partition(".")[0]:
            raise ImportError(
                f"module {module_name!r}{where} imports {exc.name!r}, which is not available "
                f"here: {hint}"
            ) from exc
        if hint:
            raise ImportError(f"{module_name!r} is not available here: {hint}") from exc
        raise ImportError(
            f"cannot import module {module_name!r}{where}: ModuleNotFoundError: {exc}"
        ) from exc
    except Exception as exc:  # any failure in user code is a bad component, not a crash
        where = f" (custom/ is {custom_dir})" if custom_dir is not None else ""
        raise ImportError(
            f"cannot import module {module_name!r}{where}: {type(exc).__name__}: {exc}"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise ImportError(
            f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}"
        )
    return obj


def is_installed(dotted: str) -> bool:
    """Whether module ``dotted`` is installed, found on disk without importing any of it."""
    top, *rest = dotted.split(".")
    # The installed packages only: not an MMAR's custom/ this process put on sys.path, and not
    # sys.modules (a site's module imported earlier is not "installed").
    custom = {c.resolve() for c in _custom_dirs}
    search = [p for p in sys.path if not p or Path(p).resolve() not in custom]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, search)  # nothing is imported
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = [Path(p) for p in (spec.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        packages = [loc / part for loc in locations if (loc / part).is_dir()]
        if packages:
            locations = packages
            continue
        return last and any(
            any(loc.glob(f"{part}.py")) or any(loc.glob(f"{part}.*.so")) for loc in locations
        )
    return True


def missing_module(path: str, custom_dir: Path | None) -> str | None:
    """Why the module of a ``"path"`` component cannot be found, or None; nothing is imported.

    It is found as a module or package under the MMAR's ``custom_dir``, or installed in this
    Python (``torch.nn.Linear``, MONAI, ...). Whether it may run is the site policy's question
    (``own_code``), not this one's.
    """
    dotted = path.rpartition(".")[0]
    module = dotted.replace(".", "/")
    if custom_dir is not None and (
        (custom_dir / f"{module}.py").is_file() or (custom_dir / module).is_dir()
    ):
        return None
    if is_installed(dotted):
        return None
    where = f"{custom_dir}" if custom_dir is not None else "the MMAR's custom/ (none here)"
    return f"no module {dotted!r} in {where}, nor installed in this Python"


def resolve_component(
    spec: ComponentSpec,
    builtins: Mapping[str, Any],
    kind: str,
    *,
    custom_dir: Path | None = None,
    fallback: Fallback | None = None,
    error: type[ConfigError] = ConfigError,
) -> Callable[..., Any]:
    """The class (or factory) a component names.

    Args:
        spec: the component; ``spec.file`` and ``spec.key`` name it in errors.
        builtins: name -> class, or name -> ``"module:attr"`` (imported on demand).
        kind: what it is, for messages ("privacy protocol", "component").
        custom_dir: the MMAR's ``custom/`` folder, for ``path`` components.
        fallback: where a ``name`` that is not a built-in is looked up next.
        error: the ConfigError subclass to raise.

    Raises:
        ConfigError: a TensorFlow-only or refused component, an unknown name, or a path that
            cannot be imported or is not callable.
    """
    why = refusal(spec) or _code_refusal(spec)
    if why:
        raise _err(error, spec, "name" if spec.name else "path", why)
    clara = clara_base(spec.path) if spec.path is not None else None
    if clara is not None:
        # Clara's own module path (fed_learn.client....): one of our built-ins, never an import
        # (the BYOC policy lets these through as not the MMAR's own code).
        if clara not in builtins:
            hint = difflib.get_close_matches(clara, list(builtins), n=1)
            raise _err(
                error,
                spec,
                "path",
                f"Clara component {clara!r} is not one we have built in"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; ours: {', '.join(sorted(builtins)) or 'none'}",
            )
        spec = ComponentSpec(name=clara, path=None, args=spec.args, key=spec.key, file=spec.file)
    if spec.path is not None:
        try:
            obj = import_path(spec.path, custom_dir)
        except ImportError as exc:
            raise _err(error, spec, "path", str(exc)) from exc
        if not callable(obj):
            raise _err(error, spec, "path", f"{spec.path!r} is not a class or factory function")
        return obj  # type: ignore[no-any-return]
    name = str(spec.name)
    if name in builtins:
        target = builtins[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        return target  # type: ignore[no-any-return]
    candidates = list(builtins)
    where = [f"our built-ins ({', '.join(sorted(builtins))})" if builtins else "our built-ins"]
    if fallback is not None:
        obj, known, place = fallback(name)
        if obj is not None:
            return obj  # type: ignore[no-any-return]
        candidates += known
        where.append(place)
    hint = difflib.get_close_matches(name, candidates, n=1)
    raise _err(
        error,
        spec,
        "name",
        f"unknown {kind} {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; looked in {' and '.join(where)}. For your own code use "
        '"path": "module.Class" with the module under the MMAR\'s custom/ folder',
    )


def bind_arguments(
    spec: ComponentSpec,
    factory: Callable[..., Any],
    *,
    leading: Sequence[Any] = (),
    context: Mapping[str, Any] | None = None,
    error: type[ConfigError] = ConfigError,
) -> dict[str, Any]:
    """The keyword arguments ``factory`` will get, checked against its signature.

    A constructor with a ``context`` parameter also gets ``context`` (unless args set it).

    Raises:
        ConfigError: an argument the factory does not take (named, with a close match), or a
            required one missing.
    """
    kwargs = dict(spec.args)
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some C-implemented callables have no signature
        signature = None
    if signature is None:
        return kwargs
    params = signature.parameters
    context_param = params.get("context")
    if (
        context is not None
        and "context" not in kwargs
        and context_param is not None
        and context_param.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ):
        kwargs["context"] = dict(context)
    # Binding first turns a misspelt argument into a message naming the exact key.
    try:
        signature.bind(*leading, **kwargs)
    except TypeError as exc:
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params]
        if unknown and not accepts_any:
            known = [
                n
                for n, p in params.items()
                if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ][len(leading) :]
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            raise _err(
                error,
                spec,
                f"args.{unknown[0]}",
                f"{spec.label} takes no argument {unknown[0]!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; it accepts {', '.join(known) or 'no arguments'}",
            ) from exc
        raise _err(error, spec, "args", f"{spec.label} rejected its arguments: {exc}") from exc
    return kwargs


def build_component(
    spec: ComponentSpec,
    builtins: Mapping[str, Any],
    kind: str,
    base: type | None = None,
    search_paths: Sequence[Path] | None = None,
    *,
    custom_dir: Path | None = None,
    context: Mapping[str, Any] | None = None,
    leading: Sequence[Any] = (),
    fallback: Fallback | None = None,
    error: type[ConfigError] = ConfigError,
) -> Any:
    """Resolves a component and calls it with ``*leading`` and its ``args``.

    Args:
        spec: the parsed component; ``spec.file`` and ``spec.key`` name it in errors.
        builtins: the names a ``"name"`` may take (see ``resolve_component``).
        kind: what it is, for messages ("privacy protocol", "data processor").
        base: when given, the class must derive from it.
        search_paths: the MMAR's ``custom/`` (its first entry), for ``"path"`` components.
        custom_dir: the same, by keyword (wins over ``search_paths``).
        context: passed to a constructor with a ``context`` parameter.
        leading: positional arguments before ``args`` (an optimizer's parameters).
        fallback: where a ``name`` that is not a built-in is looked up next.
        error: the ConfigError subclass to raise.

    Raises:
        ConfigError: unknown name, refused or TensorFlow-only component, import failure,
            wrong base class, or bad arguments (a ValueError with an ``arg`` attribute names
            ``<key>.args.<arg>``).
    """
    if custom_dir is None and search_paths:
        custom_dir = Path(search_paths[0])
    factory = resolve_component(
        spec, builtins, kind, custom_dir=custom_dir, fallback=fallback, error=error
    )
    if base is not None and not (isinstance(factory, type) and issubclass(factory, base)):
        raise _err(
            error,
            spec,
            "path" if spec.path else "name",
            f"{spec.label!r} is not a {base.__name__} (a {kind} must derive from "
            f"{base.__module__}.{base.__name__})",
        )
    kwargs = bind_arguments(spec, factory, leading=leading, context=context, error=error)
    try:
        return factory(*leading, **kwargs)
    except (TypeError, ValueError) as exc:
        # A component may say which argument was wrong (``exc.arg``): the key then names it.
        arg = getattr(exc, "arg", None)
        raise _err(
            error,
            spec,
            f"args.{arg}" if arg else "args",
            f"{spec.label} rejected its arguments: {exc}",
        ) from exc


def _use_custom_dir(custom_dir: Path, module_name: str) -> None:
    entry = str(custom_dir)
    # Clara puts custom/ on PYTHONPATH; first place so this MMAR's modules win over another
    # MMAR's custom/ that an earlier fitter in this process put there.
    if sys.path[:1] != [entry]:
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    _custom_dirs.add(custom_dir)
    # Files written since the last import (a freshly deployed MMAR) are otherwise invisible to
    # the path finders' directory caches.
    importlib.invalidate_caches()
    top = module_name.partition(".")[0]
    cached = sys.modules.get(top)
    if cached is None:
        return
    origin = _module_dir(cached)
    if origin is None or origin == custom_dir:
        return
    if any(origin == d or d in origin.parents for d in _custom_dirs if d != custom_dir):
        # Loaded from another MMAR's custom/: forget it so this MMAR's file is imported.
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def _module_dir(module: Any) -> Path | None:
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    # A package's __init__.py sits one level deeper than the sys.path entry.
    return path.parent.parent if path.name == "__init__.py" else path.parent
