"""LR re-warming and re-decaying across tasks (add-on `lr_schedule`).

Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large
Language Models": at every new task the learning rate is warmed up again and decayed again
(`rewarm_cosine`), or, with the "infinite" schedule, warmed up and cooled down once and
then held constant across tasks, with a short annealing phase before each evaluation
(their Section 7). `constant` is the flat rate of TRACE's full fine-tuning scripts.

The curves below are pure functions of the step: they return the multiplier of the
trainer's peak rate eta_max (`trainer.lr`), which the loop hands to a LambdaLR.

The infinite anneal runs in `after_task`, through the loop's `anneal` (the training step
path): in a stack the base strategy's `after_task` comes after the add-ons', so its
projection, masks and penalty still act on the anneal's steps, and afterwards it sees the
weights training continues from. The anneal continues a copy of the task's optimizer
(moments included) and replay mixes its buffer into the anneal's batches. With
`resume_from: trained` the annealed weights are set aside until `evaluation_weights` swaps
them in (one spare copy of the weights at a time); with `annealed` they stay, and so does
the anneal's optimizer copy (docs/lr_schedule_anneal.md).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Strategy
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import ADDON, register
from cl_runner.streams.sampling import EndlessShuffle
from cl_runner.streams.task import Example, Task

SCHEDULES = ("rewarm_cosine", "constant", "infinite")
COOLDOWNS = ("cosine", "inv_sqrt")
RESUME_FROM = ("trained", "annealed")


@dataclass
class LRScheduleConfig:
    enabled: bool = False
    # The LR curve: rewarm_cosine | constant | infinite
    curve: str = "rewarm_cosine"
    # Linear warmup over this fraction of a task's steps (rewarm_cosine: every task;
    # infinite: the first task only).
    warmup_frac: float = 0.01
    # eta_min / eta_max: the end of each cosine (rewarm_cosine) and of each anneal (infinite).
    min_ratio: float = 0.1
    # infinite: eta_const / eta_max, the rate held after the first task's cooldown.
    const_ratio: float = 0.5
    # infinite: cooldown shape from eta_max to eta_const: cosine | inv_sqrt
    cooldown: str = "cosine"
    # infinite: the cooldown ends at this fraction of the first task's steps.
    cooldown_frac: float = 0.5
    # infinite, inv_sqrt: steepness a of h(x) = 1/sqrt(1 + a x) - 1.
    inv_sqrt_timescale: float = 10.0
    # infinite: optimizer steps of the exponential anneal to eta_min before each evaluation.
    anneal_steps: int = 50
    # infinite: after evaluating, continue from the trained weights (annealed copy and the
    # anneal's optimizer copy thrown away) or from the annealed weights and that optimizer.
    resume_from: str = "trained"
    # infinite, resume_from trained: keep the spare copy of the weights (trained during the
    # evaluation, annealed until then) in host memory.
    backup_on_cpu: bool = False


# ---------------------------------------------------------------------------- curves
def warmup_steps(num_steps: int, warmup_frac: float) -> int:
    return int(round(warmup_frac * num_steps))


def rewarm_cosine(step: int, num_steps: int, warmup_frac: float, min_ratio: float) -> float:
    """Linear warmup to 1 over the first W = round(warmup_frac * num_steps) steps (step W-1
    reaches 1), then cosine from 1 at step W to min_ratio at the last step."""
    w = warmup_steps(num_steps, warmup_frac)
    if step < w:
        return (step + 1) / w
    span = max(1, num_steps - 1 - w)
    progress = min(1.0, max(0.0, (step - w) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def infinite_first_task(step: int, num_steps: int, warmup_frac: float, cooldown_frac: float,
                        const_ratio: float, cooldown: str = "cosine", timescale: float = 10.0) -> float:
    """The infinite schedule inside the first task: warmup to 1, cooldown to const_ratio at
    step C = round(cooldown_frac * num_steps), then const_ratio."""
    w = warmup_steps(num_steps, warmup_frac)
    c = max(w, int(round(cooldown_frac * num_steps)))
    if step < w:
        return (step + 1) / w
    if step >= c:
        return const_ratio
    x = (step - w) / max(1, c - w)  # 0 at the end of warmup, -> 1 at the end of cooldown
    if cooldown == "cosine":
        return const_ratio + (1.0 - const_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))
    # Inverse square root cooldown, normalised so that it starts at 1 and ends at const_ratio.
    h = lambda v: 1.0 / math.sqrt(1.0 + timescale * v) - 1.0  # noqa: E731
    return 1.0 + (const_ratio - 1.0) * h(x) / h(1.0)


def anneal_multiplier(step: int, anneal_steps: int, const_ratio: float, min_ratio: float) -> float:
    """Exponential decay from const_ratio to min_ratio: step s of A uses
    const * (min / const) ** ((s + 1) / A), so the last anneal step runs at min_ratio."""
    return const_ratio * (min_ratio / const_ratio) ** ((step + 1) / anneal_steps)


# ---------------------------------------------------------------------------- add-on
@register("lr_schedule", config=LRScheduleConfig, kind=ADDON, order=10,
          summary="learning-rate re-warming per task (rewarm_cosine) or the infinite schedule with an anneal",
          example=("lr_schedule.curve=infinite", "lr_schedule.anneal_steps=2"))
class LRSchedule(Strategy):
    def __init__(self, config: LRScheduleConfig) -> None:
        super().__init__(config)
        for key, allowed in (("curve", SCHEDULES), ("cooldown", COOLDOWNS), ("resume_from", RESUME_FROM)):
            require_choice(getattr(config, key), f"lr_schedule.{key}", allowed)
        for key in ("warmup_frac", "cooldown_frac"):
            value = getattr(config, key)
            require(0.0 <= value <= 1.0, f"lr_schedule.{key}", value, "use a value in [0.0, 1.0]")
        for key in ("min_ratio", "const_ratio"):
            value = getattr(config, key)
            require(0.0 < value <= 1.0, f"lr_schedule.{key}", value, "use a ratio in (0, 1] of trainer.lr")
        require(config.anneal_steps >= 0, "lr_schedule.anneal_steps", config.anneal_steps,
                "use 0 (no anneal) or more steps")
        require(config.inv_sqrt_timescale > 0, "lr_schedule.inv_sqrt_timescale", config.inv_sqrt_timescale,
                "use a value > 0")
        self.first_task: Optional[int] = None  # infinite: the task that warms up and cools down
        self.anneal_steps_done = 0
        self.anneal_examples = 0
        self.anneal_seconds = 0.0
        # resume_from trained: (task, annealed weights) from after_task to its evaluation.
        self._annealed: Optional[tuple[int, dict[str, torch.Tensor]]] = None

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        c = self.config
        est = StrategyEstimate(self.name, notes=[f"lr_schedule: a learning-rate curve ({c.curve}), no tensors"])
        if c.curve == "infinite" and int(c.anneal_steps) > 0:
            # The anneal steps a copy of the optimizer state, and one spare copy of the weights
            # holds the annealed (or the trained) weights while the other is in the model.
            spare = 0 if c.backup_on_cpu else inputs.facts.params * inputs.param_bytes
            dtype = inputs.cfg.model.dtype
            est.rows.append(("anneal copies (infinite schedule)", inputs.optimizer_bytes() + spare,
                             "lr_schedule.curve=infinite: the anneal's copy of the optimizer state"
                             + ("; the spare weights are in host memory (backup_on_cpu)" if not spare
                                else f" and one spare copy of the weights ({dtype})")))
        return est

    # -- the per-task curve ------------------------------------------------------------
    def lr_lambda(self, t: int, num_steps: int) -> Optional[Callable[[int], float]]:
        cfg = self.config
        if cfg.curve == "constant":
            return lambda step: 1.0
        if cfg.curve == "rewarm_cosine":
            def factor(step: int) -> float:
                return rewarm_cosine(step, num_steps, cfg.warmup_frac, cfg.min_ratio)
            return factor
        # infinite: warmup + cooldown in the first task that trains, constant afterwards.
        if self.first_task is None and num_steps > 0:
            self.first_task = t
        if self.first_task == t:
            def first(step: int) -> float:
                return infinite_first_task(step, num_steps, cfg.warmup_frac, cfg.cooldown_frac, cfg.const_ratio,
                                           cfg.cooldown, cfg.inv_sqrt_timescale)
            return first
        const = cfg.const_ratio
        return lambda step: const

    # -- infinite: anneal before evaluation ------------------------------------------------
    def _anneals(self, t: int) -> bool:
        cfg = self.config
        return cfg.curve == "infinite" and cfg.anneal_steps > 0 and bool(self.ctx.stream[t].train)

    def after_task(self, t: int, task: Task) -> None:
        if not self._anneals(t):
            return
        if self.ctx.anneal is None:
            raise RuntimeError("lr_schedule.curve=infinite needs the loop's anneal to anneal before evaluation")
        model = self.ctx.unwrapped_model
        keep = self.config.resume_from == "annealed"
        spare = None if keep else self._copy_weights(model)
        self._anneal(t, keep)
        if spare is not None:
            # The base's after_task (next) and the next task see the trained weights; the
            # annealed ones wait in `spare` for the evaluation.
            _swap_weights(model, spare)
            self._annealed = (t, spare)

    @contextlib.contextmanager
    def evaluation_weights(self, t: int):
        held, self._annealed = self._annealed, None
        if held is None or held[0] != t:
            yield
            return
        model, spare = self.ctx.unwrapped_model, held[1]
        _swap_weights(model, spare)  # the annealed weights in, the trained ones set aside
        try:
            yield
        finally:
            _swap_weights(model, spare)

    def _copy_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        device = "cpu" if self.config.backup_on_cpu else None
        return {n: p.detach().to(device=device or p.device, copy=True) for n, p in model.named_parameters()}

    def anneal_batches(self, t: int) -> list[list[Example]]:
        """anneal_steps x grad_accum micro-batches of the global batch (trainer.batch_size
        per process) of task t's training data, reshuffled each pass with a seed fixed by
        (seed, t). Every process builds the same list and takes its slice of each batch, as
        in training, so the annealed weights agree across processes."""
        examples = self.ctx.stream[t].train
        trainer = self.ctx.trainer
        size = int(trainer.batch_size) * self.ctx.accelerator.num_processes
        count = self.config.anneal_steps * int(getattr(trainer, "grad_accum", 1))
        draw = EndlessShuffle(len(examples), rng=random.Random(f"{self.ctx.seed}:lr_schedule-anneal:{t}"))
        return [[examples[draw.next()] for _ in range(size)] for _ in range(count)]

    def _anneal(self, t: int, keep_optimizer: bool) -> None:
        cfg = self.config
        started = time.perf_counter()
        batches = self.anneal_batches(t)

        def factor(step: int) -> float:
            return anneal_multiplier(step, cfg.anneal_steps, cfg.const_ratio, cfg.min_ratio)

        losses = self.ctx.anneal(t, batches, factor, keep_optimizer=keep_optimizer)
        seconds = time.perf_counter() - started
        self.anneal_steps_done += len(losses)
        self.anneal_examples += sum(len(b) for b in batches)
        self.anneal_seconds += seconds
        if losses:
            self.ctx.log({"lr_schedule/anneal_loss": losses[-1], "lr_schedule/anneal_seconds": seconds, "task": t + 1})

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"first_task": self.first_task, "anneal_steps_done": self.anneal_steps_done,
                "anneal_examples": self.anneal_examples, "anneal_seconds": self.anneal_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_task = state.get("first_task")
        self.anneal_steps_done = int(state.get("anneal_steps_done", 0))
        self.anneal_examples = int(state.get("anneal_examples", 0))
        self.anneal_seconds = float(state.get("anneal_seconds", 0.0))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"curve": self.config.curve}
        if self.config.curve == "infinite":
            out.update(anneal_steps=self.anneal_steps_done, anneal_examples=self.anneal_examples,
                       anneal_seconds=round(self.anneal_seconds, 3), first_task=self.first_task)
        return out


@torch.no_grad()
def _swap_weights(model: torch.nn.Module, spare: dict[str, torch.Tensor]) -> None:
    """Exchange the model's parameters with `spare`, one parameter's temporary at a time."""
    for name, p in model.named_parameters():
        held = spare[name]
        current = p.detach().to(device=held.device, copy=True)
        p.copy_(held)
        held.copy_(current)
