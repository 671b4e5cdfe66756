"""Progressive Prompts (Razdaibiedina et al. 2023, ICLR, arXiv 2301.12314; code
github.com/arazd/ProgressivePrompts; TRACE's version model/Dynamic_network/PP.py).

Task t trains a new soft prompt P_t (model.prompt.length vectors) in front of the frozen
backbone; the input is [P_t; P_{t-1}; ...; P_1; x], the earlier prompts frozen, so what
tasks 1..t-1 learned is never overwritten. Optionally P_t goes through a residual MLP
while it trains (the paper's reparameterisation); after the task the MLP's output is kept
as P_t and the MLP starts afresh for the next task. The prompts and their order are
`parts/prompt_sources.py`; docs/strategies.md lists every default with its source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.prompt_sources import REPARAMETERIZATIONS, ProgressivePrompts
from cl_runner.strategies.parts.prompt_strategy import NO_ADAPTERS, NO_SHARDING, PromptStrategy
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task


@dataclass
class ProgPromptConfig:
    name: str = "prog_prompt"
    # none | mlp1 (the authors' ResMLP 'MLP1': Linear-ReLU-Linear-LayerNorm, + x) | mlp2
    # (ResMLP 'MLP2': Linear-ReLU-Linear-Tanh-Linear, + x; TRACE's convert_PP_model builds it).
    reparameterize: str = "mlp2"
    # The MLP's bottleneck; null = 2 x the embedding width (TRACE: bottleneck_size=2*embed_tokens_dim).
    bottleneck: Optional[int] = None
    # Initial prompt vectors scaled by this (TRACE's init_new_prompt: a random token's row / 100).
    init_scale: float = 0.01


@register("prog_prompt", config=ProgPromptConfig,
          summary="Progressive Prompts: a new soft prompt per task, the earlier ones frozen and concatenated",
          adapters=NO_ADAPTERS, sharding=NO_SHARDING,
          example=("model.prompt.length=2",))
class ProgressivePrompting(PromptStrategy):
    # The earlier and later tasks' prompts get no gradient after DDP wrapped the model.
    freezes_parameters = True
    suggested_length = 20

    def __init__(self, config: ProgPromptConfig) -> None:
        super().__init__(config)
        require_choice(config.reparameterize, "strategy.reparameterize", REPARAMETERIZATIONS)
        require(config.bottleneck is None or config.bottleneck >= 1, "strategy.bottleneck", config.bottleneck,
                "use a positive width, or null for 2 x the embedding width")
        require(config.init_scale > 0 and config.init_scale != float("inf"), "strategy.init_scale",
                config.init_scale, "use a finite value > 0 (TRACE: 0.01)")

    def _owns(self, source: nn.Module) -> bool:
        return isinstance(source, ProgressivePrompts)

    def prompt_source(self, maker: Any, num_tasks: int) -> Optional[nn.Module]:
        cfg = self.config
        bottleneck = cfg.bottleneck or 2 * maker.width
        return ProgressivePrompts(maker.vectors(num_tasks, scale=cfg.init_scale), cfg.reparameterize, bottleneck)

    def setup(self, ctx: Any) -> None:
        super().setup(ctx)
        self._activate(0)

    def _activate(self, t: int) -> None:
        """Task t's prompt (and the MLP) train; every other prompt is frozen."""
        self.source.current = t
        for i, prompt in enumerate(self.source.prompts):
            trains = i == t and i >= self.source.finished
            prompt.requires_grad_(trains)
            if not trains:
                prompt.grad = None  # no stale gradient for clipping's norm to count
        if self.source.mlp is not None:
            self.source.mlp.requires_grad_(True)

    def before_task(self, t: int, task: Task) -> None:
        if self.source.mlp is not None:
            # A new MLP for the new task, from a generator of its own: the same weights
            # whatever drew random numbers before (and on every process).
            self.source.mlp.reset(torch.Generator().manual_seed(self.ctx.seed * 1000 + t))
        self._activate(t)

    def after_task(self, t: int, task: Task) -> None:
        self.source.fold(t)
        self._activate(t)  # its prompt is final now: frozen until the run ends

    # -- cost and bookkeeping ---------------------------------------------------------------
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        cfg = self.config
        width, length = inputs.facts.hidden, int(inputs.cfg.model.prompt.length)
        prompts = inputs.n_tasks * length * width
        mlp = 0
        if cfg.reparameterize != "none":
            b = cfg.bottleneck or 2 * width
            mlp = (width * b + b + b * width + width + 2 * width) if cfg.reparameterize == "mlp1" else \
                (width * b + b + b * (b // 2) + b // 2 + (b // 2) * width + width)
        return StrategyEstimate(self.name, state_bytes=(prompts + mlp) * FP32,
                                trainable_params=length * width + mlp + self.head_params(inputs), notes=[
                                    f"{self.name}: one prompt of {length} vectors per task, {count(prompts)} fp32 "
                                    f"parameters after {inputs.n_tasks} tasks (the earlier ones frozen)"
                                    + (f", and the reparameterisation MLP, {count(mlp)}" if mlp else "")])

    def extra_state_bytes(self) -> int:
        """The frozen prompts of the finished tasks (the method's memory growth)."""
        if self.ctx is None:
            return 0
        return sum(p.numel() * p.element_size() for p in list(self.source.prompts)[:self.source.finished])

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.source.current, "finished": self.source.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.finished = int(state.get("finished", 0))
        self._activate(int(state.get("current", 0)))

    def report(self) -> dict[str, Any]:
        prompts = list(self.source.prompts) if self.ctx is not None else []
        return {"reparameterize": self.config.reparameterize, "prompt_length": prompts[0].shape[0] if prompts else 0,
                "tasks_finished": self.source.finished if self.ctx is not None else 0,
                "prompt_norms": [float(p.detach().float().norm()) for p in prompts[:self.source.finished]]
                if self.ctx is not None else []}
