"""Multi-task joint training: the upper bound. At task t, train on tasks 1..t together
(`final_only`: train once, at the last task, on all tasks; earlier rows of R then show
the untrained model)."""
from __future__ import annotations

from dataclasses import dataclass

from cl_runner.strategies.base import Strategy
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Example, Task


@dataclass
class MultitaskConfig:
    name: str = "multitask"
    final_only: bool = False
    carry_optimizer: bool = False


@register("multitask", config=MultitaskConfig, summary="joint training on every task so far: the upper bound",
          upper_bound=True)
class MultitaskJoint(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        return StrategyEstimate(self.name, notes=[f"{self.name}: no state of its own (the union of the tasks' "
                                                  "examples is in host memory)"])

    def _skipped(self, t: int) -> bool:
        return self.config.final_only and t < len(self.ctx.stream) - 1

    def train_examples(self, t: int, task: Task, examples: list[Example]) -> list[Example]:
        if self._skipped(t):
            return []
        union: list[Example] = []
        for past in self.ctx.stream.tasks[:t]:
            union.extend(past.train)
        return union + list(examples)

    def num_train_steps(self, t: int, steps: int) -> int:
        if self._skipped(t):
            return 0
        # With a fixed step budget per task, scale it with the t+1 tasks of the union so
        # every task gets as many passes as in sequential training (epoch budgets already
        # scale, because the union is larger).
        return steps * (t + 1) if self.ctx.trainer.steps_per_task else steps
