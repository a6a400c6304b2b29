"""Named registries of the project's plug-ins: tasks (``tasks/``), circuit backends and gradient
methods (``backends/``).

A plug-in is one module inside its package that registers itself when imported;
:func:`discover` imports every module of a package, so adding one means adding its file (no list
to edit elsewhere). The config validates names against the registries, and their error messages
list what is registered.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no plug-in registered; the message lists the registered names."""


class Registry(Generic[T]):
    """Name -> plug-in, in registration order. Registering a name twice is an error (two
    modules claiming one name would otherwise shadow each other silently)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(f"{name!r} is not a registered {self.kind}; allowed: {', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


#: Comma-separated modules imported after the built-in plug-ins: plug-ins kept outside this
#: repository (``QMLBENCH_PLUGINS=my_tasks.bandit``, with ``my_tasks`` on ``PYTHONPATH``). Workers
#: inherit it (Ray workers too: the Ray executor forwards ``QMLBENCH_*`` variables).
PLUGINS_ENV = "QMLBENCH_PLUGINS"


def load_external_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"{PLUGINS_ENV}: cannot import plug-in module {name!r}: {exc}") from exc


def discover(package: str) -> None:
    """Import every module of ``package`` (each registers what it defines)."""
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
