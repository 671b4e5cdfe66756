"""Name -> everything the program knows about a strategy. Each strategy module registers
itself on import with `@register(...)`; no other module names a strategy.

A registration declares, beside the class and its config schema:

  kind           BASE (strategy=<name>) or ADDON (<name>.enabled=true, on any base)
  summary        one line: what it does (cl-run --help, docs)
  order          add-ons only: place in the stack and in run labels (lower first)
  adapters       None when it runs on LoRA adapters (model.adapter=lora), else why not
  sharding       None when it runs under trainer.sharding=fsdp, else why not
  model_kinds    the model kinds it supports (causal, seq2seq, classifier)
  example        overrides that make its effect show on a tiny run: the conformance tests
                 (tests/integration/test_conformance.py) and docs use them
  multiprocess   None when several processes give one process's run, else why not (a
                 one-line reason the conformance tests print when they skip it)
  upper_bound    its runs are the reference other runs are compared with (cl-report's gap)

Hooks, run-config checks and the memory estimate are methods of the class
(`strategies/base.py`, docs/writing_a_strategy.md).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

BASE = "base"
ADDON = "addon"
DEFAULT_BASE = "seq_ft"  # the base strategy of a config that names none
MODEL_KINDS = ("causal", "seq2seq", "classifier")
# Modules of this package that are the protocol and shared helpers, not strategies.
_NOT_STRATEGIES = {"base", "registry", "stack", "parts", "memory"}


@dataclass(frozen=True)
class Registration:
    name: str
    cls: type
    config: type  # dataclass: the schema of this strategy's config node
    kind: str  # BASE or ADDON
    summary: str = ""
    order: int = 0
    adapters: Optional[str] = None
    sharding: Optional[str] = None
    model_kinds: tuple[str, ...] = MODEL_KINDS
    example: tuple[str, ...] = ()
    multiprocess: Optional[str] = None
    upper_bound: bool = False

    @property
    def switch_on(self) -> str:
        """The override that turns it on."""
        return f"{self.name}.enabled=true" if self.kind == ADDON else f"strategy={self.name}"

    @property
    def switch_off(self) -> str:
        """The fix that turns it off, as an error message ends."""
        return f"set {self.name}.enabled=false" if self.kind == ADDON else f"pick another strategy than {self.name}"

    @property
    def overrides(self) -> tuple[str, ...]:
        """A run of it: the switch and its example options (an add-on on seq_ft)."""
        return (self.switch_on, *self.example)


_REGISTRY: dict[str, Registration] = {}


def register(name: str, config: type, kind: str = BASE, *, summary: str = "", order: int = 0,
             adapters: Optional[str] = None, sharding: Optional[str] = None,
             model_kinds: tuple[str, ...] = MODEL_KINDS, example: tuple[str, ...] = (),
             multiprocess: Optional[str] = None, upper_bound: bool = False):
    """Class decorator: `@register("ewc", config=EWCConfig, summary=...)`."""
    if kind not in (BASE, ADDON):
        raise ValueError(f"register({name!r}): kind must be {BASE!r} or {ADDON!r}")
    unknown = set(model_kinds) - set(MODEL_KINDS)
    if unknown:
        raise ValueError(f"register({name!r}): unknown model kinds {sorted(unknown)}")

    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = Registration(name, cls, config, kind, summary, order, adapters, sharding,
                                       tuple(model_kinds), tuple(example), multiprocess, upper_bound)
        return cls

    return wrap


def unregister(name: str) -> None:
    """Drop a registration (tests that register a throw-away strategy clean up with it)."""
    _REGISTRY.pop(name, None)


def registrations(kind: Optional[str] = None) -> dict[str, Registration]:
    """Every registration of `kind` (all when None); add-ons in their stack order."""
    _import_all()
    chosen = [r for r in _REGISTRY.values() if kind is None or r.kind == kind]
    if kind == ADDON:
        chosen.sort(key=lambda r: (r.order, r.name))
    return {r.name: r for r in chosen}


def addons() -> list[Registration]:
    """The add-ons in stack and label order."""
    return list(registrations(ADDON).values())


def get(name: str, kind: str = BASE) -> Registration:
    regs = registrations(kind)
    if name not in regs:
        import difflib

        known = ", ".join(sorted(regs))
        what = "strategy" if kind == BASE else "add-on"
        close = difflib.get_close_matches(str(name), sorted(regs), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown {what} '{name}'{hint}; choose one of: {known}")
    return regs[name]


def of(member: Any) -> Registration:
    """The registration of a strategy instance (an unregistered one, as tests build, reads
    as a base strategy of its name)."""
    return _REGISTRY.get(member.name) or Registration(member.name, type(member), object, BASE)


def enabled_addons(cfg: Any) -> list[Registration]:
    """The add-ons a run config switches on, in stack order."""
    return [r for r in addons() if cfg.get(r.name) is not None and cfg[r.name].get("enabled", False)]


def is_upper_bound(label: str) -> bool:
    """Whether a run labelled `label` (metrics.json "strategy": a base, `+add-ons`, or a
    setting in brackets) is of an upper-bound strategy (multitask)."""
    head = str(label).split("+")[0].split(" ")[0].lower()
    return any(head == r.name or head.startswith(r.name) for r in registrations(BASE).values() if r.upper_bound)


def members_label(cfg: Any) -> str:
    """The base strategy and the add-ons on, in stack order: `seq_ft+lr_schedule+replay`."""
    return "+".join([str(cfg.strategy.name)] + [r.name for r in enabled_addons(cfg)])


def strategy_label(cfg: Any) -> str:
    """How run folders, metrics.json and reports name the strategy: `strategy_label` when
    set (a preset's name, e.g. rewarm_replay), else `members_label`."""
    label = cfg.get("strategy_label")
    return str(label) if label else members_label(cfg)


def _import_all() -> None:
    # Every module or package beside this file is a strategy that registers itself on
    # import, but for the protocol and the shared helpers.
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_STRATEGIES and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
