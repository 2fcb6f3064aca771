"""Clara Train 3.1's import paths (``fed_learn.client.fed_privacy``, ...) as aliases of ours.

Code written for Clara (an MMAR's ``custom/`` privacy protocol or data processor) starts with
``from fed_learn.client.fed_privacy import PrivacyProtocol``. ``install()`` puts a finder first
on ``sys.meta_path`` that answers for the ``fed_learn`` package and the modules of it that the
lineage's API names (``ALIASES``): each is a thin module forwarding its public names to ours, so
the class imported is the very class our builders check for (a Clara subclass of
``PrivacyProtocol`` is ours). No ``fed_learn`` directory exists anywhere.

Any other ``fed_learn.*`` module is refused with a ModuleNotFoundError that lists the provided
ones; the finder stands first, so an MMAR's own ``custom/fed_learn/`` can never answer for
Clara's package. Nothing is imported until an alias is: installing costs no import of torch,
gRPC or numpy.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["ALIASES", "install", "installed", "uninstall"]

#: Clara module -> our module it forwards to (None: a package with nothing of its own). The
#: names are those the lineage's API and examples import from (``fed_learn.client.*`` of
#: fed_learn_client_api.txt, ``fed_learn.admin_defs.Message``, ``fed_learn.model_meta.FLContext``,
#: ``fed_learn.components.data_processor.DataProcessor``).
ALIASES: dict[str, str | None] = {
    "fed_learn": None,
    "fed_learn.client": "engine.client",
    "fed_learn.client.fed_privacy": "engine.privacy",
    "fed_learn.client.admin": "engine.client.admin",
    "fed_learn.client.client_status": "engine.status",
    "fed_learn.client.communicator": "engine.client.communicator",
    "fed_learn.client.data_assembler": "engine.client.data_assembler",
    "fed_learn.client.client_model_manager": "engine.client.model_manager",
    "fed_learn.client.fed_client_base": "engine.client.fed_client_base",
    "fed_learn.client.fed_client": "engine.client.fed_client",
    "fed_learn.client.client_executor": "engine.site.executor",
    "fed_learn.admin_defs": "engine.admin_defs",
    "fed_learn.model_meta": "engine.client.fl_context",
    "fed_learn.components": None,
    "fed_learn.components.data_processor": "engine.client.data_processors",
}
_PACKAGES = frozenset({"fed_learn", "fed_learn.client", "fed_learn.components"})
_ROOT = "fed_learn"

_lock = threading.Lock()


def _forwarder(module: types.ModuleType, target: types.ModuleType) -> Any:
    """The alias's module ``__getattr__`` (PEP 562): public names of ``target``, looked up on
    each access, so a lazily exported name (engine.client's) loads only when asked for."""

    def __getattr__(name: str) -> Any:
        if not name.startswith("_"):
            try:
                value = getattr(target, name)
            except AttributeError:
                pass
            else:
                # A submodule of ours is not Clara's: ``from fed_learn.client import admin``
                # must import the alias fed_learn.client.admin (or fail by Clara's name).
                if not isinstance(value, types.ModuleType):
                    return value
        raise AttributeError(
            f"module {module.__name__!r} (an alias of {target.__name__!r}) has no attribute "
            f"{name!r}"
        )

    return __getattr__


class _AliasLoader(importlib.abc.Loader):
    """Makes a Clara module a thin forwarder to one of ours."""

    def __init__(self, target: str | None) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module; exec_module fills it in

    def exec_module(self, module: types.ModuleType) -> None:
        if self.target is None:
            module.__doc__ = f"Clara's {module.__name__} package (aliases of fltui's engine)."
            vars(module)["__all__"] = []
            return
        target = importlib.import_module(self.target)
        names: Sequence[str] = getattr(target, "__all__", None) or [
            n for n in vars(target) if not n.startswith("_")
        ]
        module.__doc__ = f"Clara's {module.__name__}: an alias of {self.target}."
        # PEP 562: a module's own __getattr__ / __dir__ live in its namespace
        vars(module).update(
            __all__=list(names),
            __getattr__=_forwarder(module, target),
            __dir__=lambda: sorted(names),
        )


class _ClaraFinder(importlib.abc.MetaPathFinder):
    """Answers for ``fed_learn`` and every module under it (first on ``sys.meta_path``)."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ROOT and not fullname.startswith(_ROOT + "."):
            return None
        if fullname not in ALIASES:
            provided = ", ".join(n for n in ALIASES if ALIASES[n] is not None)
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: of Clara's fed_learn package only the modules "
                f"of its public API are provided here ({provided})",
                name=fullname,
            )
        return importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(ALIASES[fullname]), is_package=fullname in _PACKAGES
        )


_FINDER = _ClaraFinder()


def _ours(module: Any) -> bool:
    spec = getattr(module, "__spec__", None)
    return isinstance(getattr(spec, "loader", None), _AliasLoader)


def install() -> None:
    """Makes ``import fed_learn...`` (Clara's paths) import our aliases, in this process.

    Idempotent and cheap; call it before importing an MMAR's own code. A ``fed_learn`` module
    that something else loaded before (an MMAR's ``custom/fed_learn``) is forgotten, so that
    from now on Clara's names mean ours.
    """
    with _lock:
        if sys.meta_path[:1] != [_FINDER]:
            while _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)
            sys.meta_path.insert(0, _FINDER)
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            if not _ours(sys.modules[name]):
                del sys.modules[name]


def installed() -> bool:
    """Whether ``install()`` is in effect."""
    return _FINDER in sys.meta_path


def uninstall() -> None:
    """Removes the finder and the alias modules (tests)."""
    with _lock:
        while _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            if _ours(sys.modules[name]):
                del sys.modules[name]
