"""The one builder of ``{"name"|"path", "args"}`` config components, for every config file.

Privacy protocols, data processors (``config_fed_client.json``) and the model, data, loss and
optimizer (``config_train.json``) are all built here: a ``name`` is looked up among the built-ins
of its kind (then in a fallback, e.g. ``torch.nn``), a ``path`` is imported with the MMAR's
``custom/`` first on ``sys.path`` (as Clara put ``custom/`` on ``PYTHONPATH``). Every failure is
a ConfigError (or the subclass the caller asks for) naming the file, the key and what is
expected. TensorFlow-only components are refused by name before anything is imported.

The site policy's code rules live here too, for every config and builder: what counts as the
MMAR's own code (``own_code``, ``code_in_config``: a ``path`` outside the site's trusted
packages, or into one of their denied entry points, ``denied_callable``), what counts as a
config expression (``is_expression``, ``expression_in_config``), and the process-wide gate a
training worker sets from its site's policy (``set_code_policy``), which ``resolve_component``,
``check_expression`` and ``check_config_code`` apply.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import clara_compat
from engine.config import ComponentSpec, ConfigError, clara_base, refusal

__all__ = [
    "DEFAULT_TRUSTED_PACKAGES",
    "DENIED_CALLABLES",
    "CodePolicy",
    "Fallback",
    "bind_arguments",
    "build_component",
    "check_config_code",
    "check_expression",
    "code_at",
    "code_in_config",
    "denied_callable",
    "expression_in_config",
    "import_path",
    "is_expression",
    "is_installed",
    "missing_module",
    "own_code",
    "resolve_component",
    "set_code_policy",
    "shorten",
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


#: Top-level packages a site trusts by default (``trusted_packages`` of its site policy): a
#: ``path`` into one of them, installed and not shadowed, is a library's code, not the MMAR's.
DEFAULT_TRUSTED_PACKAGES: tuple[str, ...] = ("torch", "monai", "ignite", "numpy")

# Callables of trusted packages that still run code the MMAR chooses: they fetch or unpickle
# code (torch.hub, torch.load, torch.package, numpy.load with pickles), compile and load native
# code (cpp_extension, ops, ctypeslib, f2py), start processes or launchers, or read a config
# whose expressions they evaluate (monai.bundle, monai.fl, auto3dseg). A path at or under one
# of these is the MMAR's code, as is its home module once imported. Not complete: a deny-list
# names what is known, and a trusted package's ordinary components still read and write the
# files and folders their arguments name.
DENIED_CALLABLES: tuple[str, ...] = (
    "torch.hub",
    "torch.load",
    "torch.serialization",
    "torch.package",
    "torch.jit",
    "torch.utils.cpp_extension",
    "torch.utils.collect_env",
    "torch.utils.model_zoo",
    "torch.utils.benchmark",
    "torch.ops",
    "torch.classes",
    "torch.library",
    "torch.fx",
    "torch.compile",
    "torch.compiler",
    "torch.export",
    "torch.onnx",
    "torch.distributed.run",
    "torch.distributed.launch",
    "torch.distributed.launcher",
    "torch.distributed.elastic",
    "torch.distributed.rpc",
    "torch.multiprocessing",
    "torch.testing",
    "numpy.load",
    "numpy.lib.npyio",
    "numpy.lib.format",
    "numpy.ctypeslib",
    "numpy.distutils",
    "numpy.f2py",
    "numpy.testing",
    "monai.bundle",
    "monai.fl",
    "monai.apps.auto3dseg",
    "monai.apps.nnunet",
    "monai.apps.mmars",
    "monai.apps.utils",
    "monai.auto3dseg",
    "monai.utils.module",
    "ignite.distributed",
)
# Names that run code wherever they live (any part of a dotted path, lower case), and the
# beginnings and pieces of such names.
_DENIED_WORDS = frozenset(
    {
        "eval",
        "exec",
        "execfile",
        "compile",
        "system",
        "popen",
        "spawn",
        "run",
        "call",
        "load",
        "loads",
        "import_module",
        "instantiate",
        "locate",
        "optional_import",
        "getattr",
        "breakpoint",
        "download",
        "create_workflow",
    }
)
_DENIED_STARTS = ("run_", "exec_", "eval_", "load_", "download", "spawn", "popen")
_DENIED_PIECES = ("subprocess", "pickle", "popen")
# MONAI bundles name components by bare class name ("_target_": "UNet"), looked up among the
# loaded monai modules: these bare names are the denied modules' entry points.
_DENIED_BARE_NAMES = frozenset(
    {
        "ConfigParser",
        "ConfigWorkflow",
        "BundleWorkflow",
        "PythonicWorkflow",
        "ConfigItem",
        "ConfigComponent",
        "ConfigExpression",
        "ReferenceResolver",
        "ComponentLocator",
        "MonaiAlgo",
        "MonaiAlgoStats",
        "BaseMonaiAlgo",
        "AutoRunner",
        "BundleGen",
        "EnsembleRunner",
        "DataAnalyzer",
        "nnUNetV2Runner",
    }
)
# Arguments that turn a loader into one that unpickles (runs code) or asks the debugger, and the
# one value of each that is safe; any other value (a placeholder too) counts as code.
_SAFE_ARGS: dict[str, tuple[Any, ...]] = {
    "allow_pickle": (False, None),
    "weights_only": (True, None),
    "trust_repo": (False, None),
    "trust_remote_code": (False, None),
    "_debug_": (False, None),
}
# A dotted import path as it may be written: ASCII identifiers, at least module.attr.
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LAMBDA = re.compile(r"lambda(?![A-Za-z0-9_])")


# What this process's components and configs may run: None until a process that runs one site's
# training (the worker) says, from that site's policy (set_code_policy).
_code_policy: CodePolicy | None = None


def denied_callable(dotted: str) -> str | None:
    """Why a dotted name under a trusted package still counts as code, or None.

    The rules (``DENIED_CALLABLES`` and the names that run code wherever they live: ``eval``,
    ``exec``, ``run``/``run_*``, ``load``/``load_*``, ``subprocess``, ``pickle``, ...) are a
    deny-list of what is known to run code the MMAR chooses; they are not complete.
    """
    for prefix in DENIED_CALLABLES:
        if dotted == prefix or dotted.startswith(prefix + "."):
            return f"{prefix} runs code it fetches, unpickles, compiles or reads from a config"
    for part in dotted.split("."):
        word = part.lower()
        if (
            word in _DENIED_WORDS
            or word.startswith(_DENIED_STARTS)
            or any(piece in word for piece in _DENIED_PIECES)
        ):
            return f"{part!r} is a name that runs code (eval, exec, run, load, subprocess, ...)"
    return None


def _unsafe_arg(args: Any) -> tuple[str, Any] | None:
    """The first argument of an ``args`` object that makes a loader run code, or None."""
    if not isinstance(args, dict):
        return None
    for name, safe in _SAFE_ARGS.items():
        if name in args and not any(args[name] is s for s in safe):
            return name, args[name]
    if args.get("_mode_", "default") not in ("default", "callable"):
        return "_mode_", args["_mode_"]
    return None


def _policy_trusted(trusted: Iterable[str] | None) -> tuple[str, ...]:
    if trusted is not None:
        return tuple(trusted)
    return _code_policy.trusted if _code_policy is not None else DEFAULT_TRUSTED_PACKAGES


def _installed_spec(top: str) -> Any:
    """The spec of installed package ``top`` (site-packages and the like), found without
    importing it and without the MMARs' custom/ folders or the working folder."""
    custom = {c.resolve() for c in _custom_dirs}
    search = [p for p in sys.path if p and Path(p).resolve() not in custom]
    try:
        return importlib.machinery.PathFinder.find_spec(top, search)
    except (ImportError, ValueError):
        return None


