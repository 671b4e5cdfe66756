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

Every adapter is created before the model is wrapped (`adapter_names`), so checkpoints
always hold the same keys and a resumed run only has to re-activate the current task's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.strategies.base import Batch, Strategy, StrategyContext
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate, count
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task
from cl_runner.errors import require, require_choice

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


def residual(previous: torch.Tensor, current: torch.Tensor) -> tuple[float, float]:
    """(||A_i A_t^T||_F, the same divided by ||A_i||_F ||A_t||_F: 0 orthogonal, <= 1 always)."""
    norm = torch.linalg.norm(previous.float() @ current.float().T).item()
    scale = (torch.linalg.norm(previous.float()) * torch.linalg.norm(current.float())).item()
    return norm, (norm / scale if scale > 0 else 0.0)


@register("olora", config=OLoRAConfig,
          summary="O-LoRA: one LoRA per task, kept orthogonal to the earlier tasks' LoRA subspaces",
          sharding="it trains LoRA adapters, which trainer.sharding=fsdp does not shard yet",
          example=("model.adapter=lora", "model.lora.dropout=0"))
class OrthogonalLoRA(Strategy):
    # Earlier tasks' adapters stop getting gradients after DDP wrapped the model.
    freezes_parameters = True

    def __init__(self, config: OLoRAConfig) -> None:
        super().__init__(config)
        require_choice(config.orthogonality, "strategy.orthogonality", FORMS)
        for key in ("lambda_1", "lambda_2"):
            value = getattr(config, key)
            require(value >= 0 and value != float("inf"), f"strategy.{key}", value,
                    "use a finite value >= 0 (the authors use lambda_1=0.5, lambda_2=0)")
        self.names: list[str] = []
        self.current = 0
        # residuals[t][i] = (frobenius, relative) of tasks t and i < t, over all layers together.
        self.residuals: dict[int, dict[int, tuple[float, float]]] = {}

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        kept = max(0, inputs.n_tasks - 1) * (inputs.adapter_params or 0)
        return StrategyEstimate(self.name, state_bytes=kept * inputs.param_bytes, notes=[
            f"olora: the frozen LoRAs of the finished tasks, {count(kept)} parameters after the last task"])

    def check_run_config(self, cfg: Any) -> None:
        adapter = cfg.model.get("adapter", "none")
        if adapter != "lora":
            raise ValueError(f"strategy=olora trains one LoRA per task, but model.adapter={adapter}; "
                             "set model.adapter=lora (configs/strategy/olora.yaml does unless overridden)")

    def adapter_names(self, num_tasks: int) -> Optional[list[str]]:
        self.names = [f"task_{k + 1}" for k in range(num_tasks)]
        return list(self.names)

    def setup(self, ctx: StrategyContext) -> None:
        from cl_runner.models.adapters import is_adapted

        super().setup(ctx)
        model = ctx.unwrapped_model
        if not is_adapted(model) or any(n not in model.peft_config for n in self.names) or not self.names:
            raise ValueError("strategy=olora needs the model built with one LoRA per task (model.adapter=lora, "
                             "adapters from OrthogonalLoRA.adapter_names)")
        self._activate(0)

    # -- adapters -----------------------------------------------------------------------
    def _activate(self, t: int) -> None:
        from cl_runner.models.adapters import activate

        self.current = t
        activate(self.ctx.unwrapped_model, self.names[:t + 1], trainable=self.names[t])
        # Looked up once per task, not per micro-batch: the penalty's tensors (the earlier
        # tasks' A, frozen, and the current LoRA's parameters, updated in place).
        self._current = self._factors(self.names[t])
        self._previous_a = [[a.detach() for a, _ in self._factors(n)] for n in self.names[:t]]

    def _factors(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from cl_runner.models.adapters import lora_factors

        return list(lora_factors(self.ctx.unwrapped_model, name).values())

    def before_task(self, t: int, task: Task) -> None:
        self._activate(t)

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

    def after_task(self, t: int, task: Task) -> None:
        current = [a.detach() for a, _ in self._factors(self.names[t])]
        found = {}
        for i in range(t):
            earlier = [a.detach() for a, _ in self._factors(self.names[i])]
            # One matrix per task: every layer's A stacked along d would mix layers, so sum squares per layer.
            squares = sum(residual(p, c)[0] ** 2 for p, c in zip(earlier, current))
            scale = (sum(torch.linalg.norm(p.float()).item() ** 2 for p in earlier)
                     * sum(torch.linalg.norm(c.float()).item() ** 2 for c in current)) ** 0.5
            found[i] = (squares ** 0.5, (squares ** 0.5) / scale if scale > 0 else 0.0)
        self.residuals[t] = found
        if found:  # to the tracker too: the worst overlap with any earlier task's LoRA, and the mean
            relative = [rel for _, rel in found.values()]
            self.ctx.log({"olora/residual_relative_max": max(relative),
                          "olora/residual_relative_mean": sum(relative) / len(relative)})

    # -- bookkeeping ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "residuals": {t: dict(r) for t, r in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("residuals", {})
        self.residuals = {int(t): {int(i): tuple(v) for i, v in r.items()} for t, r in saved.items()}
        # A run resumed mid-task skips before_task: re-activate the task it was training.
        self._activate(int(state.get("current", 0)))

    def extra_state_bytes(self) -> int:
        """The frozen LoRAs of the finished tasks, kept in the forward (the method's memory growth)."""
        return sum(p.numel() * p.element_size()
                   for n in self.names[:self.current] for pair in self._factors(n) for p in pair)

    def report(self) -> dict[str, Any]:
        stream = self.ctx.stream.names if self.ctx is not None else self.names
        per_task = []
        for t, name in enumerate(self.names):
            factors = self._factors(name)
            per_task.append({"task": stream[t], "adapter": name, "ranks": sorted({a.shape[0] for a, _ in factors}),
                             "layers": len(factors), "parameters": sum(a.numel() + b.numel() for a, b in factors)})
        residuals = {stream[t]: {stream[i]: {"frobenius": f, "relative": rel} for i, (f, rel) in r.items()}
                     for t, r in sorted(self.residuals.items())}
        return {"lambda_1": self.config.lambda_1, "lambda_2": self.config.lambda_2,
                "orthogonality": self.config.orthogonality, "adapters": per_task,
                "orthogonality_residual": residuals}
