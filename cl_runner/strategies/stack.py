"""Run one base strategy and any number of add-ons as a single strategy.

Hooks are called on every member in order (base first, add-ons in their registered order;
`after_task` in reverse). Hooks that return a choice (`optimizer`, `lr_lambda`) accept at
most one member that makes it; two is a config error, found when the stack is built
(before any run folder or model exists) from what each member declares (base.py):
`owns_update_rule`, `sets_optimizer`, `sets_lr_lambda`. This is the only place those
rules are enforced.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from cl_runner.strategies import registry
from cl_runner.strategies.base import Batch, Strategy, StrategyContext
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.streams.task import Example, Task


def declares(member: Strategy, hook: str) -> bool:
    """Whether `member` makes the choice of `hook` ("optimizer" or "lr_lambda")."""
    flag = getattr(member, f"sets_{hook}", None)
    if flag is None:  # undeclared: overriding the hook counts as setting it
        flag = getattr(type(member), hook, None) is not getattr(Strategy, hook)
    return bool(flag)


def describe(member: Strategy) -> str:
    """How the user switched `member` on: `lr_schedule.enabled=true` or `strategy=classp`."""
    return registry.of(member).switch_on


def switch_off(member: Strategy) -> str:
    return registry.of(member).switch_off


def check_combination(members: list[Strategy]) -> None:
    """Raise ValueError (one line, naming both members and the fix) for members that cannot run together."""
    owners = [m for m in members if getattr(m, "owns_update_rule", False)]
    if len(owners) > 1:
        a, b = owners[:2]
        raise ValueError(f"{describe(a)} cannot be combined with {describe(b)}: both replace the optimizer's "
                         f"update rule; {switch_off(b)}")
    if owners:
        owner = owners[0]
        for m in members:
            if m is not owner and declares(m, "lr_lambda"):
                raise ValueError(
                    f"{describe(owner)} cannot be combined with {describe(m)}: {owner.name} replaces AdamW with its "
                    f"own update rule, whose step size is not an AdamW learning rate, and {m.name}'s learning-rate "
                    f"curve is meant for AdamW; {switch_off(m)}")
    for hook, what in (("optimizer", "build the optimizer (`optimizer`)"),
                       ("lr_lambda", "set the learning-rate schedule (`lr_lambda`)")):
        setters = [m for m in members if declares(m, hook)]
        if len(setters) > 1:
            a, b = setters[:2]
            raise ValueError(f"{describe(a)} cannot be combined with {describe(b)}: both {what}; {switch_off(b)}")


class StrategyStack(Strategy):
    def __init__(self, members: list[Strategy]) -> None:
        super().__init__(None)
        if not members:
            raise ValueError("a strategy stack needs at least a base strategy")
        check_combination(members)
        self.members = members
        self.name = "+".join(m.name for m in members)
        self.carry_optimizer = any(m.carry_optimizer for m in members)
        self.freezes_parameters = any(m.freezes_parameters for m in members)

    @property
    def base(self) -> Strategy:
        return self.members[0]

    def adapter_names(self, num_tasks: int) -> Optional[list[str]]:
        return self._single_choice("adapter_names", num_tasks)

    def prompt_source(self, maker: Any, num_tasks: int) -> Optional[nn.Module]:
        return self._single_choice("prompt_source", maker, num_tasks)

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        for m in self.members:
            m.setup(ctx)

    def before_task(self, t: int, task: Task) -> None:
        for m in self.members:
            m.before_task(t, task)

    def after_task(self, t: int, task: Task) -> None:
        # Reverse order, like nested contexts: add-ons that change the weights (LiNeS, the
        # lr_schedule anneal) finish first, so the base strategy (EWC's anchor, SVD) sees
        # the final weights, and its task state (masks, bases, penalty) still holds for them.
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

    def compose_anneal_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        for m in self.members:
            batches = m.compose_anneal_batches(t, batches)
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

    @contextlib.contextmanager
    def evaluation_weights_for(self, t: int, k: Optional[int]):
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.evaluation_weights_for(t, k))
            yield

    def predict_examples(self, t: int, k: Optional[int], task: Task, examples: list[Example],
                         predict: Callable[[list[Example]], list[str]]) -> list[str]:
        # Nested like evaluation_weights: the base outermost, each member wrapping the next.
        def wrapped(member: Strategy, inner: Callable[[list[Example]], list[str]]):
            return lambda chunk: member.predict_examples(t, k, task, chunk, inner)

        for m in reversed(self.members):
            predict = wrapped(m, predict)
        return predict(examples)

    def test_time_seconds(self) -> float:
        return sum(m.test_time_seconds() for m in self.members)

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.members:
            if m.name in state:
                m.load_state_dict(state[m.name])

    def extra_state_bytes(self) -> int:
        return sum(m.extra_state_bytes() for m in self.members)

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        """The base's estimate with every add-on's folded in (kept apart for FSDP layouts)."""
        est = _named(self.base.memory_estimate(inputs), self.base.name)
        est.name = self.name
        for m in self.members[1:]:
            est.add_addon(_named(m.memory_estimate(dataclasses.replace(inputs, base=est)), m.name))
        return est

    def report(self) -> dict[str, Any]:
        return {m.name: r for m in self.members if (r := m.report())}


def _named(est: StrategyEstimate, name: str) -> StrategyEstimate:
    """Every note of a member's estimate starts with the member's name, so the plan's
    state line says whose state each part is."""
    est.notes = [n if n.startswith(f"{name}:") else f"{name}: {n}" for n in est.notes]
    if est.notes == [] and not est.state_bytes:
        est.notes = [f"{name}: no state of its own"]
    return est
