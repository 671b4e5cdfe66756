"""Forgetting-mitigation strategies on one hook protocol (see base.py)."""
from __future__ import annotations

from typing import Any

from cl_runner.strategies import registry
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.stack import StrategyStack

ADDON_KEYS = ("lr_schedule", "replay", "lines")


def build_strategy(cfg: Any) -> StrategyStack:
    """The base strategy named by `strategy.name` plus every enabled add-on."""
    base = registry.get(cfg.strategy.name, registry.BASE)
    members: list[Strategy] = [base.cls(cfg.strategy)]
    addons = registry.registrations(registry.ADDON)
    for key in ADDON_KEYS:
        node = cfg.get(key)
        if node is not None and node.get("enabled", False):
            members.append(addons[key].cls(node))
    return StrategyStack(members)


__all__ = ["Strategy", "StrategyContext", "StrategyStack", "build_strategy", "registry"]
