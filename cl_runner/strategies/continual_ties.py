"""Continual TIES-merging (strategy `continual_ties`): OPCM's second baseline.

Tang et al. 2025 (arXiv 2501.09522, Sec. 5 baselines), reference code FusionBench
`fusion_bench/method/opcm/ties_merging.py` (`ContinualTiesMergingForCLIP`); TIES is Yadav et
al. 2023 (arXiv 2306.01708). Each task fine-tunes from theta_0 (life cycle in `merging.py`);
with M the merged update so far:

    task 1:   M <- lambda * tau_1
    task t:   M <- M + lambda * TIES(M, tau_t)

where TIES trims each of the two vectors (the whole model as one vector) to its top
`threshold` percent of entries by magnitude, elects a sign per entry and merges the agreeing
entries (`merge_func`: sum, FusionBench's default here; mean, the TIES paper's; max); see
`ops.merging.ties_merge_dicts`. The rule is the reference code's: M itself is one of the two
merged vectors and is also kept, so M's surviving entries count 1 + lambda times.
Defaults from FusionBench config/method/opcm/ties_merging.yaml: lambda 0.5, threshold 20.
Memory: the trim threshold needs each vector flattened once (P fp32, transient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cl_runner.errors import require, require_choice
from cl_runner.ops.merging import MERGE_FUNCS, ties_merge_dicts, vector_norm
from cl_runner.strategies.continual_task_arithmetic import check_scaling_factor
from cl_runner.strategies.parts.merging import FSDP_REFUSAL, ContinualMerging
from cl_runner.strategies.registry import register


@dataclass
class ContinualTiesConfig:
    name: str = "continual_ties"
    scaling_factor: float = 0.5  # lambda, in (0, 1]
    # Percent of each vector's entries kept by the trim, in (1, 100] (TIES' k = 20%).
    threshold: float = 20.0
    merge_func: str = "sum"  # sum | mean | max
    classifier_head: str = "sum"
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])
    state_on_cpu: bool = False


@register("continual_ties", config=ContinualTiesConfig,
          summary="continual TIES merging: trimmed, sign-elected task vectors merged after each task",
          sharding=FSDP_REFUSAL)
class ContinualTies(ContinualMerging):
    def __init__(self, config: ContinualTiesConfig) -> None:
        super().__init__(config)
        check_scaling_factor(config.scaling_factor)
        require(1.0 < config.threshold <= 100.0, "strategy.threshold", config.threshold,
                "it is the percent of entries kept, in (1, 100] (e.g. 20 for the top 20%; FusionBench reads "
                "values <= 1 as a fraction)")
        require_choice(config.merge_func, "strategy.merge_func", MERGE_FUNCS)

    def merge(self, t: int, tau: dict[str, torch.Tensor]) -> dict[str, Any]:
        body = {n: self.merged[n] for n in tau}
        kept = [1.0]
        if self.tasks_merged == 0:
            update = tau  # the reference code merges the first task vector untrimmed
        else:
            update, kept = ties_merge_dicts([body, tau], self.config.threshold, self.config.merge_func)
        for n, m in body.items():
            m.add_(update[n], alpha=self.config.scaling_factor)
        return {"task_vector_norm": vector_norm(tau.values()), "merged_norm": vector_norm(body.values()),
                "kept_fraction": kept[-1]}

    def report(self) -> dict[str, Any]:
        return {"scaling_factor": self.config.scaling_factor, "threshold": self.config.threshold,
                "merge_func": self.config.merge_func, **super().report()}
