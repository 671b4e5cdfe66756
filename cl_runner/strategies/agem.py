"""Averaged Gradient Episodic Memory.

Chaudhry, Ranzato, Rohrbach & Elhoseiny 2019, "Efficient Lifelong Learning with A-GEM"
(ICLR; code github.com/facebookresearch/agem). GEM's per-task constraints replaced by one
on the average: at every optimizer step g_ref is the loss gradient on a random batch of
`ref_batch_size` examples drawn from the episodic memory of all past tasks together, and
when g^T g_ref < 0 the step's gradient becomes (Eq. 11)

    g~ = g - (g^T g_ref / g_ref^T g_ref) g_ref,

written back into .grad in after_backward, before clipping and the step. The memory is a
seeded sample of `memory_per_task` training examples of each finished task (the authors
fill per-class ring buffers while training); each step's draw is named by a counter kept
in the checkpoint, so a resumed run draws the same batches. g_ref is computed in eval
mode (no dropout) on every process from the same examples (`parts/flat_gradients.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.errors import require
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.episodic_memory import EpisodicMemory, draw
from cl_runner.strategies.parts.flat_gradients import GradientLayout, loss_gradient
from cl_runner.strategies.parts.gradient_constraints import agem_projection
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task


@dataclass
class AGEMConfig:
    name: str = "agem"
    # Examples kept per past task (the authors' permuted MNIST: 25 per class x 10 classes,
    # fc_permute_mnist.py SAMPLES_PER_CLASS).
    memory_per_task: int = 250
    # Memory examples in each step's g_ref, drawn without replacement from all past tasks'
    # memory (fc_permute_mnist.py, conv_split_cifar.py: EPS_MEM_BATCH_SIZE = 256).
    ref_batch_size: int = 256
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False


@register("agem", config=AGEMConfig,
          summary="averaged GEM: the step's gradient projected off a memory batch's gradient when they conflict",
          sharding="it compares whole-model gradient vectors on every rank; sharded gradients are not gathered",
          example=("strategy.memory_per_task=16", "strategy.ref_batch_size=16"))
class AveragedGEM(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        P = inputs.trainable
        return StrategyEstimate(
            self.name, transient_bytes=2 * FP32 * P,
            notes=[f"agem: episodic memory of {self.config.memory_per_task} examples per past task, held as text "
                   "in host memory"],
            transient_note=f"g and g_ref over the {count(P)} trainable parameters, flat fp32")

    def __init__(self, config: AGEMConfig) -> None:
        super().__init__(config)
        require(config.memory_per_task >= 1, "strategy.memory_per_task", config.memory_per_task,
                "use a positive count (the authors: 250)")
        require(config.ref_batch_size >= 1, "strategy.ref_batch_size", config.ref_batch_size,
                "use a positive count (the authors: 256)")
        self.memory = EpisodicMemory(config.memory_per_task)
        self.draws = 0
        self.checked_steps = 0
        self.projected_steps = 0
        self.layout: GradientLayout | None = None

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.layout = GradientLayout(ctx.unwrapped_model)

    def after_backward(self) -> None:
        pool = self.memory.union()
        if not pool:
            return
        layout = self.layout
        g = layout.read_grad()
        if not bool(torch.isfinite(g).all()):
            return  # an overflowed fp16 step: the loss scaler skips it
        batch = draw(pool, self.config.ref_batch_size, f"{self.ctx.seed}:agem:{self.draws}")
        self.draws += 1
        chunk = int(getattr(self.ctx.trainer, "batch_size", 16))
        # The projection is linear in g: fp16's loss scale on g needs no undoing.
        g_new, projected = agem_projection(g, loss_gradient(self.ctx, layout, batch, chunk))
        self.checked_steps += 1
        self.projected_steps += int(projected)
        if projected:
            layout.write_grad(g_new)

    def after_task(self, t: int, task: Task) -> None:
        if t < len(self.ctx.stream) - 1:  # the last task's memory would never be used
            self.memory.add(t, task.train, self.ctx.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "draws": self.draws,
                "checked_steps": self.checked_steps, "projected_steps": self.projected_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state.get("memory", {}))
        self.draws = int(state.get("draws", 0))
        self.checked_steps = int(state.get("checked_steps", 0))
        self.projected_steps = int(state.get("projected_steps", 0))

    def extra_state_bytes(self) -> int:
        return self.memory.text_bytes()

    def report(self) -> dict[str, Any]:
        return {"constrained_steps": self.checked_steps, "projected_steps": self.projected_steps,
                "memory_examples": {t: len(self.memory.of(t)) for t in self.memory.tasks()}}
