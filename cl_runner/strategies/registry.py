"""Name -> strategy class and config schema. Modules register themselves on import."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASE = "base"
ADDON = "addon"


@dataclass(frozen=True)
class Registration:
    name: str
    cls: type
    config: type  # dataclass: the schema of this strategy's config node
    kind: str  # BASE or ADDON


_REGISTRY: dict[str, Registration] = {}


def register(name: str, config: type, kind: str = BASE):
    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = Registration(name, cls, config, kind)
        return cls

    return wrap


def registrations(kind: str | None = None) -> dict[str, Registration]:
    _import_all()
    return {n: r for n, r in _REGISTRY.items() if kind is None or r.kind == kind}


def get(name: str, kind: str = BASE) -> Registration:
    regs = registrations(kind)
    if name not in regs:
        known = ", ".join(sorted(regs))
        what = "strategy" if kind == BASE else "add-on"
        raise KeyError(f"unknown {what} '{name}'; choose one of: {known}")
    return regs[name]


def _import_all() -> None:
    import importlib
    import pkgutil

    import cl_runner.strategies as pkg

    # Every module or package in strategies/ is a strategy that registers itself on import,
    # but for the protocol (base, registry, stack) and the shared helpers (parts/).
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in {"base", "registry", "stack", "parts"} and not info.name.startswith("_"):
            importlib.import_module(f"cl_runner.strategies.{info.name}")
