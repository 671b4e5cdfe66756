"""Sequential fine-tuning: the baseline. Plain full fine-tuning task after task."""
from __future__ import annotations

from dataclasses import dataclass

from cl_runner.strategies.base import Strategy
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import register


@dataclass
class SeqFTConfig:
    name: str = "seq_ft"
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False


@register("seq_ft", config=SeqFTConfig, summary="sequential fine-tuning, task after task: the baseline")
class SequentialFineTuning(Strategy):
    """Every hook is the base class's no-op."""

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        return StrategyEstimate(self.name, notes=[f"{self.name}: no state of its own"])
