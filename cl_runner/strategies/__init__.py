"""Forgetting-mitigation strategies on one hook protocol (see base.py), each registered
with everything the rest of the program knows about it (registry.py)."""
from __future__ import annotations

from typing import Any

from cl_runner.strategies import registry
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.stack import StrategyStack


def check_supported(reg: registry.Registration, cfg: Any) -> None:
    """What the registration declares it supports, against the run config (one line each)."""
    model = cfg.get("model")
    adapter = model.get("adapter", "none") if model is not None else "none"
    if adapter != "none" and reg.adapters:
        raise ValueError(f"{reg.switch_on} cannot run with model.adapter={adapter}: {reg.adapters}; "
                         f"set model.adapter=none or {reg.switch_off}")
    trainer = cfg.get("trainer")
    if trainer is not None and trainer.get("sharding", "none") == "fsdp" and reg.sharding:
        raise ValueError(f"{reg.switch_on} cannot run with trainer.sharding=fsdp: {reg.sharding}; "
                         f"set trainer.sharding=none or {reg.switch_off}")
    kind = model.get("kind") if model is not None else None
    if kind is not None and kind not in reg.model_kinds:
        raise ValueError(f"{reg.switch_on} cannot run on a {kind} model (model.kind={kind}): it supports "
                         f"{', '.join(reg.model_kinds)}; pick another model or {reg.switch_off}")


def build_strategy(cfg: Any) -> StrategyStack:
    """The base strategy named by `strategy.name` plus every enabled add-on, in registered
    order. Every strategy check runs here, before any folder or model exists: each member
    checks its own options (constructor), what its registration declares it supports,
    and the rest of the run config (`check_run_config`); the stack checks the combination.
    Bad values raise ValueError (cl-run: config error, exit 2)."""
    base = registry.get(cfg.strategy.name, registry.BASE)
    regs = [base] + registry.enabled_addons(cfg)
    members: list[Strategy] = [base.cls(cfg.strategy)] + [r.cls(cfg[r.name]) for r in regs[1:]]
    for reg, member in zip(regs, members):
        check_supported(reg, cfg)
        member.check_run_config(cfg)
    return StrategyStack(members)


__all__ = ["Strategy", "StrategyContext", "StrategyStack", "build_strategy", "check_supported", "registry"]