def _where(spec: Any) -> tuple[str, ...]:
    if spec is None:
        return ()
    if spec.origin:
        return (str(Path(spec.origin).resolve()),)
    return tuple(str(Path(p).resolve()) for p in spec.submodule_search_locations or ())


def _shadowed_in(custom_dir: Path | None, top: str) -> bool:
    """Whether the MMAR's ``custom/`` holds a module or package named ``top``."""
    if custom_dir is None or not custom_dir.is_dir():
        return False
    try:
        return any(c.name == top or c.name.startswith(top + ".") for c in custom_dir.iterdir())
    except OSError:
        return True  # cannot tell: not trusted


def _library_problem(path: Any, trusted: Sequence[str], custom_dir: Path | None) -> str | None:
    """Why ``path`` does not name a callable of a trusted library, or None when it does.

    It must be written ``package.module.Name`` in ASCII identifiers with no private part, its
    top-level package trusted and installed, not shadowed by a module of the MMAR's
    ``custom_dir``, and not denied (``denied_callable``). Nothing is imported.
    """
    if not isinstance(path, str) or not _DOTTED.fullmatch(path):
        return "not a plain module.Name path"
    top = path.partition(".")[0]
    if top not in trusted:
        return "not in a trusted package"
    if any(part.startswith("_") for part in path.split(".")):
        return "a private name of a trusted package"
    denied = denied_callable(path)
    if denied:
        return denied
    if _shadowed_in(custom_dir, top):
        return f"the MMAR's custom/ holds its own {top!r}, which would be imported instead"
    if _installed_spec(top) is None:
        return f"{top!r} is not installed here"
    return None


