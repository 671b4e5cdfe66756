"""Orthogonal Gradient Descent.

Farajtabar, Azizan, Mott & Li 2020, "Orthogonal Gradient Descent for Continual Learning"
(AISTATS, arXiv 1910.07104); TRACE's version (Wang et al. 2023, model/Regular/OGD.py)
is the reference for the LM setting. After each task, gradient directions of that task
are added to an orthonormal basis {u_i} (Gram-Schmidt against the basis so far, dropping
directions already in its span); every later step's gradient is projected off it,

    g~ = g - sum_i <g, u_i> u_i,

in after_backward, before clipping and the step. The directions come from up to
`max_memories` single training examples of the task (a seeded sample), over the trained
parameters: `variant: paper` takes the gradient of the model's output at the true answer
(the paper's OGD-GTL: the ground-truth logit; summed over the answer tokens of an LM),
`variant: trace` the gradient of the example's loss (TRACE's objective). With
model.adapter=lora only the LoRA factors (and a classifier head) train, which is what
TRACE projects. The gradients are taken in eval mode (no dropout), one example at a time,
on every process: every rank builds the same basis with no collective.

The basis is N x P fp32 (N <= max_memories per past task, P trained parameters), on the
parameters' device and in the checkpoint; a run whose basis could outgrow `max_basis_gb`
is refused at start with the number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from cl_runner.errors import ConfigError, require, require_choice
from cl_runner.strategies.base import Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, GIB, PlanInputs, StrategyEstimate, count, gib
from cl_runner.strategies.parts.episodic_memory import draw
from cl_runner.strategies.parts.flat_gradients import GradientLayout, loss_gradient
from cl_runner.strategies.parts.orthogonal_basis import extend_basis, project_out
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Example, Task

VARIANTS = ("paper", "trace")
IGNORE = -100


@dataclass
class OGDConfig:
    name: str = "ogd"
    # paper (gradient of the ground-truth logit, OGD-GTL) | trace (gradient of the loss, TRACE)
    variant: str = "paper"
    # Gradient directions stored per task (TRACE model/Regular/OGD.py: OGD(max_memories=150)).
    max_memories: int = 150
    # Refuse a run whose basis (4 bytes x max_memories x (tasks - 1) x trained parameters)
    # would exceed this many GiB (ours: a guard, not from either paper).
    max_basis_gb: float = 8.0
    # A direction whose part outside the basis is at most this share of its norm is dropped
    # (ours: fp32 Gram-Schmidt leaves ~1e-6 of a dependent vector).
    residual_tol: float = 1.0e-4
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False


def ground_truth_logit(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The model's logit of the true answer, summed over the batch: the true class of a
    classifier; for an LM the true token's logit at every answer position (causal: logits
    at i predict token i+1; seq2seq: decoder position j predicts label j)."""
    labels = batch["labels"]
    if kind == "classifier":
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}
        return model(**inputs).logits.gather(1, labels[:, None]).sum()
    logits = model(**batch).logits  # labels in: seq2seq builds its decoder inputs from them
    if kind == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return logits[mask].gather(-1, labels[mask][:, None]).sum()


def basis_bytes(trainable: int, max_memories: int, n_tasks: int) -> int:
    """The largest basis: max_memories fp32 rows per task before the last."""
    return FP32 * trainable * max_memories * max(0, n_tasks - 1)


@register("ogd", config=OGDConfig,
          summary="orthogonal gradient descent: steps projected off stored gradient directions of earlier tasks",
          sharding="it projects whole-model gradient vectors on every rank; sharded gradients are not gathered",
          example=("strategy.max_memories=20",))
class OrthogonalGradientDescent(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        P, m = inputs.trainable, self.config.max_memories
        return StrategyEstimate(
            self.name, state_bytes=basis_bytes(P, m, inputs.n_tasks), transient_bytes=3 * FP32 * P,
            notes=[f"ogd basis: up to {m} fp32 directions of the {count(P)} trainable parameters per past task "
                   f"({max(0, inputs.n_tasks - 1)} past tasks at the last of {inputs.n_tasks})"],
            transient_note="the step's gradient, its projection and one example's gradient, flat fp32")

    def __init__(self, config: OGDConfig) -> None:
        super().__init__(config)
        require_choice(config.variant, "strategy.variant", VARIANTS)
        require(config.max_memories >= 1, "strategy.max_memories", config.max_memories,
                "use a positive count (TRACE: 150)")
        require(config.max_basis_gb > 0, "strategy.max_basis_gb", config.max_basis_gb, "use a size in GiB > 0")
        require(0 < config.residual_tol < 1, "strategy.residual_tol", config.residual_tol,
                "use a share in (0, 1), e.g. 1e-4")
        self.blocks: list[torch.Tensor] = []  # one k_t x P block of orthonormal rows per past task
        self.projected_steps = 0
        self.layout: GradientLayout | None = None

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.layout = GradientLayout(ctx.unwrapped_model)
        need = basis_bytes(self.layout.numel, self.config.max_memories, len(ctx.stream))
        if need > self.config.max_basis_gb * GIB:
            raise ConfigError(
                f"strategy=ogd: the basis could reach {gib(need)} ({self.config.max_memories} directions x "
                f"{len(ctx.stream) - 1} past tasks x {count(self.layout.numel)} trained parameters, fp32), over "
                f"strategy.max_basis_gb={self.config.max_basis_gb:g}; lower strategy.max_memories, train fewer "
                "parameters (model.adapter=lora) or raise strategy.max_basis_gb")

    def after_backward(self) -> None:
        if not any(B.shape[0] for B in self.blocks):
            return
        g = self.layout.read_grad()
        if not bool(torch.isfinite(g).all()):
            return  # an overflowed fp16 step: the loss scaler skips it
        self.blocks = [B.to(g.device) for B in self.blocks]  # a checkpoint loads on the CPU
        # Linear in g: fp16's loss scale needs no undoing.
        self.layout.write_grad(project_out(g, self.blocks))
        self.projected_steps += 1

    def after_task(self, t: int, task: Task) -> None:
        if t == len(self.ctx.stream) - 1:
            return  # nothing trains after the last task: its directions would never be used
        chosen = draw(task.train, self.config.max_memories, f"{self.ctx.seed}:ogd:{t}")
        self.blocks = [B.to(self.layout.device) for B in self.blocks]
        block = extend_basis(self.blocks, self.example_gradients(chosen), len(chosen), self.layout.numel,
                             self.config.residual_tol)
        self.blocks.append(block.to(self.layout.device))

    def example_gradients(self, examples: list[Example]) -> Iterator[torch.Tensor]:
        kind = self.ctx.model_kind
        objective = (lambda model, batch: ground_truth_logit(model, batch, kind)) if self.config.variant == "paper" \
            else None  # None: the loss
        for example in examples:
            yield loss_gradient(self.ctx, self.layout, [example], 1, objective)

    def state_dict(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "projected_steps": self.projected_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocks = list(state.get("blocks", []))
        self.projected_steps = int(state.get("projected_steps", 0))

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.blocks)

    def report(self) -> dict[str, Any]:
        return {"variant": self.config.variant, "basis_directions": [int(B.shape[0]) for B in self.blocks], "projected_steps": self.projected_steps}
