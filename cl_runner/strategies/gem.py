"""Gradient Episodic Memory.

Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (NeurIPS;
code github.com/facebookresearch/GradientEpisodicMemory, model/gem.py). Each optimizer
step's gradient g is checked against one gradient g_k per past task k; when some
<g, g_k> < 0 it is replaced by the closest vector that conflicts with none of them,
through the dual QP (Eq. 10-11)

    min_v 1/2 v^T G G^T v + g^T G^T v  s.t.  v >= 0,      g~ = G^T v + g,

with the authors' margin (v >= margin, the paper's gamma) and eps on the diagonal
(`parts/gradient_constraints.py`). g~ goes back into .grad in after_backward, before
clipping and the step.

`variant: paper`: g_k is the gradient of the loss on task k's episodic memory (a seeded
sample of `memory_per_task` training examples), computed at every step on the current
weights, over the whole model as one vector. One forward/backward per past task per
step: the cost grows with the number of tasks.

`variant: trace` (TRACE, Wang et al. 2023, model/Regular/GEM.py): no memory of examples.
g_k is the gradient of task k's last training step (as stored there: after its own
projection), kept for the rest of the run, and the QP is solved per parameter tensor
against the matching slices. TRACE's QP (`qp: trace_code`, its default here) is the one
its qpth call solves, which differs from GEM's in sign and bound direction; `qp: gem`
runs TRACE's protocol with GEM's QP.

The constraint gradients are taken in eval mode (no dropout) with torch.autograd.grad, on
every process from the same examples: the same g_k everywhere, the step's .grad untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.episodic_memory import EpisodicMemory, draw
from cl_runner.strategies.parts.flat_gradients import GradientLayout, loss_gradient, loss_scale
from cl_runner.strategies.parts.gradient_constraints import QP_FORMS, gem_projection
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task

VARIANTS = ("paper", "trace")
VARIANT_QP = {"paper": "gem", "trace": "trace_code"}


@dataclass
class GEMConfig:
    name: str = "gem"
    # paper (a gradient on each past task's episodic memory at every step, whole model) |
    # trace (TRACE: each past task's last training gradient, QP per parameter tensor)
    variant: str = "paper"
    # paper: examples kept per past task (GEM's run_experiments.sh: --n_memories 256).
    memory_per_task: int = 256
    # paper: memory examples per past task in each step's g_k; null = the task's whole
    # memory, as the authors' observe() does. A number: a seeded sample per step.
    memory_batch_size: Optional[int] = None
    # Lower bound on the dual variables (GEM: --memory_strength 0.5, the paper's gamma;
    # TRACE: project2cone2 margin=0.5).
    margin: float = 0.5
    # Added to the diagonal of G G^T (both codes' project2cone2: eps=1e-3).
    eps: float = 1.0e-3
    # gem | trace_code (the QP TRACE's code solves) | null = the variant's (paper: gem, trace: trace_code)
    qp: Optional[str] = None
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False


@register("gem", config=GEMConfig,
          summary="gradient episodic memory: each step's gradient corrected by a QP so no past task's loss rises",
          sharding="it compares whole-model gradient vectors on every rank; sharded gradients are not gathered",
          example=("strategy.memory_per_task=16",))
class GradientEpisodicMemory(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        P, past = inputs.trainable, max(1, inputs.n_tasks - 1)
        if self.config.variant == "trace":
            return StrategyEstimate(
                self.name, state_bytes=FP32 * P * (past + 1), transient_bytes=2 * FP32 * P,
                notes=[f"gem (trace): one fp32 gradient of the {count(P)} trainable parameters per past task "
                       f"({past} while training the last of {inputs.n_tasks} tasks) + the latest step's"],
                transient_note="the step's gradient and its correction, flat fp32")
        return StrategyEstimate(
            self.name, transient_bytes=FP32 * P * (past + 2),
            notes=[f"gem (paper): episodic memory of {self.config.memory_per_task} examples per past task, "
                   "held as text in host memory"],
            transient_note=f"one fp32 gradient of the {count(P)} trainable parameters per past task ({past}) "
                           "+ the step's gradient and the one being summed")

    def __init__(self, config: GEMConfig) -> None:
        super().__init__(config)
        require_choice(config.variant, "strategy.variant", VARIANTS)
        if config.qp is not None:
            require_choice(config.qp, "strategy.qp", QP_FORMS)
        require(config.memory_per_task >= 1, "strategy.memory_per_task", config.memory_per_task,
                "use a positive count (the paper: 256)")
        require(config.memory_batch_size is None or config.memory_batch_size >= 1, "strategy.memory_batch_size",
                config.memory_batch_size, "use a positive count, or null for each task's whole memory")
        require(config.margin >= 0, "strategy.margin", config.margin, "use a value >= 0 (the paper: 0.5)")
        require(config.eps >= 0, "strategy.eps", config.eps, "use a value >= 0 (the paper: 1e-3)")
        self.qp = config.qp or VARIANT_QP[config.variant]
        self.memory = EpisodicMemory(config.memory_per_task)
        # trace: the past tasks' stored gradients (rows of one k x P matrix) and their tasks.
        self.past_gradients: Optional[torch.Tensor] = None
        self.past_tasks: list[int] = []
        self.latest: Optional[torch.Tensor] = None  # trace: this task's most recent step gradient
        self.draws = 0  # paper with memory_batch_size: names each step's draw
        self.checked_steps = 0
        self.projected_steps = 0
        self.layout: Optional[GradientLayout] = None

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.layout = GradientLayout(ctx.unwrapped_model)

    # -- training -------------------------------------------------------------------------
    def after_backward(self) -> None:
        layout, acc = self.layout, self.ctx.accelerator
        scale = loss_scale(acc)
        g = layout.read_grad()
        if not bool(torch.isfinite(g).all()):
            return  # an overflowed fp16 step: the loss scaler skips it
        g = g / scale
        projected = False
        if self.config.variant == "paper" and self.memory.tasks():
            G = torch.stack([loss_gradient(self.ctx, layout, self.memory_batch(k), self.chunk_size())
                             for k in self.memory.tasks()])
            self.draws += 1
            g, projected = gem_projection(g, G, self.config.margin, self.config.eps, self.qp)
        elif self.config.variant == "trace" and self.past_gradients is not None:
            self.past_gradients = self.past_gradients.to(g.device)  # a checkpoint loads on the CPU
            g, projected = self.project_per_tensor(g)
        if self.memory.tasks() or self.past_gradients is not None:
            self.checked_steps += 1
            self.projected_steps += int(projected)
        if projected:
            layout.write_grad(g * scale)
        if self.config.variant == "trace" and not self.ctx.annealing:
            self.latest = g.clone()

    def project_per_tensor(self, g: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """TRACE's per-parameter QP: each tensor's slice of g against the same slice of
        every stored gradient."""
        out, any_projected = g.clone(), False
        for start, (_, p) in zip(self.layout.offsets, self.layout.named):
            end = start + p.numel()
            part, projected = gem_projection(g[start:end], self.past_gradients[:, start:end],
                                             self.config.margin, self.config.eps, self.qp)
            if projected:
                out[start:end] = part
                any_projected = True
        return out, any_projected

    def memory_batch(self, k: int):
        kept = self.memory.of(k)
        size = self.config.memory_batch_size
        if size is None:
            return kept
        return draw(kept, size, f"{self.ctx.seed}:gem:{k}:{self.draws}")

    def chunk_size(self) -> int:
        return int(getattr(self.ctx.trainer, "batch_size", 16))

    def after_task(self, t: int, task: Task) -> None:
        if t == len(self.ctx.stream) - 1:
            self.latest = None
            return  # nothing trains after the last task: its constraint would never be used
        if self.config.variant == "paper":
            self.memory.add(t, task.train, self.ctx.seed)
        elif self.latest is not None:
            row = self.latest.unsqueeze(0)
            self.past_gradients = row if self.past_gradients is None else torch.cat([self.past_gradients, row])
            self.past_tasks.append(t)
            self.latest = None

    # -- bookkeeping ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # `latest` is not saved: a mid-task checkpoint is never at a task's last step, so
        # the steps after the resume overwrite it before the task ends.
        return {"memory": self.memory.state_dict(), "past_gradients": self.past_gradients,
                "past_tasks": list(self.past_tasks), "draws": self.draws,
                "checked_steps": self.checked_steps, "projected_steps": self.projected_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state.get("memory", {}))
        self.past_gradients = state.get("past_gradients")
        self.past_tasks = [int(t) for t in state.get("past_tasks", [])]
        self.draws = int(state.get("draws", 0))
        self.checked_steps = int(state.get("checked_steps", 0))
        self.projected_steps = int(state.get("projected_steps", 0))

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.past_gradients) + self.memory.text_bytes()

    def report(self) -> dict[str, Any]:
        return {"variant": self.config.variant, "qp": self.qp,
                "constrained_steps": self.checked_steps, "projected_steps": self.projected_steps,
                "memory_examples": {t: len(self.memory.of(t)) for t in self.memory.tasks()},
                "stored_gradients": list(self.past_tasks)}
