"""LiNeS: post-training layer scaling of the task vector (add-on `lines`).

Wang et al. 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging". With the task vector tau = theta_after - theta_ref, every parameter of the
l-th of L repeated blocks is rescaled by

    lambda(l) = alpha + beta * l / (L - 1),        theta <- theta_ref + lambda * tau,

so shallow blocks stay close to the reference (general features kept) and deep blocks keep
most of the task update. Parameters outside the blocks (embeddings, final norm, heads) get
alpha (the reference code's rule) or alpha + beta (`head_scale: alpha_plus_beta`).

Models with several block stacks (T5: encoder.block and decoder.block) apply the rule
within each stack: l and L are the block's index and the depth of its own stack, so both
the first encoder block and the first decoder block get alpha.

The paper edits a single fine-tuned model; its continual use here is our design:
`reference: previous_task` (default: the weights task t started from) or `pretrained`
(theta_0), applied to the training state after each task (`apply_to: train_state`) or only
to the weights that are evaluated (`eval_only`, the training weights come back afterwards).

In a stream, with Delta_k task k's own update (theta_after_k = theta_{k-1} + Delta_k):

- previous_task + train_state (default): theta_k = theta_{k-1} + lambda Delta_k, so after
  T tasks theta_T = theta_0 + sum_k lambda Delta_k: every task's update is scaled once.
- pretrained + train_state: theta_k - theta_0 = lambda (theta_{k-1} - theta_0) + lambda
  Delta_k, so theta_T = theta_0 + sum_k lambda^(T-k+1) Delta_k: the scaling compounds
  (0.5^15 ~ 3e-5 of task 1's update in the first block after 15 tasks at alpha 0.5). An
  explicit option only; setup logs a warning.
- pretrained + eval_only: the paper's single-shot edit of the whole task vector
  theta_after - theta_0, applied to the evaluated copy only (no compounding).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from cl_runner.errors import require_choice
from cl_runner.models.parts import BlockPosition, parameter_blocks
from cl_runner.strategies.base import Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, gib
from cl_runner.strategies.registry import ADDON, register
from cl_runner.streams.task import Task

HEAD_SCALES = ("alpha", "alpha_plus_beta")
REFERENCES = ("pretrained", "previous_task")
APPLY_TO = ("train_state", "eval_only")

log = logging.getLogger(__name__)


@dataclass
class LinesConfig:
    enabled: bool = False
    # Scale of the shallowest block and (head_scale: alpha) of everything outside the blocks.
    alpha: float = 0.5
    # Extra scale the deepest block gets over the shallowest; None = 1 - alpha.
    beta: Optional[float] = None
    # Scale of parameters outside the blocks: alpha | alpha_plus_beta
    head_scale: str = "alpha"
    # theta_ref: previous_task (the weights the task started from: each task's own update
    # scaled once) | pretrained (theta_0; with train_state the scaling compounds over tasks)
    reference: str = "previous_task"
    # train_state (rescale the weights after each task) | eval_only (only the evaluated copy)
    apply_to: str = "train_state"
    # Keep theta_ref (fp32) in host memory instead of on the model's device.
    reference_on_cpu: bool = False


def lines_coefficients(positions: Mapping[str, Optional[BlockPosition]], alpha: float, beta: float,
                       head_scale: str = "alpha") -> dict[str, float]:
    """LiNeS scale per parameter name: alpha + beta * l / (L - 1) inside block l of a stack
    of depth L; alpha (or alpha + beta) outside the blocks."""
    require_choice(head_scale, "lines.head_scale", HEAD_SCALES)
    outside = alpha if head_scale == "alpha" else alpha + beta
    coefficients = {}
    for name, pos in positions.items():
        if pos is None:
            coefficients[name] = outside
        else:
            coefficients[name] = alpha + beta * pos.index / max(1, pos.depth - 1)
    return coefficients


def scale_task_vector_(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                       coefficients: Mapping[str, float]) -> None:
    """In place: theta <- theta_ref + lambda * (theta - theta_ref), in fp32."""
    with torch.no_grad():
        for name, ref in reference.items():
            p = params[name]
            ref = ref.to(p.device)
            scaled = torch.lerp(ref, p.detach().float(), coefficients[name])  # ref + lam * (p - ref)
            p.copy_(scaled.to(p.dtype))


@register("lines", config=LinesConfig, kind=ADDON, order=30,
          summary="LiNeS: each task's update scaled down in shallow blocks, kept in deep ones",
          adapters=("it rescales the task vector of the base weights block by block, and under an adapter the base "
                    "weights do not move"))
class LayerScaling(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        node, params = self.config, inputs.facts.params
        if node.reference_on_cpu:
            return StrategyEstimate(self.name, notes=[f"lines: its fp32 reference ({gib(FP32 * params)}) is in "
                                                      "host memory (reference_on_cpu)"])
        est = StrategyEstimate(self.name, state_bytes=FP32 * params, notes=["lines: one fp32 reference copy of the weights"])
        if node.apply_to == "eval_only":
            est.transient_bytes = inputs.param_bytes * params
            est.transient_note = "eval_only: a copy of the weights while the scaled ones are evaluated"
        return est

    def __init__(self, config: LinesConfig) -> None:
        super().__init__(config)
        for key, allowed in (("head_scale", HEAD_SCALES), ("reference", REFERENCES), ("apply_to", APPLY_TO)):
            require_choice(getattr(config, key), f"lines.{key}", allowed)
        self.alpha = float(config.alpha)
        self.beta = 1.0 - self.alpha if config.beta is None else float(config.beta)
        self.reference: dict[str, torch.Tensor] = {}
        self.coefficients: dict[str, float] = {}
        self.applied: list[int] = []  # tasks whose weights were rescaled (train_state) or evaluated scaled

    # -- life cycle ---------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        model = ctx.unwrapped_model
        blocks = parameter_blocks(model)
        self.coefficients = lines_coefficients(blocks, self.alpha, self.beta, self.config.head_scale)
        if self.config.reference == "pretrained" and self.config.apply_to == "train_state":
            log.warning("lines.reference=pretrained with lines.apply_to=train_state compounds: task k's update "
                        "ends up scaled by lambda^(T-k+1) after T tasks (alpha %.2f: %.1e of the first task's update "
                        "in the first block after 15 tasks); lines.reference=previous_task scales each task's "
                        "update once", self.alpha, self.alpha ** 15)
        if self.config.reference == "pretrained":
            # theta_0: setup runs before a checkpoint is restored, so this is the built
            # model both in a fresh and in a resumed run (model building is seeded).
            self._snapshot_reference()

    def before_task(self, t: int, task: Task) -> None:
        if self.config.reference == "previous_task":
            self._snapshot_reference()

    def after_task(self, t: int, task: Task) -> None:
        if self.config.apply_to == "train_state":
            scale_task_vector_(self._params(), self.reference, self.coefficients)
            self.applied.append(t)

    @contextlib.contextmanager
    def evaluation_weights(self, t: int):
        if self.config.apply_to != "eval_only":
            yield
            return
        params = self._params()
        backup = {n: params[n].detach().clone() for n in self.reference}
        try:
            scale_task_vector_(params, self.reference, self.coefficients)
            self.applied.append(t)
            yield
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    params[name].copy_(saved)

    # -- helpers ------------------------------------------------------------------
    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.ctx.unwrapped_model.named_parameters())

    def _snapshot_reference(self) -> None:
        device = "cpu" if self.config.reference_on_cpu else None
        self.reference = {
            n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for n, p in self._params().items() if p.is_floating_point()
        }

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"applied": list(self.applied)}
        if self.config.reference == "previous_task":
            # The weights task t started from cannot be rebuilt on resume mid-task.
            state["reference"] = self.reference
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = list(state.get("applied", []))
        if "reference" in state and state["reference"]:
            params = self._params()
            device = "cpu" if self.config.reference_on_cpu else None
            self.reference = {n: r.to(device=device or params[n].device, dtype=torch.float32)
                              for n, r in state["reference"].items()}

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.reference)

    def report(self) -> dict[str, Any]:
        values = list(self.coefficients.values())
        return {
            "alpha": self.alpha, "beta": self.beta, "head_scale": self.config.head_scale,
            "reference": self.config.reference, "apply_to": self.config.apply_to,
            "min_scale": min(values) if values else None, "max_scale": max(values) if values else None,
            "tasks_scaled": list(self.applied),
        }
