"""Continual task arithmetic (strategy `continual_task_arithmetic`): OPCM's first baseline.

Tang et al. 2025 (arXiv 2501.09522, Sec. 5 baselines), reference code FusionBench
`fusion_bench/method/opcm/task_arithmetic.py` (`ContinualTaskArithmeticForCLIP`); task
arithmetic itself is Ilharco et al. 2023 (arXiv 2212.04089). Each task fine-tunes from
theta_0 (life cycle in `merging.py`), then a running sum with a fixed scale:

    merged <- merged + lambda * tau_t,      i.e. theta = theta_0 + lambda * sum_{i<=t} tau_i,

lambda = `scaling_factor` (FusionBench's continual config: 0.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cl_runner.errors import require
from cl_runner.ops.merging import vector_norm
from cl_runner.strategies.parts.merging import FSDP_REFUSAL, ContinualMerging
from cl_runner.strategies.registry import register


@dataclass
class ContinualTaskArithmeticConfig:
    name: str = "continual_task_arithmetic"
    # lambda, in (0, 1] (FusionBench config/method/opcm/task_arithmetic.yaml: 0.3)
    scaling_factor: float = 0.3
    classifier_head: str = "sum"
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])
    state_on_cpu: bool = False


def check_scaling_factor(value: float) -> None:
    require(0.0 < value <= 1.0, "strategy.scaling_factor", value, "use a lambda in (0, 1] (task arithmetic sweeps 0.1..1.0)")


@register("continual_task_arithmetic", config=ContinualTaskArithmeticConfig,
          summary="continual task arithmetic: every task from theta_0, task vectors summed with a fixed scale",
          sharding=FSDP_REFUSAL)
class ContinualTaskArithmetic(ContinualMerging):
    def __init__(self, config: ContinualTaskArithmeticConfig) -> None:
        super().__init__(config)
        check_scaling_factor(config.scaling_factor)

    def merge(self, t: int, tau: dict[str, torch.Tensor]) -> dict[str, Any]:
        for n, delta in tau.items():
            self.merged[n].add_(delta, alpha=self.config.scaling_factor)
        return {"task_vector_norm": vector_norm(tau.values()),
                "merged_norm": vector_norm(self.merged[n] for n in tau)}

    def report(self) -> dict[str, Any]:
        return {"scaling_factor": self.config.scaling_factor, **super().report()}
