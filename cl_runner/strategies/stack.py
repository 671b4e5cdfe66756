"""Run one base strategy and any number of add-ons as a single strategy.

Hooks are called on every member in order (base first; `after_task` in reverse). Hooks that return a choice
(`optimizer`, `lr_lambda`) accept at most one member that makes it; two is a config error.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from cl_runner.strategies.base import Batch, Strategy, StrategyContext
from cl_runner.streams.task import Example, Task


class StrategyStack(Strategy):
    def __init__(self, members: list[Strategy]) -> None:
        super().__init__(None)
        if not members:
            raise ValueError("a strategy stack needs at least a base strategy")
        self.members = members
        self.name = "+".join(m.name for m in members)
        self.carry_optimizer = any(m.carry_optimizer for m in members)
        self.freezes_parameters = any(m.freezes_parameters for m in members)

    @property
    def base(self) -> Strategy:
        return self.members[0]

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        for m in self.members:
            m.setup(ctx)

    def before_task(self, t: int, task: Task) -> None:
        for m in self.members:
            m.before_task(t, task)

    def after_task(self, t: int, task: Task) -> None:
        # Reverse order, like nested contexts: add-ons that change the weights (LiNeS)
        # finish first, so the base strategy (EWC's anchor, SVD) sees the final weights.
        for m in reversed(self.members):
            m.after_task(t, task)

    def train_examples(self, t: int, task: Task, examples: list[Example]) -> list[Example]:
        for m in self.members:
            examples = m.train_examples(t, task, examples)
        return examples

    def compose_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        for m in self.members:
            batches = m.compose_batches(t, batches)
        return batches

    def num_train_steps(self, t: int, steps: int) -> int:
        for m in self.members:
            steps = m.num_train_steps(t, steps)
        return steps

    def _single_choice(self, hook: str, *args: Any) -> Any:
        chosen = [(m.name, r) for m in self.members if (r := getattr(m, hook)(*args)) is not None]
        if len(chosen) > 1:
            names = " and ".join(n for n, _ in chosen)
            raise ValueError(f"strategies {names} both set `{hook}`; they cannot be combined")
        return chosen[0][1] if chosen else None

    def optimizer(self, named_params: list[tuple[str, nn.Parameter]], previous: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
        return self._single_choice("optimizer", named_params, previous)

    def lr_lambda(self, t: int, num_steps: int) -> Optional[Callable[[int], float]]:
        return self._single_choice("lr_lambda", t, num_steps)

    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        terms = [p for m in self.members if (p := m.penalty(model, batch)) is not None]
        return sum(terms) if terms else None

    def after_backward(self) -> None:
        for m in self.members:
            m.after_backward()

    def before_optimizer_step(self) -> None:
        for m in self.members:
            m.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        for m in self.members:
            m.after_optimizer_step()

    @contextlib.contextmanager
    def evaluation_weights(self, t: int):
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.evaluation_weights(t))
            yield

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.members:
            if m.name in state:
                m.load_state_dict(state[m.name])

    def extra_state_bytes(self) -> int:
        return sum(m.extra_state_bytes() for m in self.members)

    def report(self) -> dict[str, Any]:
        return {m.name: r for m in self.members if (r := m.report())}
