"""Forgetting-mitigation strategies on one hook protocol (see base.py)."""
from __future__ import annotations

from typing import Any

from cl_runner.strategies import registry
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.stack import StrategyStack, describe, switch_off

ADDON_KEYS = ("lr_schedule", "replay", "lines")


def build_strategy(cfg: Any) -> StrategyStack:
    """The base strategy named by `strategy.name` plus every enabled add-on. Bad options and
    combinations raise ValueError here, before any folder or model exists: each member checks
    its own options, the stack checks the combination, and a member with `check_run_config`
    checks the rest of the run config (e.g. classp and trainer.max_grad_norm)."""
    base = registry.get(cfg.strategy.name, registry.BASE)
    members: list[Strategy] = [base.cls(cfg.strategy)]
    addons = registry.registrations(registry.ADDON)
    for key in ADDON_KEYS:
        node = cfg.get(key)
        if node is not None and node.get("enabled", False):
            members.append(addons[key].cls(node))
    stack = StrategyStack(members)
    adapter = cfg.model.get("adapter", "none") if cfg.get("model") is not None else "none"
    for m in members:
        if adapter != "none" and m.adapter_refusal:  # a strategy on the base weights, which an adapter freezes
            raise ValueError(f"{describe(m)} cannot run with model.adapter={adapter}: {m.adapter_refusal}; "
                             f"set model.adapter=none or {switch_off(m)}")
        check = getattr(m, "check_run_config", None)
        if check is not None:
            check(cfg)
    return stack


__all__ = ["Strategy", "StrategyContext", "StrategyStack", "build_strategy", "registry"]
