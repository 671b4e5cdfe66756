"""O-LoRA: orthogonal subspace learning, one LoRA per task.

Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"
(EMNLP Findings, arXiv 2310.14152; code github.com/cmnfriend/O-LoRA). Task t trains a new
LoRA (A_t: r x d_in, B_t: d_out x r) on every target layer; the LoRAs of tasks 1..t-1 stay
in the forward, frozen (the code keeps them as separate, unmerged, frozen lora_A/lora_B
next to the trainable loranew_A/loranew_B, src/peft/tuners/lora.py; here they are separate
PEFT adapters, all active, all but the newest frozen). The loss is

    L_task + lambda_1 * sum_layers sum_{i<t} O(A_i, A_t) + lambda_2 * sum_layers (||A_t|| + ||B_t||),

with O(A_i, A_t) = sum_jk |A_i A_t^T|_jk (`orthogonality: abs`, the authors' code,
src/uie_trainer_lora.py, which produced the published tables) or sum_jk (A_i A_t^T)_jk^2
(`squared`, the paper's Eq. 3), and ||.|| the Frobenius norm (torch.norm(p, p=2) in the code).

The adapter life cycle (one LoRA per task, created before the model is wrapped; earlier
ones frozen and active; the overlap measured after each task) is `parts/per_task_lora.py`,
shared with IncLoRA (`inc_lora.py`, this method without its penalty).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Batch
from cl_runner.strategies.parts.per_task_lora import PerTaskLoRA, residual  # noqa: F401 (residual: olora's API)
from cl_runner.strategies.registry import register

FORMS = ("abs", "squared")


@dataclass
class OLoRAConfig:
    name: str = "olora"
    # Weight of the orthogonality term (scripts/order_1.sh: --lamda_1 0.5).
    lambda_1: float = 0.5
    # Weight of the norm of the new LoRA (scripts/order_1.sh: --lamda_2 0).
    lambda_2: float = 0.0
    # abs: sum |A_i A_t^T| (the authors' code) | squared: sum (A_i A_t^T)^2 (the paper's Eq. 3)
    orthogonality: str = "abs"
    # No carry_optimizer: each task trains parameters of its own, so a fresh AdamW per task
    # (as each of the authors' per-task script runs) is the only meaningful choice.


def overlap(previous: torch.Tensor, current: torch.Tensor, form: str) -> torch.Tensor:
    """O(A_i, A_t) for A_i (r_i x d) and A_t (r x d): the entries of A_i A_t^T, summed as
    absolute values (`abs`) or squares (`squared`)."""
    product = previous.float() @ current.float().T
    return product.abs().sum() if form == "abs" else product.pow(2).sum()


def orthogonality_loss(previous: list[list[torch.Tensor]], current: list[torch.Tensor], form: str) -> torch.Tensor:
    """Sum over layers l and earlier tasks i of O(A_i[l], A_t[l]); previous[i][l], current[l]."""
    total = current[0].new_zeros((), dtype=torch.float32)
    for earlier in previous:
        for a_i, a_t in zip(earlier, current):
            total = total + overlap(a_i, a_t, form)
    return total


def norm_loss(factors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the Frobenius norms (not squared) of the new LoRA's A and B matrices."""
    return sum((torch.linalg.norm(p.float()) for p in factors), factors[0].new_zeros((), dtype=torch.float32))


@register("olora", config=OLoRAConfig,
          summary="O-LoRA: one LoRA per task, kept orthogonal to the earlier tasks' LoRA subspaces",
          sharding="it trains LoRA adapters, which trainer.sharding=fsdp does not shard yet",
          example=("model.adapter=lora", "model.lora.dropout=0"))
class OrthogonalLoRA(PerTaskLoRA):
    def __init__(self, config: OLoRAConfig) -> None:
        super().__init__(config)
        require_choice(config.orthogonality, "strategy.orthogonality", FORMS)
        for key in ("lambda_1", "lambda_2"):
            value = getattr(config, key)
            require(value >= 0 and value != float("inf"), f"strategy.{key}", value,
                    "use a finite value >= 0 (the authors use lambda_1=0.5, lambda_2=0)")

    def _activated(self, t: int) -> None:
        # Looked up once per task, not per micro-batch: the penalty's tensors (the earlier
        # tasks' A, frozen, and the current LoRA's parameters, updated in place).
        self._current = self._factors(self.names[t])
        self._previous_a = [[a.detach() for a, _ in self._factors(n)] for n in self.names[:t]]

    # -- loss -----------------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        cfg = self.config
        current = self._current
        total = None
        if cfg.lambda_1 and self._previous_a:
            total = cfg.lambda_1 * orthogonality_loss(self._previous_a, [a for a, _ in current], cfg.orthogonality)
        if cfg.lambda_2:
            term = cfg.lambda_2 * norm_loss([p for pair in current for p in pair])
            total = term if total is None else total + term
        return total

    def report(self) -> dict[str, Any]:
        return {"lambda_1": self.config.lambda_1, "lambda_2": self.config.lambda_2,
                "orthogonality": self.config.orthogonality, **super().report()}