def own_code(
    spec: ComponentSpec,
    *,
    trusted: Iterable[str] | None = None,
    custom_dir: Path | None = None,
) -> str | None:
    """The import path this component would run that is not one of ours, or None.

    The one rule for "may this component be imported" under a site policy without BYOC: a
    ``name`` is looked up among our built-ins (and torch classes by name) and never imports the
    MMAR's code; a Clara module path (``fed_learn.client.fed_privacy.SVTProtocol``) names one of
    our built-ins and is never imported (one we lack is refused by name); a path into a trusted
    package (``monai.networks.nets.UNet``: installed, not shadowed by the MMAR's ``custom/``,
    not on the deny-list, see ``denied_callable``) is a library's code. Every other ``path`` is
    code: a module under the MMAR's ``custom/`` or anything importable (``os.getpid``). So are
    arguments that make a loader unpickle (``allow_pickle``, ``weights_only: false``); for those
    the path and the argument are returned.

    Args:
        spec: the component.
        trusted: top-level package names the site trusts; default this process's policy's
            (``set_code_policy``), else ``DEFAULT_TRUSTED_PACKAGES``.
        custom_dir: the MMAR's ``custom/``, which must not shadow a trusted package.
    """
    unsafe = _unsafe_arg(spec.args)
    if unsafe is not None:
        return f"{spec.path or spec.name} with {unsafe[0]}={json.dumps(unsafe[1])}"
    if spec.path is None or clara_base(spec.path) is not None:
        return None
    if _library_problem(spec.path, _policy_trusted(trusted), custom_dir) is None:
        return None
    return spec.path


def _code_at(
    data: Any, key: str, trusted: Sequence[str], custom_dir: Path | None
) -> tuple[str, str, str] | None:
    """(key, what, why) of the first code in a parsed config, walking every object."""
    if isinstance(data, dict):
        unsafe = _unsafe_arg(data)
        if unsafe is not None:
            where = f"{key}.{unsafe[0]}" if key else unsafe[0]
            return where, f"{unsafe[0]}={json.dumps(unsafe[1])}", "makes a loader unpickle"
        if "path" in data:
            path = data["path"]
            clara = isinstance(path, str) and "name" not in data and clara_base(path) is not None
            if not clara and _library_problem(path, trusted, custom_dir) is not None:
                what = path if isinstance(path, str) else json.dumps(path)
                return (f"{key}.path" if key else "path"), what, _why(path, trusted, custom_dir)
        if "_target_" in data:
            # A MONAI bundle's component: a dotted path, or a bare name MONAI finds among its
            # own loaded modules (so a name of MONAI, when MONAI is trusted).
            target = data["_target_"]
            bare = isinstance(target, str) and _BARE.fullmatch(target)
            if bare:
                problem = _library_problem(f"monai.{target}", trusted, custom_dir)
                if problem is None and target in _DENIED_BARE_NAMES:
                    problem = f"MONAI's {target} runs code it reads from a config"
            else:
                problem = _library_problem(target, trusted, custom_dir)
            if problem is not None:
                what = target if isinstance(target, str) else json.dumps(target)
                where = f"{key}._target_" if key else "_target_"
                return where, what, f"names code ({problem})"
        items: list[tuple[str, Any]] = [
            (f"{key}.{k}" if key else str(k), v) for k, v in data.items()
        ]
    elif isinstance(data, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(data)]
    else:
        return None
    for where, value in items:
        found = _code_at(value, where, trusted, custom_dir)
        if found is not None:
            return found
    return None


def _why(path: Any, trusted: Sequence[str], custom_dir: Path | None) -> str:
    problem = _library_problem(path, trusted, custom_dir)
    if problem in (None, "not in a trusted package", "not a plain module.Name path"):
        return "names code by path"
    return f"names code by path ({problem})"


