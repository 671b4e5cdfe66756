"""One LoRA per task, the earlier ones frozen and kept in the forward: the adapter life
cycle O-LoRA (`strategies/olora.py`) and IncLoRA (`strategies/inc_lora.py`) share.

Every adapter is created before the model is wrapped (`adapter_names`), so checkpoints
always hold the same keys and a resumed run only has to re-activate the current task's.
After each task the overlap of its LoRA's A matrices with every earlier task's is
measured (`residual`): O-LoRA's penalty drives it to zero, IncLoRA shows what happens
without one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate, count
from cl_runner.streams.task import Task


def residual(previous: torch.Tensor, current: torch.Tensor) -> tuple[float, float]:
    """(||A_i A_t^T||_F, the same divided by ||A_i||_F ||A_t||_F: 0 orthogonal, <= 1 always)."""
    norm = torch.linalg.norm(previous.float() @ current.float().T).item()
    scale = (torch.linalg.norm(previous.float()) * torch.linalg.norm(current.float())).item()
    return norm, (norm / scale if scale > 0 else 0.0)


class PerTaskLoRA(Strategy):
    """Task t trains adapter task_{t+1}; adapters task_1..task_t stay active and frozen."""

    # Earlier tasks' adapters stop getting gradients after DDP wrapped the model.
    freezes_parameters = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.names: list[str] = []
        self.current = 0
        # residuals[t][i] = (frobenius, relative) of tasks t and i < t, over all layers together.
        self.residuals: dict[int, dict[int, tuple[float, float]]] = {}

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        kept = max(0, inputs.n_tasks - 1) * (inputs.adapter_params or 0)
        return StrategyEstimate(self.name, state_bytes=kept * inputs.param_bytes, notes=[
            f"{self.name}: the frozen LoRAs of the finished tasks, {count(kept)} parameters after the last task"])

    def check_run_config(self, cfg: Any) -> None:
        adapter = cfg.model.get("adapter", "none")
        if adapter != "lora":
            raise ValueError(f"strategy={self.name} trains one LoRA per task, but model.adapter={adapter}; "
                             f"set model.adapter=lora (configs/strategy/{self.name}.yaml does unless overridden)")

    def adapter_names(self, num_tasks: int) -> Optional[list[str]]:
        self.names = [f"task_{k + 1}" for k in range(num_tasks)]
        return list(self.names)

    def setup(self, ctx: StrategyContext) -> None:
        from cl_runner.models.adapters import is_adapted

        super().setup(ctx)
        model = ctx.unwrapped_model
        if not is_adapted(model) or any(n not in model.peft_config for n in self.names) or not self.names:
            raise ValueError(f"strategy={self.name} needs the model built with one LoRA per task "
                             f"(model.adapter=lora, adapters from {type(self).__name__}.adapter_names)")
        self._activate(0)

    # -- adapters -----------------------------------------------------------------------
    def _activate(self, t: int) -> None:
        from cl_runner.models.adapters import activate

        self.current = t
        activate(self.ctx.unwrapped_model, self.names[:t + 1], trainable=self.names[t])
        self._activated(t)

    def _activated(self, t: int) -> None:
        """After task t's adapter became the trainable one (O-LoRA caches its penalty's tensors)."""

    def _factors(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from cl_runner.models.adapters import lora_factors

        return list(lora_factors(self.ctx.unwrapped_model, name).values())

    def before_task(self, t: int, task: Task) -> None:
        self._activate(t)

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
            self.ctx.log({f"{self.name}/residual_relative_max": max(relative),
                          f"{self.name}/residual_relative_mean": sum(relative) / len(relative)})

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
        return {"adapters": per_task, "orthogonality_residual": residuals}
