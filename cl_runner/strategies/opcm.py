"""OPCM: Orthogonal Projection-based Continual Merging (strategy `opcm`).

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging" (arXiv 2501.09522, Sec. 4); reference implementation:
FusionBench `fusion_bench/method/opcm/opcm.py` (`OPCMForCLIP`) and `opcm_general.py` (`OPCM`).
Each task fine-tunes from theta_0 (life cycle in `merging.py`); then, with M the merged
update so far (already divided by lambda_{t-1}):

- every linear layer's weight (nn.Linear, as the reference code selects them; also GPT-2's
  Conv1D, our addition): tau's component in the principal block of M (the top r left and
  right singular directions, r from `alpha`, see `ops.merging.split_rank`) is removed, and
  with `zero_diagonal` its component along every u_i v_i^T (`ops.merging.opcm_project`);
- every other parameter (embeddings, norms, biases): tau unchanged;
- S = lambda_{t-1} M + P(tau);  lambda_t = ||S|| / mean_{i<=t} ||tau_i||;  M <- S / lambda_t,
  norms over the whole model, so the merged update keeps the mean task vector norm
  (lambda_t grows about like sqrt(t) when the projected updates are orthogonal).

The first task's model is the merged model as is (lambda_1 = 1), as in the reference code.
"Non-matrix parameters averaged" means this rule: summed and divided by the same lambda_t.

Where the released code differs from FusionBench: the paper's own repository
(github.com/tanganke/opcm, `fusion_bench/method/opcm/opcm.py`) calls `.diag().fill_(0)`,
which fills a copy and leaves the diagonal in place; FusionBench calls `.diagonal()`, which
zeroes it. `zero_diagonal: true` (default) is FusionBench's; `false` reproduces the released
repository's numbers. FusionBench's `shuffle_order` does not apply: the stream fixes the order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cl_runner.errors import require
from cl_runner.ops.merging import opcm_merge_, vector_norm
from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.parts.merging import FSDP_REFUSAL, ContinualMerging
from cl_runner.strategies.registry import register


@dataclass
class OPCMConfig:
    name: str = "opcm"
    # Principal share of the merged update's singular values (FusionBench default 0.5; the
    # paper sweeps 0.1..1.0). Must be in [0, 1).
    alpha: float = 0.5
    # Also remove tau's component along every u_i v_i^T (FusionBench); false: the released repo.
    zero_diagonal: bool = True
    # classifier models: sum (each task's head update kept as trained) | merge (like any parameter)
    classifier_head: str = "sum"
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])
    # Keep theta_0 and the merged update in host memory (the merge then runs on the CPU).
    state_on_cpu: bool = False


def linear_weight_names(model: nn.Module) -> list[str]:
    """Names of the weights of nn.Linear and GPT-2 Conv1D modules, as named_parameters lists
    them (a weight tied to an embedding is listed once, under the embedding, and is not one)."""
    listed = {n for n, _ in model.named_parameters()}
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            name = f"{module_name}.weight" if module_name else "weight"
            weight = getattr(module, "weight", None)
            if name in listed and weight is not None and weight.dim() == 2:
                names.append(name)
    return names


@register("opcm", config=OPCMConfig,
          summary="OPCM: task vectors merged after projection off the earlier merges' top singular subspaces",
          sharding=FSDP_REFUSAL)
class OrthogonalProjectionMerging(ContinualMerging):
    def __init__(self, config: OPCMConfig) -> None:
        super().__init__(config)
        require(0.0 <= config.alpha < 1.0, "strategy.alpha", config.alpha,
                "use a share in [0, 1) (0.5 is the reference code's default; at 1.0 no share exceeds alpha)")
        self.lam = 1.0
        self.task_norms: list[float] = []
        self.matrices: list[str] = []

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.matrices = [n for n in linear_weight_names(ctx.unwrapped_model) if n not in set(self.head_names)]

    def merge(self, t: int, tau: dict[str, torch.Tensor]) -> dict[str, Any]:
        norm = vector_norm(tau.values())
        self.task_norms.append(norm)
        mean_norm = sum(self.task_norms) / len(self.task_norms)
        body = {n: self.merged[n] for n in tau}
        if self.tasks_merged == 0:
            for n, m in body.items():
                m.copy_(tau[n])
            self.lam, infos = 1.0, {}
        else:
            self.lam, infos = opcm_merge_(body, tau, self.lam, mean_norm, self.matrices,
                                          self.config.alpha, self.config.zero_diagonal)
        layers = {n: {"split_rank": i.split_rank, "rank": i.rank, "projected_fraction": round(i.projected_fraction, 6)}
                  for n, i in infos.items()}
        fractions = [i.projected_fraction for i in infos.values()]
        return {"lambda": self.lam, "task_vector_norm": norm, "mean_task_vector_norm": mean_norm,
                "merged_norm": vector_norm(body.values()),
                "mean_projected_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
                "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lambda": self.lam, "task_norms": list(self.task_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam = float(state["lambda"])
        self.task_norms = [float(v) for v in state["task_norms"]]

    def report(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "zero_diagonal": self.config.zero_diagonal,
                "projected_matrices": len(self.matrices), **super().report()}
