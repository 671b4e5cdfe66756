"""The life cycle shared by the continual merging strategies (opcm, continual_task_arithmetic,
continual_ties); the merge rules themselves are pure functions in `cl_runner/ops/merging.py`.

Continual model merging (Tang et al. 2025, arXiv 2501.09522, Sec. 3) turns a stream of
fine-tuned models into one: every task fine-tunes from the pretrained weights theta_0 (not
from the previous task's), its task vector tau_t = theta_t - theta_0 is folded into one
running merged update, and the model evaluated after task t is theta_0 + merged. Memory is
constant in the number of tasks: theta_0 and the merged update (fp32), never a past model.

    before_task  weights <- theta_0
    after_task   tau = weights - theta_0;  merged <- merge(merged, tau);  weights <- theta_0 + merged

So the checkpoint at a task boundary holds the merged model, and the strategy state holds
theta_0, the merged update and the merge count: a run resumed at a boundary or mid-task
continues with the same R.

Classifier heads (`model.kind=classifier`, e.g. MiniLM): the paper's CLIP models keep one
zero-shot head per task outside the merge. Here the head is one layer whose rows are the
classes of all tasks, and a task trains only its own classes' rows (the loss masks the
others), so `classifier_head: sum` (default) keeps every task's head update as trained:
head = head_0 + sum_t tau_head,t, outside the projection, the scaling and the trimming
(exactly the per-task heads when tasks share no label; a label shared by several tasks,
with `model.head_sharing=label_string`, gets the sum of their updates).
`classifier_head: merge` treats the head like any other parameter.
"""
from __future__ import annotations

from typing import Any

import torch

from cl_runner.distributed.sharding import is_sharded
from cl_runner.errors import require_choice
from cl_runner.strategies.base import Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count, gib
from cl_runner.streams.task import Task

HEAD_RULES = ("sum", "merge")


# Why the merging strategies refuse trainer.sharding=fsdp (their registrations say it).
FSDP_REFUSAL = "its merge needs every weight matrix whole on one process (an SVD or a model-wide top-k)"


def head_parameter_names(named: list[str], head_modules: list[str]) -> list[str]:
    """Parameters inside a top-level module listed in `head_modules` (HF: `classifier`, `score`)."""
    return [n for n in named if n.split(".", 1)[0] in set(head_modules)]


class ContinualMerging(Strategy):
    """Subclasses set `name` (via the registry) and implement `merge(t, tau)`, which updates
    `self.merged[n]` in place for every n in `tau` (the task vector without the head under
    `classifier_head: sum`) and returns what the report keeps for this merge."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        require_choice(config.classifier_head, "strategy.classifier_head", HEAD_RULES)
        self.theta0: dict[str, torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}
        self.head_names: list[str] = []
        self.tasks_merged = 0
        self.history: list[dict[str, Any]] = []

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        """theta_0 and the merged update, fp32 copies of every floating parameter."""
        copies = 2 * FP32 * inputs.trainable
        what = (f"{self.name}: theta_0 and the merged update, 2 fp32 copies of the {count(inputs.trainable)} "
                "trained parameters")
        if self.config.state_on_cpu:
            return StrategyEstimate(self.name, notes=[f"{what} ({gib(copies)}), in host memory (state_on_cpu)"])
        return StrategyEstimate(self.name, state_bytes=copies, notes=[what],
                                transient_bytes=2 * FP32 * inputs.trainable,
                                transient_note="after a task: its task vector tau (fp32) and theta_0 + merged, built "
                                               "whole (fp32) before it is loaded, beside theta_0 and the merge")

    # -- life cycle ---------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        params = self._params()
        if any(is_sharded(p) for p in params.values()):  # a stack built without build_strategy
            raise ValueError(f"strategy={self.name} cannot run with trainer.sharding=fsdp: {FSDP_REFUSAL}")
        if ctx.model_kind == "classifier" and self.config.classifier_head == "sum":
            self.head_names = head_parameter_names(list(params), list(self.config.head_modules))
            if not self.head_names:
                raise ValueError(f"bad value for 'strategy.head_modules': {list(self.config.head_modules)!r} names no "
                                 f"top-level module of this classifier; name its head module, or set "
                                 f"strategy.classifier_head=merge")
        # theta_0: setup runs before a checkpoint is restored, so this is the built model
        # (seeded) both in a fresh and a resumed run; the state's copy replaces it on resume.
        device = "cpu" if self.config.state_on_cpu else None
        self.theta0 = {n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                       for n, p in params.items() if p.is_floating_point()}
        self.merged = {n: torch.zeros_like(v) for n, v in self.theta0.items()}

    def before_task(self, t: int, task: Task) -> None:
        self._load(self.theta0)  # every task fine-tunes from the pretrained weights

    def after_task(self, t: int, task: Task) -> None:
        params = self._params()
        with torch.no_grad():
            tau = {n: params[n].detach().to(ref.device, torch.float32) - ref for n, ref in self.theta0.items()}
            head = {n: tau.pop(n) for n in self.head_names}
            entry = {"task": t + 1, **self.merge(t, tau)}
            for n, delta in head.items():
                self.merged[n].add_(delta)
        self.tasks_merged += 1
        self.history.append(entry)
        # The per-merge numbers (lambda, norms) also go to the tracker, as a train-step series.
        self.ctx.log({f"{self.name}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
        self._load({n: self.theta0[n] + self.merged[n] for n in self.theta0})

    def merge(self, t: int, tau: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------
    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.ctx.unwrapped_model.named_parameters())

    def _load(self, values: dict[str, torch.Tensor]) -> None:
        params = self._params()
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v.to(device=params[n].device, dtype=params[n].dtype))

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "merged": self.merged, "tasks_merged": self.tasks_merged,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def placed(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # A copy: the merge updates these in place, never the caller's tensors.
            return {n: v.to(device=self.theta0[n].device, dtype=torch.float32, copy=True) for n, v in values.items()}

        self.theta0 = placed(state["theta0"])
        self.merged = placed(state["merged"])
        self.tasks_merged = int(state["tasks_merged"])
        self.history = list(state.get("history", []))

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.theta0) + tensor_bytes(self.merged)

    def report(self) -> dict[str, Any]:
        return {"tasks_merged": self.tasks_merged, "classifier_head": self.config.classifier_head,
                "head_parameters": list(self.head_names), "state_bytes": self.extra_state_bytes(),
                "merges": list(self.history)}