def code_in_config(
    data: Any, *, trusted: Iterable[str] | None = None, custom_dir: Path | None = None
) -> str | None:
    """The first component in a parsed JSON config that names code, or None.

    Walks every object at any depth (nested processors, sections, lists): an object with a
    ``"path"`` key is a component whose path is code unless it is a Clara module path alone
    (no ``"name"`` beside it: such a component is malformed and judged as code) or a path into
    a trusted package (``own_code``). A ``"path"`` that is not a string is code too, for the
    config check to name; so is a MONAI bundle's ``"_target_"`` outside the trusted packages,
    and an object that sets ``allow_pickle``, ``weights_only: false`` and the like (returned as
    ``name=value``). Nothing is imported.

    Args:
        data: the parsed config.
        trusted: as for ``own_code``.
        custom_dir: the MMAR's ``custom/``, which must not shadow a trusted package.
    """
    found = code_at(data, trusted=trusted, custom_dir=custom_dir)
    return found[1] if found is not None else None


def code_at(
    data: Any, *, trusted: Iterable[str] | None = None, custom_dir: Path | None = None
) -> tuple[str, str, str] | None:
    """``code_in_config`` with where and why: ``(key, what, why)``, e.g.
    ``("client.pre_processors[0].path", "os.system", "names code by path")``, or None."""
    return _code_at(data, "", _policy_trusted(trusted), custom_dir)


def is_expression(text: Any) -> bool:
    """Whether a config string is Python code: a ``lambda`` (``"lambda x: x['pred']"``, also
    inside opening parentheses) or, as MONAI bundles write them, a string starting with ``$``.

    ``"@name"`` references and ``"%file#key"`` macros are not expressions. Whoever evaluates a
    config string evaluates only what this says is an expression, and shows each one to
    ``check_expression`` first, so the deploy check and the training worker agree.
    """
    if not isinstance(text, str):
        return False
    stripped = text.lstrip()
    return stripped.startswith("$") or bool(_LAMBDA.match(stripped.lstrip("( \t\r\n")))


def expression_in_config(data: Any, key: str = "") -> tuple[str, str] | None:
    """``(key, expression)`` of the first Python expression in a parsed config, or None.

    The key is the dotted path of the value, ``train.metrics[0].args.output_transform``; an
    expression is what ``is_expression`` says is one. Nothing is evaluated.
    """
    if is_expression(data):
        return key, data
    if isinstance(data, dict):
        items: list[tuple[str, Any]] = [
            (f"{key}.{k}" if key else str(k), v) for k, v in data.items()
        ]
    elif isinstance(data, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(data)]
    else:
        return None
    for where, value in items:
        found = expression_in_config(value, where)
        if found is not None:
            return found
    return None


