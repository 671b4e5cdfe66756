"""GPM: Gradient Projection Memory (Saha et al. 2021, ICLR; code github.com/sahagobinda/GPM).

After each task, every target layer y = W x (svd_orthogonal's targets, `targets.py`) gets
its stored input basis M extended by the task's important input directions (`basis.py`,
from the Gram matrix of the inputs of `num_samples` examples, `activations.py`). While
later tasks train, every target's gradient is kept off span(M) on the input side,

    grad W <- grad W - grad W M M^T      (W out x in; GPT-2's Conv1D stores W^T: (I - M M^T) grad)

and, with `project_update` (default), AdamW's step is projected the same way after it
(its moments and weight decay move W inside span(M) otherwise; svd_orthogonal does the
same): W M stays at its task-start value, so W x is unchanged for every x in span(M).
Both projections are one-sided `cl_runner.ops` projections (the other side's basis None)
through svd_orthogonal's `ProjectionGroups` (same-shape targets batched, factored anchor
W_start M instead of a copy of W). The first task trains unconstrained (M is empty);
from the second on, `freeze_untargeted` (default) freezes every other parameter, so the
targets' inputs for earlier tasks' examples stay as they were too.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Strategy, plain_config, tensor_bytes
from cl_runner.strategies.gpm.basis import VARIANTS, extend_basis, threshold_at
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import register
from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner.strategies.svd_orthogonal.strategy import _default_targets
from cl_runner.strategies.svd_orthogonal.targets import Target, find_targets
from cl_runner.streams.task import Task

_STATE_VERSION = 1


@dataclass
class GPMConfig:
    name: str = "gpm"
    # Target patterns per model family (svd_orthogonal's option and defaults: attention and MLP
    # projections); a family not listed uses every 2-D weight inside the repeated blocks.
    targets: Dict[str, List[str]] = field(default_factory=_default_targets)
    # eps after the first task (the paper's Sec. 5 for 10-split CIFAR-100; main_cifar100.py line 297).
    threshold: float = 0.97
    # eps grows by this per task (main_cifar100.py line 297: 0.97 + task_id * 0.003), capped at 1.
    threshold_step: float = 0.003
    # Examples of the finished task whose inputs form R (main_cifar100.py line 193: 125 random
    # training samples; 100 in main_five_dataset.py, 300 in main_pmnist.py).
    num_samples: int = 125
    # Examples per no-grad forward of the activation pass (ours; a fixed number, so any
    # world size sums the same batches).
    activation_batch_size: int = 16
    # Re-project AdamW's weight update after each step (ours, as svd_orthogonal; the paper's SGD needs none).
    project_update: bool = True
    # paper: Eq. 5 at the first task (the fewest directions reaching eps) | authors: update_GPM's
    # first-task count (one fewer); later tasks are the same in both (Eq. 9).
    variant: str = "paper"
    # From the second task on, freeze every parameter that is not a target (embeddings, norms,
    # biases; the LM head, tied or not), so a target's inputs x, and with them its preserved
    # W x, are not moved by other parameters. The authors' nets have no biases and zero the
    # gradients of their 1-D (BatchNorm) parameters from the second task (main_cifar100.py
    # line 157). A classifier's head stays trainable: later tasks bring classes of their own.
    freeze_untargeted: bool = True
    # Keep AdamW's state across tasks instead of a fresh optimizer per task (the authors
    # build a new SGD optimizer per task).
    carry_optimizer: bool = False


@register("gpm", config=GPMConfig,
          summary="GPM: gradients kept off each layer's stored input subspace of earlier tasks (Saha et al. 2021)",
          adapters=("it projects the full weight matrices' gradients on their input side, and those stay "
                    "frozen under an adapter"),
          sharding="its projection (ProjectionGroups) works on whole, unsharded weight matrices",
          example=("strategy.threshold=0.999", "strategy.threshold_step=0"))
class GradientProjectionMemory(Strategy):
    def __init__(self, config: GPMConfig) -> None:
        super().__init__(config)
        c = config
        require(0.0 < c.threshold <= 1.0, "strategy.threshold", c.threshold,
                "use an energy fraction in (0, 1] (the paper: 0.97)")
        require(c.threshold_step >= 0.0, "strategy.threshold_step", c.threshold_step,
                "use a step >= 0 (0 keeps eps fixed; the paper: 0.003)")
        require(c.num_samples >= 1, "strategy.num_samples", c.num_samples, "use at least 1 example (the paper: 125)")
        require(c.activation_batch_size >= 1, "strategy.activation_batch_size", c.activation_batch_size,
                "use at least 1 example per forward")
        require_choice(c.variant, "strategy.variant", VARIANTS)
        self.targets: list[Target] = []
        self.groups: Optional[ProjectionGroups] = None
        self.bases: dict[str, torch.Tensor] = {}  # target name -> M (in x k), fp32
        self._in_task = False
        self._history: list[dict[str, Any]] = []
        self._frozen: list[str] = []
        # Parameters stop getting gradients after DDP wrapped the model (cl-run then finds unused ones).
        self.freezes_parameters = bool(c.freeze_untargeted)

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        from cl_runner.strategies.gpm.memory import estimate_gpm

        return estimate_gpm(self.config, inputs)

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.targets = find_targets(ctx.unwrapped_model, ctx.model_family, plain_config(self.config.targets) or {})
        self.groups = ProjectionGroups([(tg.name, tg.param) for tg in self.targets], mode="two_sided")

    @staticmethod
    def input_dim(tg: Target) -> int:
        return tg.shape[0] if tg.transposed else tg.shape[1]

    # ------------------------------------------------------------------ tasks
    def before_task(self, t: int, task: Task) -> None:
        kept = {name: m for name, m in self.bases.items() if m.shape[1]}
        self._in_task = bool(kept)
        if not kept:  # the first task (or nothing stored): trains unconstrained
            return
        # Conv1D keeps W^T (in x out): the input side is the left one; nn.Linear's is the right.
        sides = {tg.name: ((kept[tg.name], None) if tg.transposed else (None, kept[tg.name]))
                 for tg in self.targets if tg.name in kept}
        self.groups.set_bases(sides)
        if self.config.project_update:
            self.groups.snapshot_weights()
        self.groups.attach_grads()
        self._freeze_untargeted()

    def _freeze_untargeted(self) -> None:
        if not self.config.freeze_untargeted:
            return
        from cl_runner.models.adapters import head_modules

        model = self.ctx.unwrapped_model
        keep = {id(tg.param) for tg in self.targets}
        if self.ctx.model_kind == "classifier":
            keep |= {id(p) for head in head_modules(model).values() for p in head.parameters()}
        self._frozen = []
        for name, p in model.named_parameters():
            if id(p) not in keep and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None  # a carried optimizer skips parameters without a gradient
                self._frozen.append(name)

    def _unfreeze(self) -> None:
        params = dict(self.ctx.unwrapped_model.named_parameters())
        for name in self._frozen:
            params[name].requires_grad_(True)
        self._frozen = []

    def after_backward(self) -> None:
        if self._in_task:
            self.groups.project_grads_()

    def after_optimizer_step(self) -> None:
        if self._in_task and self.config.project_update:
            self.groups.project_weight_update_()

    def after_task(self, t: int, task: Task) -> None:
        self._frozen_during = list(self._frozen)
        self._unfreeze()
        started = time.perf_counter()
        batches, n_examples = self._activation_batches(t, task)
        from cl_runner.strategies.gpm.activations import input_grams

        grams, columns = input_grams(self.ctx.unwrapped_model, [tg.module for tg in self.targets],
                                     [self.input_dim(tg) for tg in self.targets], batches, self._forward,
                                     self.ctx.accelerator.autocast)
        eps = threshold_at(t, self.config.threshold, self.config.threshold_step)
        added, before, after = [], [], []
        for tg, gram in zip(self.targets, grams):
            update = extend_basis(gram, self.bases.get(tg.name), eps, self.config.variant)
            self.bases[tg.name] = update.basis.to(torch.float32).contiguous()
            added.append(update.added)
            before.append(update.energy_before)
            after.append(update.energy_after)
        self._in_task = False
        ks = [m.shape[1] for m in self.bases.values()]
        fractions = [self.bases[tg.name].shape[1] / self.input_dim(tg) for tg in self.targets]
        entry = {"task": t, "name": task.name, "threshold": eps, "examples": n_examples,
                 "columns_mean": sum(columns) / len(columns), "added": added,
                 "k_min": min(ks), "k_mean": sum(ks) / len(ks), "k_max": max(ks),
                 "preserved_fraction_mean": sum(fractions) / len(fractions),
                 "energy_kept_before_mean": sum(before) / len(before),
                 "energy_kept_after_mean": sum(after) / len(after),
                 "basis_seconds": time.perf_counter() - started, "basis_bytes": tensor_bytes(self.bases),
                 "frozen_untargeted": len(self._frozen_during)}
        self._history.append(entry)
        self.ctx.log({f"gpm/{k}": v for k, v in entry.items() if isinstance(v, (int, float)) and k != "task"})

    def _activation_batches(self, t: int, task: Task) -> tuple[list[dict[str, torch.Tensor]], int]:
        """`num_samples` training examples of task t (a sample seeded by (seed, t), in
        dataset order), collated in fixed-size batches (one example each for seq2seq)."""
        examples = list(task.train)
        n = self.config.num_samples
        if len(examples) > n:
            rng = random.Random(f"{self.ctx.seed}:gpm:{t}")
            examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]
        size = 1 if self.ctx.model_kind == "seq2seq" else self.config.activation_batch_size
        return [self.ctx.collate(examples[i:i + size]) for i in range(0, len(examples), size)], len(examples)

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        if self.ctx.model_kind == "classifier":
            return model(**{k: v for k, v in batch.items() if k not in ("labels", "label_mask")})
        return model(**batch)

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "in_task": self._in_task,
                "bases": {name: m.detach().cpu() for name, m in self.bases.items()},
                "groups": self.groups.state_dict() if self._in_task else None,
                "history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"gpm state version {state.get('version')!r}; this code reads version {_STATE_VERSION}")
        devices = {tg.name: tg.param.device for tg in self.targets}
        self.bases = {name: m.to(devices[name]) for name, m in state["bases"].items()}
        self._history = list(state["history"])
        self._in_task = bool(state["in_task"])
        if self._in_task:  # resumed mid-task: before_task is not called again; the task-start anchors come back
            self.groups.load_state_dict(state["groups"])
            self.groups.attach_grads()
            self._freeze_untargeted()

    def extra_state_bytes(self) -> int:
        """The stored bases M, and what ProjectionGroups holds for the task in progress
        (the bases as stored, or their complements, and the task-start anchors)."""
        return tensor_bytes(self.bases) + (self.groups.nbytes() if self._in_task else 0)

    def report(self) -> dict[str, Any]:
        return {"threshold": self.config.threshold, "threshold_step": self.config.threshold_step,
                "num_samples": self.config.num_samples, "variant": self.config.variant,
                "project_update": self.config.project_update,
                "freeze_untargeted": self.config.freeze_untargeted, "targets": len(self.targets),
                "tasks": list(self._history),
                "k_per_target": {tg.name: [int(self.bases[tg.name].shape[1]) if tg.name in self.bases else 0,
                                           self.input_dim(tg)] for tg in self.targets},
                "state_bytes": self.extra_state_bytes()}