def shorten(text: str, limit: int = 60) -> str:
    """One line of at most ``limit`` characters, for a message."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class CodePolicy:
    """This process's code policy (``set_code_policy``).

    Attributes:
        allow_byoc: whether components may import the MMAR's code by path.
        source: where the policy came from, for refusals ("startup/site_policy.json").
        trusted: top-level packages a path may name without BYOC.
        allow_expressions: whether config expressions may be evaluated.
    """

    allow_byoc: bool
    source: str
    trusted: tuple[str, ...] = DEFAULT_TRUSTED_PACKAGES
    allow_expressions: bool = False


def set_code_policy(
    allow_byoc: bool,
    source: str,
    *,
    trusted: Iterable[str] = DEFAULT_TRUSTED_PACKAGES,
    allow_expressions: bool | None = None,
) -> None:
    """Says, for this whole process, which code its components and configs may run.

    A training worker runs one site's MMAR and calls this before building anything, from the
    site's policy: every later ``resolve_component`` then refuses a component that ``own_code``
    flags (or whose import would come from somewhere else than the installed trusted package,
    or whose imported object lives under a denied name), whichever config or builder it came
    through; and ``check_expression`` refuses config expressions unless they are allowed.
    A process that never calls this (tests, the in-process executor, whose deploy and start
    checks are the gate) gates nothing.

    Args:
        allow_byoc: the site policy's ``allow_byoc``.
        source: where the policy came from, for the refusal ("startup/site_policy.json").
        trusted: the site policy's ``trusted_packages``.
        allow_expressions: the site policy's ``allow_expressions``; None: as ``allow_byoc``.
    """
    global _code_policy
    _code_policy = CodePolicy(
        allow_byoc=bool(allow_byoc),
        source=source,
        trusted=tuple(str(t) for t in trusted),
        allow_expressions=bool(allow_byoc if allow_expressions is None else allow_expressions),
    )


def check_expression(key: str, text: str, file: Path | str | None) -> None:
    """The site policy's gate for one config expression, called just before evaluating it.

    Whoever evaluates a config string (an ``output_transform`` lambda, a bundle's ``"$..."``)
    calls this first with the string exactly as it will be evaluated; nothing is evaluated here.

    Args:
        key: where the string is, ``train.metrics[0].args.output_transform`` (or a bundle id).
        text: the expression.
        file: the config file it came from, for the message.

    Raises:
        ConfigError: this process's policy (``set_code_policy``) does not allow expressions;
            the text names the file, the key, the expression and the rule. A process that set
            no policy allows them (its deploy and start checks were the gate).
    """
    policy = _code_policy
    if policy is None or policy.allow_expressions:
        return
    raise ConfigError(
        file or Path("<config>"),
        key,
        f"refused by site policy ({policy.source}): {shorten(str(text))!r} is a Python "
        "expression and allow_expressions is false; nothing was evaluated",
    )


def check_config_code(data: Any, file: Path | str | None, custom_dir: Path | None = None) -> None:
    """The site policy's gate for a whole parsed config that something other than our builder
    instantiates (a MONAI bundle's ``ConfigParser``): its code by path or ``_target_`` and its
    expressions, under this process's policy (``set_code_policy``).

    Raises:
        ConfigError: naming the file, the key and the rule; nothing is imported or evaluated.
    """
    policy = _code_policy
    if policy is None:
        return
    where = file or Path("<config>")
    if not policy.allow_byoc:
        found = code_at(data, trusted=policy.trusted, custom_dir=custom_dir)
        if found is not None:
            raise ConfigError(
                where,
                found[0],
                f"refused by site policy ({policy.source}): {found[1]!r} {found[2]} and "
                "allow_byoc is false; nothing was imported",
            )
    expression = expression_in_config(data)
    if expression is not None:
        check_expression(expression[0], expression[1], file)


def _code_refusal(spec: ComponentSpec, custom_dir: Path | None) -> str | None:
    policy = _code_policy
    if policy is None or policy.allow_byoc:
        return None
    code = own_code(spec, trusted=policy.trusted, custom_dir=custom_dir)
    if code is not None:
        return (
            f"refused by site policy ({policy.source}): {code!r} names code by path and "
            "allow_byoc is false; nothing was imported"
        )
    if spec.path is None or clara_base(spec.path) is not None:
        return None
    # A trusted package's path: the module that an import would load now (the MMAR's custom/
    # goes first on sys.path, and the working folder is there too) must be the installed one.
    top = spec.path.partition(".")[0]
    installed = _where(_installed_spec(top))
    loaded = sys.modules.get(top)
    if loaded is not None:
        actual = _where(getattr(loaded, "__spec__", None))
    else:
        search = [str(custom_dir)] if custom_dir is not None and custom_dir.is_dir() else []
        try:
            actual = _where(importlib.machinery.PathFinder.find_spec(top, search + sys.path))
        except (ImportError, ValueError):
            actual = ()
    if actual and actual == installed:
        return None
    return (
        f"refused by site policy ({policy.source}): {spec.path!r} would import {top!r} from "
        f"{', '.join(actual) or 'nowhere'}, not the installed package "
        f"({', '.join(installed) or 'none'}); nothing was imported"
    )


def _home_refusal(obj: Any, spec: ComponentSpec, by_path: bool) -> str | None:
    """Under a policy without BYOC: why an imported object may not be used, or None. Its home
    (``__module__``) must be in a trusted package when it came by path, and never denied: an
    alias (``torch.utils.model_zoo.load_url`` is ``torch.hub``'s) is judged by what it is."""
    policy = _code_policy
    if policy is None or policy.allow_byoc:
        return None
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not module:
        return None  # no home to judge (a C function): the path was judged before the import
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "")
    home = f"{module}.{name}" if name else module
    if by_path and module.partition(".")[0] not in policy.trusted:
        why = f"is {home}, which is not in a trusted package"
    else:
        denied = denied_callable(home)
        if denied is None:
            return None
        why = f"is {home}: {denied}"
    return (
        f"refused by site policy ({policy.source}): {spec.label!r} {why}, and allow_byoc is false"
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
    why = refusal(spec) or _code_refusal(spec, custom_dir)
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
        why = _home_refusal(obj, spec, by_path=True)
        if why:
            raise _err(error, spec, "path", why)
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
            why = _home_refusal(obj, spec, by_path=False)
            if why:
                raise _err(error, spec, "name", why)
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
