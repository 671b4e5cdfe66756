"""svd_orthogonal: adaptive-SVD orthogonal full fine-tuning.

Sculpting Subspaces (Nayak et al. 2025, arXiv:2504.07097) and its production form, OSFT
in Red Hat's mini_trainer. At the start of every task each target matrix W (m x n) is
split by its top-k singular directions U (m x k), V (n x k) into a preserved part and a
trainable rest; the task then trains W only outside the preserved subspace:

- after every backward (on the accumulated gradient, once per optimizer step):
  `two_sided` G <- (I - UUᵀ) G (I - VVᵀ) (what mini_trainer's factored update allows), or
  `high_block` G <- G - U (UᵀGV) Vᵀ (the formula written in the paper);
- after every optimizer step, AdamW's element-wise scaling and decoupled weight decay move
  W out of that set again, so the step's update is projected back (W <- W_0 + P(W - W_0),
  done by `ProjectionGroups` from a factored anchor of the task-start weights).
  Over a task, Uᵀ (W_end − W_start) V = 0 (two_sided: also Uᵀ ΔW = 0 and ΔW V = 0).

`projection_point` says which of the two run: `both` (the above, the default), `update`
(only the update projection: the constraint stays exact with one projection a step, and
AdamW's moments see the raw gradient), `gradient` (only the gradient projection, as the
authors' and mini_trainer's code do: under AdamW the update then drifts out of the
allowed set; `measure_drift: true` reports by how much).

k per matrix comes from `rank` (adaptive importance or a fixed ratio), the targets
from `targets`. `first_task: full` (default) trains the first task unconstrained, as
the authors do (our spec, ../shared/specs/strategies.md; the paper text and the authors'
code were not re-checked here): task 0 computes no bases and projects nothing (unsharded
and FSDP-sharded alike) and is recorded with k = 0; `constrained` preserves the pretrained
weights' top-k from task 0 on. All SVD and projection math runs in `cl_runner.ops`.
Beyond the paper: `bases: accumulate` keeps the union of the preserved subspaces of all
past tasks (old directions first, then the current task's new ones, re-orthonormalised,
capped at `rank_budget` · min(m, n)) instead of only the current weights' top-k.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from cl_runner import ops
from cl_runner.distributed.sharding import is_sharded
from cl_runner.errors import ConfigError, bad_value, require, require_choice
from cl_runner.strategies.base import Strategy, plain_config, tensor_bytes
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import register
from cl_runner.strategies.svd_orthogonal.drift import update_drift
from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner.strategies.svd_orthogonal.rank import (
    _EPS,
    FRACTION_OF,
    NORMALISATIONS,
    adaptive_ranks,
    clamp_rank,
    layer_importances,
    ratio_ranks,
    scheduled_fraction,
)
from cl_runner.strategies.svd_orthogonal.targets import Target, find_targets
from cl_runner.streams.task import Task

RANK_MODES = ("adaptive", "ratio")
FIRST_TASK = ("full", "constrained")
BASES_MODES = ("current", "accumulate")
BASIS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SVD_METHODS = ("exact", "randomized", "auto")
# both: gradient projected after backward and the update re-projected after the step;
# update: only the update (exact constraint, one projection); gradient: only the gradient.
PROJECTION_POINTS = ("both", "update", "gradient")
# The methods that hold each part of the cost, and the phase a profiler reports them under
# (strategies may not import the training room, so scripts/profile_strategy.py wraps these
# methods of the built strategy in `phase(...)`).
PHASES = {
    "choose_ranks": "svd_orthogonal/importance",  # adaptive ranks: the importance forwards
    "decompose": "svd_orthogonal/svd",  # the top-k SVDs, same shapes batched
    "sharded_bases": "svd_orthogonal/svd",  # trainer.sharding=fsdp: gather, SVD, scatter per target
    "pack_bases": "svd_orthogonal/pack",  # stacked bases, complements, anchors, gradient views
    "project_gradients": "svd_orthogonal/project_gradient",
    "project_update": "svd_orthogonal/project_update",
    "record_drift": "svd_orthogonal/measure_drift",
}
# Importance forwards per batch outside cl-run (cl-run passes evaluation.batch_size, whose
# default this is).
_DEFAULT_IMPORTANCE_BATCH = 64
# A direction of the new task's basis counts as new in `accumulate` when more than this
# much of its (unit) length lies outside the subspace already kept.
_NEW_DIRECTION_TOL = 1e-4
_STATE_VERSION = 1


def _default_targets() -> Dict[str, List[str]]:
    llama = [r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj",
             r"self_attn\.o_proj", r"mlp\.gate_proj", r"mlp\.up_proj", r"mlp\.down_proj"]
    return {
        "gpt2": [r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj"],
        "llama": list(llama),
        "mistral": list(llama),
        "qwen2": list(llama),
        "t5": [r"(SelfAttention|EncDecAttention)\.(q|k|v|o)",
               r"DenseReluDense\.(wi|wi_0|wi_1|wo)"],
        "bert": [r"attention\.self\.(query|key|value)", r"attention\.output\.dense",
                 r"intermediate\.dense", r"\d+\.output\.dense"],
    }


@dataclass
class SVDRankConfig:
    # adaptive: k from layer importance (the paper); ratio: fixed fraction (mini_trainer).
    mode: str = "adaptive"
    # Adaptive: minimum / target preserved fraction (mrr / trr in the paper).
    mrr: float = 0.1
    trr: float = 0.8
    # Adaptive: importances min-max normalised to [0, 1] (the paper; r_l in [mrr, trr]) |
    # mean (I_l / mean I, an earlier reading: r_l can leave [mrr, trr]).
    normalise: str = "minmax"
    # Ratio: the trainable fraction; k = floor(min(m, n) * (1 - unfreeze_ratio)).
    unfreeze_ratio: float = 0.25
    # Ratio: the size the preserved fraction multiplies: min_dim (mini_trainer) | max_dim
    # (the Sculpting Subspaces code: floor(max(m, n) * fraction), capped at min(m, n)).
    fraction_of: str = "min_dim"
    # Adaptive: examples of the previous task (the current one at t = 0) for importance.
    importance_examples: int = 128
    # Adaptive: examples per importance forward (no gradients, longest first, padding masked
    # out); null = evaluation.batch_size. Seq2seq models run one example a forward.
    importance_batch_size: Optional[int] = None
    # Every preserved fraction grows by this much per task (0 = off; the paper's T5 runs).
    schedule_step: float = 0.0
    # ... up to this cap.
    schedule_cap: float = 0.95


@dataclass
class SVDOrthogonalConfig:
    name: str = "svd_orthogonal"
    # Target patterns per model family (regex on the end of module names); a family not
    # listed uses every 2-D weight inside the repeated blocks.
    targets: Dict[str, List[str]] = field(default_factory=_default_targets)
    # Freeze everything that is not a target (embeddings, norms, biases, head).
    freeze_untargeted: bool = False
    rank: SVDRankConfig = field(default_factory=SVDRankConfig)
    # full: the first task trains unconstrained (the paper); constrained: preserve the
    # pretrained weights' top-k from the first task on.
    first_task: str = "full"
    # two_sided: (I-UUᵀ)G(I-VVᵀ); high_block: G - U(UᵀGV)Vᵀ.
    projection: str = "two_sided"
    # Where a step is projected: both (gradient after backward, update after the step) |
    # update (the update only: exact, one projection) | gradient (the gradient only, as the
    # authors' and mini_trainer's code: under AdamW the update drifts out).
    projection_point: str = "both"
    # After each task, report how much of the task's update lies where the constraint
    # forbids it (Uᵀ ΔW V and the whole preserved part); keeps a copy of the targets from the
    # task start (not checkpointed: a task resumed mid-way reports none). Unsharded runs only.
    measure_drift: bool = False
    # current: top-k of the current W per task; accumulate: union over past tasks.
    bases: str = "current"
    # accumulate: cap on preserved directions per side, as a fraction of min(m, n).
    rank_budget: float = 0.9
    # Storage dtype of the bases (math is fp32 either way): fp32 | bf16.
    basis_dtype: str = "fp32"
    # exact (batched torch.linalg.svd) | randomized (range finder), via cl_runner.ops |
    # auto: per shape, whichever was measured faster at the first task start that decomposed
    # it (both run then), the range finder only where its residual ||W - U U^T W||_F exceeds
    # the exact one's by at most svd_auto_tolerance (relative). Unsharded runs; sharded: exact.
    svd_method: str = "exact"
    svd_auto_tolerance: float = 0.02
    svd_oversample: int = 10
    svd_power_iters: int = 2
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False
    # trainer.sharding=fsdp: targets per all-gather / all-reduce bucket of the projection (MiB).
    sharded_bucket_mb: float = 256.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register("svd_orthogonal", config=SVDOrthogonalConfig,
          summary="adaptive-SVD orthogonal fine-tuning: updates kept off each matrix's top singular subspaces",
          adapters=("it decomposes and projects the full weight matrices, which stay frozen under an adapter "
                    "(a LoRA update is already low-rank)"))
class SVDOrthogonal(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        from cl_runner.strategies.svd_orthogonal.memory import estimate_svd

        basis_bytes = torch.empty((), dtype=BASIS_DTYPES[self.config.basis_dtype]).element_size()
        return estimate_svd(self.config, inputs, basis_bytes)

    def __init__(self, config: SVDOrthogonalConfig) -> None:
        super().__init__(config)
        c, r = config, config.rank
        self.freezes_parameters = bool(c.freeze_untargeted)
        require_choice(r.mode, "strategy.rank.mode", RANK_MODES)
        require_choice(r.normalise, "strategy.rank.normalise", NORMALISATIONS)
        require_choice(r.fraction_of, "strategy.rank.fraction_of", FRACTION_OF)
        require_choice(c.first_task, "strategy.first_task", FIRST_TASK)
        require_choice(c.projection, "strategy.projection", ops.MODES)
        require_choice(c.bases, "strategy.bases", BASES_MODES)
        require_choice(c.basis_dtype, "strategy.basis_dtype", tuple(BASIS_DTYPES))
        require_choice(c.svd_method, "strategy.svd_method", SVD_METHODS)
        require_choice(c.projection_point, "strategy.projection_point", PROJECTION_POINTS, ConfigError)
        require(r.importance_batch_size is None or r.importance_batch_size >= 1, "strategy.rank.importance_batch_size",
                r.importance_batch_size, "use a positive count, or null for evaluation.batch_size")
        for key in ("mrr", "trr", "unfreeze_ratio", "schedule_cap"):
            v = getattr(r, key)
            require(0.0 <= v <= 1.0, f"strategy.rank.{key}", v, "use a fraction in [0, 1]")
        require(r.mrr <= r.trr, "strategy.rank.mrr", r.mrr, f"use mrr <= trr ({r.trr})")
        require(r.importance_examples >= 1, "strategy.rank.importance_examples",
                  r.importance_examples, "use at least 1 example")
        require(r.schedule_step >= 0, "strategy.rank.schedule_step", r.schedule_step,
                  "use a step >= 0 (0 turns the schedule off)")
        require(0.0 < c.rank_budget <= 1.0, "strategy.rank_budget", c.rank_budget,
                  "use a fraction in (0, 1]")
        require(c.svd_oversample >= 0, "strategy.svd_oversample", c.svd_oversample, "use >= 0")
        require(c.svd_power_iters >= 0, "strategy.svd_power_iters", c.svd_power_iters, "use >= 0")
        require(c.svd_auto_tolerance >= 0, "strategy.svd_auto_tolerance", c.svd_auto_tolerance,
                "use a relative excess residual >= 0 (0.02: the sketch may leave 2% more of W out)")
        self.targets: list[Target] = []
        self.groups: Optional[ProjectionGroups] = None
        self.sharded = None  # ShardedSubspaces under trainer.sharding=fsdp
        self._accumulated: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._frozen: list[str] = []
        self._in_task = False
        self._task = -1
        self._history: list[dict[str, Any]] = []
        self._k_per_target: dict[str, list[list[int]]] = {}
        self._importance_per_target: dict[str, list[float]] = {}
        self._grad_clock = _ProjectionClock()
        self._update_clock = _ProjectionClock()
        self._steps = 0
        # svd_method=auto: shape "mxn" -> the method chosen and what was measured to choose it
        self._svd_choices: dict[str, dict[str, Any]] = {}
        self._eval_batch_size: Optional[int] = None  # evaluation.batch_size, from check_run_config
        # measure_drift: the targets and bases at the task start (unsharded only)
        self._drift_start: Optional[list[torch.Tensor]] = None
        self._drift_bases: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def projects_gradient(self) -> bool:
        return self.config.projection_point in ("both", "gradient")

    @property
    def projects_update(self) -> bool:
        return self.config.projection_point in ("both", "update")

    def check_run_config(self, cfg: Any) -> None:
        """Keeps evaluation.batch_size (the importance forwards batch like evaluation) and
        refuses measure_drift under FSDP."""
        evaluation, trainer = cfg.get("evaluation"), cfg.get("trainer")
        if evaluation is not None and evaluation.get("batch_size") is not None:
            self._eval_batch_size = int(evaluation.batch_size)
        if self.config.measure_drift and trainer is not None and trainer.get("sharding", "none") == "fsdp":
            raise ConfigError(bad_value("strategy.measure_drift", True, "it keeps whole copies of the targets and "
                                        "is for unsharded runs: set strategy.measure_drift=false or "
                                        "trainer.sharding=none"))

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx) -> None:
        super().setup(ctx)
        model = ctx.unwrapped_model
        self.targets = find_targets(model, ctx.model_family, plain_config(self.config.targets) or {})
        self._k_per_target = {t.name: [] for t in self.targets}
        if any(is_sharded(t.param) for t in self.targets):
            from cl_runner.strategies.svd_orthogonal.sharded import ShardedSubspaces

            if self.config.measure_drift:
                raise ConfigError(bad_value("strategy.measure_drift", True, "it is for unsharded runs: set "
                                            "strategy.measure_drift=false or trainer.sharding=none"))
            self.sharded = ShardedSubspaces([(t.name, t.param) for t in self.targets], self.config.projection,
                                            BASIS_DTYPES[self.config.basis_dtype], self.config.sharded_bucket_mb)
            return
        # The bases come from top_k_bases (orthonormal by construction): no check per task.
        self.groups = ProjectionGroups(
            [(t.name, t.param) for t in self.targets], mode=self.config.projection,
            basis_dtype=BASIS_DTYPES[self.config.basis_dtype], check_orthonormal=False)
        self._k_per_target = {t.name: [] for t in self.targets}

    # ------------------------------------------------------------------ task start
    def before_task(self, t: int, task: Task) -> None:
        if t == 0 and self.config.first_task == "full":
            # The authors' first task: unconstrained (no importance pass, no SVD, nothing
            # projected; untargeted parameters are not frozen either). `_in_task` stays
            # False so every step hook is a no-op, and `_task` stays -1 so a checkpoint
            # of this task carries no bases. Recorded as k = 0 (relative residual 1).
            self._in_task = False
            if self.config.rank.mode == "adaptive":  # keep one entry per task (none computed)
                for tg in self.targets:
                    self._importance_per_target.setdefault(tg.name, []).append(None)
            self._record(t, task, [(0, 0)] * len(self.targets), "first_task=full (unconstrained)",
                         0.0, 0.0, 0.0, 1.0)
            return
        started = time.perf_counter()
        ks, source, importance_seconds = self.choose_ranks(t, task)
        svd_started = time.perf_counter()
        if self.sharded is not None:
            self.sharded_bases(t, task, ks, source, importance_seconds, started, svd_started)
            return
        weights = [tg.param.detach() for tg in self.targets]
        # One decomposition per target, same shapes batched; the ranks are known before it
        # runs, so nothing is decomposed twice.
        bases, residuals = self.decompose(weights, ks, self.ctx.seed + t)
        named = {tg.name: (u, v) for tg, (u, v) in zip(self.targets, bases)}
        if self.config.bases == "accumulate":
            named = self._accumulate(named)
        self.pack_bases(named, weights)
        svd_seconds = time.perf_counter() - svd_started
        self._freeze_untargeted()
        self._in_task, self._task = True, t
        k_pairs = [(int(named[tg.name][0].shape[1]), int(named[tg.name][1].shape[1])) for tg in self.targets]
        self._record(t, task, k_pairs, source, importance_seconds, svd_seconds,
                     time.perf_counter() - started, sum(residuals) / len(residuals))

    def pack_bases(self, named: dict[str, tuple[torch.Tensor, torch.Tensor]], weights: list[torch.Tensor]) -> None:
        """Stacked bases (complements where k > dim/2); the weight anchors only where the
        update is projected, the gradient views only where the gradient is."""
        self.groups.set_bases(named)
        if self.projects_update:
            self.groups.snapshot_weights()
        if self.projects_gradient:
            self.groups.attach_grads()
        if self.config.measure_drift:
            self._drift_start = [w.clone() for w in weights]
            self._drift_bases = [named[tg.name] for tg in self.targets]
        _sync(weights[0].device)

    def decompose(self, weights: list[torch.Tensor], ks: list[int], seed: int):
        """(U, V) per weight and its relative Frobenius residual. exact: batched SVDs by shape.
        randomized: the range finder for every target whose own k + oversample <= r/2 (where
        it is cheaper than an exact SVD, measured on CPU: docs/extension.md), batched by shape
        among those; the exact SVD for the rest. Choosing per target rather than per shape
        lets the small-k targets of adaptive ranks use the sketch even when their shape's
        largest k cannot (ops.top_k_bases sizes one sketch per shape by its largest k)."""
        c = self.config
        options = dict(oversample=c.svd_oversample, power_iters=c.svd_power_iters, out_dtype=torch.float32,
                       return_stats=True, seed=seed)
        if c.svd_method == "exact":
            bases, stats = ops.top_k_bases(weights, ks, method="exact", **options)
            return bases, list(stats.residual_fro)
        sketched = [2 * (k + c.svd_oversample) <= min(w.shape) for w, k in zip(weights, ks)]
        if c.svd_method == "auto":
            return self._decompose_auto(weights, ks, sketched, options)
        bases: list = [None] * len(weights)
        residuals = [0.0] * len(weights)
        for method, wanted in (("randomized", True), ("exact", False)):
            idx = [i for i, s in enumerate(sketched) if s == wanted]
            if not idx:
                continue
            got, stats = ops.top_k_bases([weights[i] for i in idx], [ks[i] for i in idx], method=method, **options)
            for j, i in enumerate(idx):
                bases[i], residuals[i] = got[j], stats.residual_fro[j]
        return bases, residuals

    def _decompose_auto(self, weights: list[torch.Tensor], ks: list[int], sketched: list[bool],
                        options: dict[str, Any]):
        """svd_method=auto: per shape, the method measured faster on its targets (where the
        sketch may run at all), the range finder only within svd_auto_tolerance of the exact
        residual. The first task start that decomposes a shape runs both and keeps the choice
        (self._svd_choices, checkpointed); later ones run the chosen method only."""
        bases: list = [None] * len(weights)
        residuals = [0.0] * len(weights)

        def run(idx: list[int], method: str) -> tuple[list, list[float], float]:
            started = time.perf_counter()
            got, stats = ops.top_k_bases([weights[i] for i in idx], [ks[i] for i in idx], method=method, **options)
            _sync(weights[idx[0]].device)
            return got, list(stats.residual_fro), time.perf_counter() - started

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(weights):
            by_shape.setdefault(tuple(w.shape), []).append(i)
        for shape, idx in by_shape.items():
            eligible = [i for i in idx if sketched[i]]
            plain = [i for i in idx if not sketched[i]]
            key = "x".join(map(str, shape))
            if eligible and key not in self._svd_choices:
                exact, exact_res, exact_s = run(eligible, "exact")
                sketch, sketch_res, sketch_s = run(eligible, "randomized")
                exact_s, sketch_s = _same_on_every_rank(exact_s, sketch_s, device=weights[eligible[0]].device)
                gap = max((r - e) / max(e, 1e-12) for r, e in zip(sketch_res, exact_res))
                method = "randomized" if gap <= self.config.svd_auto_tolerance and sketch_s < exact_s else "exact"
                self._svd_choices[key] = {"method": method, "exact_seconds": exact_s, "randomized_seconds": sketch_s,
                                          "residual_excess": gap, "targets": len(eligible)}
                got, res = (sketch, sketch_res) if method == "randomized" else (exact, exact_res)
            elif eligible:
                got, res, _ = run(eligible, self._svd_choices[key]["method"])
            for j, i in enumerate(eligible):
                bases[i], residuals[i] = got[j], res[j]
            if plain:
                got, res, _ = run(plain, "exact")
                for j, i in enumerate(plain):
                    bases[i], residuals[i] = got[j], res[j]
        return bases, residuals

    def sharded_bases(self, t: int, task: Task, ks: list[int], source: str, importance_seconds: float,
                       started: float, svd_started: float) -> None:
        """The task's bases on FSDP-sharded targets: each SVD on one rank in turn."""
        import torch.distributed as dist

        c = self.config
        residuals = torch.zeros(len(self.targets), dtype=torch.float64)

        def decompose(w: torch.Tensor, k: int, i: int):
            method = "exact" if c.svd_method == "auto" else c.svd_method
            ((u, v),), stats = ops.top_k_bases([w], [k], method=method, oversample=c.svd_oversample,
                                           power_iters=c.svd_power_iters, out_dtype=torch.float32,
                                           return_stats=True, seed=self.ctx.seed + t)
            residuals[i] = stats.residual_fro[0]
            return u, v

        def combine(i: int, u: torch.Tensor, v: torch.Tensor, old):
            tg = self.targets[i]
            cap = clamp_rank(math.floor(c.rank_budget * tg.rank_dim + _EPS), tg.rank_dim)
            return _union(None if old is None else old[0], u, cap), _union(None if old is None else old[1], v, cap)

        k_pairs = self.sharded.set_bases_from_weights(ks, decompose, combine if c.bases == "accumulate" else None)
        device = self.targets[0].param.device
        summed = residuals.to(device)
        dist.all_reduce(summed)  # each residual was computed on its target's rank only
        svd_seconds = time.perf_counter() - svd_started
        self._freeze_untargeted()
        self._in_task, self._task = True, t
        self._record(t, task, k_pairs, source, importance_seconds, svd_seconds,
                     time.perf_counter() - started, float(summed.sum()) / len(self.targets))

    def choose_ranks(self, t: int, task: Task) -> tuple[list[int], str, float]:
        r = self.config.rank
        dims = [tg.rank_dim for tg in self.targets]
        if r.mode == "ratio":
            fraction = scheduled_fraction(1.0 - r.unfreeze_ratio, t, r.schedule_step,
                                          r.schedule_cap)
            sizes = [max(tg.shape) for tg in self.targets] if r.fraction_of == "max_dim" else None
            return ratio_ranks(dims, fraction, sizes), "ratio", 0.0
        started = time.perf_counter()
        if t > 0:
            previous = self.ctx.stream[t - 1]
            examples, source = list(previous.train), f"previous task '{previous.name}'"
        else:  # no previous task: the paper's "previous data" is the pre-training data
            examples, source = list(task.train), f"current task '{task.name}' (t=0)"
        if not examples:
            raise ValueError(f"svd_orthogonal: rank.mode=adaptive needs training examples "
                             f"for the importance pass and {source} has none; use "
                             "strategy.rank.mode=ratio")
        n = r.importance_examples
        if len(examples) > n:
            rng = random.Random(self.ctx.seed * 1_000_003 + t)
            examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]
        importances = layer_importances(self.ctx.unwrapped_model, [tg.module for tg in self.targets], examples,
                                        self.ctx.collate, self._forward, self.ctx.accelerator.autocast,
                                        batch_size=self._importance_batch_size())
        mrr = scheduled_fraction(r.mrr, t, r.schedule_step, r.schedule_cap)
        trr = scheduled_fraction(r.trr, t, r.schedule_step, r.schedule_cap)
        for tg, imp in zip(self.targets, importances):
            self._importance_per_target.setdefault(tg.name, []).append(imp)
        return (adaptive_ranks(importances, dims, mrr, trr, r.normalise), source,
                time.perf_counter() - started)

    def _importance_batch_size(self) -> int:
        """Examples per importance forward: rank.importance_batch_size, else the run's
        evaluation.batch_size. Seq2seq: one (decoder and cross-attention positions are not
        those of the attention_mask, so padding could not be masked out of their means)."""
        if self.ctx.model_kind == "seq2seq":
            return 1
        size = self.config.rank.importance_batch_size
        return int(size if size is not None else (self._eval_batch_size or _DEFAULT_IMPORTANCE_BATCH))

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        if self.ctx.model_kind == "classifier":
            return model(**{k: v for k, v in batch.items() if k not in ("labels", "label_mask")})
        return model(**batch)

    def _accumulate(self, current: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """Union of the kept subspaces and this task's top-k, old directions first."""
        out = {}
        for tg in self.targets:
            u_new, v_new = current[tg.name]
            cap = clamp_rank(math.floor(self.config.rank_budget * tg.rank_dim + _EPS),
                             tg.rank_dim)
            old = self._accumulated.get(tg.name)
            u = _union(None if old is None else old[0], u_new, cap)
            v = _union(None if old is None else old[1], v_new, cap)
            out[tg.name] = (u, v)
        self._accumulated = {name: (u.detach().clone(), v.detach().clone())
                             for name, (u, v) in out.items()}
        return out

    def _freeze_untargeted(self) -> None:
        if not self.config.freeze_untargeted:
            return
        targeted = {id(tg.param) for tg in self.targets}
        self._frozen = []
        for name, p in self.ctx.unwrapped_model.named_parameters():
            if id(p) not in targeted and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None  # a carried optimizer skips parameters without a gradient
                self._frozen.append(name)

    def _unfreeze(self) -> None:
        if not self._frozen:
            return
        params = dict(self.ctx.unwrapped_model.named_parameters())
        for name in self._frozen:
            params[name].requires_grad_(True)
        self._frozen = []

    # ------------------------------------------------------------------ steps
    def after_backward(self) -> None:
        if not self._in_task:
            return
        self._steps += 1
        if self.projects_gradient:
            self.project_gradients()

    def project_gradients(self) -> None:
        impl = self.sharded if self.sharded is not None else self.groups
        self._grad_clock.time(impl.project_grads_, self.targets[0].param.device)

    def before_optimizer_step(self) -> None:
        if self._in_task and self.projects_update and self.sharded is not None:
            self.sharded.remember_weights()

    def after_optimizer_step(self) -> None:
        if self._in_task and self.projects_update:
            self.project_update()

    def project_update(self) -> None:
        """The step's weight update, projected back (ShardedSubspaces / ProjectionGroups)."""
        update = self.sharded.project_update_ if self.sharded is not None else self.groups.project_weight_update_
        self._update_clock.time(update, self.targets[0].param.device)

    def after_task(self, t: int, task: Task) -> None:
        if self._in_task and self._drift_start is not None:
            self.record_drift(t)
        self._drift_start = self._drift_bases = None
        self._unfreeze()
        self._in_task = False
        self._grad_clock.settle()
        self._update_clock.settle()

    def record_drift(self, t: int) -> None:
        """How far the task's update ΔW left the allowed set, relative to ||ΔW||_F, per
        target: block = ||Uᵀ ΔW V||, forbidden = ||(I − P) ΔW|| (two_sided: the whole preserved
        part, Uᵀ ΔW and ΔW V included; high_block: the block)."""
        blocks, forbidden = [], []
        for tg, start, (u, v) in zip(self.targets, self._drift_start, self._drift_bases):
            b, f = update_drift(tg.param.detach() - start, u, v, self.config.projection)
            blocks.append(b)
            forbidden.append(f)
        entry = next(h for h in reversed(self._history) if h["task"] == t)
        entry.update(drift_block_max=max(blocks), drift_block_mean=sum(blocks) / len(blocks),
                     drift_forbidden_max=max(forbidden), drift_forbidden_mean=sum(forbidden) / len(forbidden))
        self.ctx.log({f"svd/{k}": entry[k] for k in ("drift_block_max", "drift_block_mean", "drift_forbidden_max",
                                                     "drift_forbidden_mean")})

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, t: int, task: Task, k_pairs: list[tuple[int, int]], source: str, importance_seconds: float,
                svd_seconds: float, total_seconds: float, residual_mean: float) -> None:
        k_left = [kl for kl, _ in k_pairs]
        k_right = [kr for _, kr in k_pairs]
        for tg, kl, kr in zip(self.targets, k_left, k_right):
            self._k_per_target[tg.name].append([kl, kr])
        fractions = [kl / tg.rank_dim for tg, kl in zip(self.targets, k_left)]
        entry = {
            "task": t, "name": task.name, "rank_source": source,
            "importance_seconds": importance_seconds, "svd_seconds": svd_seconds,
            "basis_seconds": total_seconds, "basis_bytes": self._basis_bytes(),
            "state_bytes": self.extra_state_bytes(),
            "k_min": min(k_left), "k_mean": sum(k_left) / len(k_left), "k_max": max(k_left),
            "preserved_fraction_mean": sum(fractions) / len(fractions),
            "svd_residual_fro_mean": residual_mean,
            "frozen_untargeted": len(self._frozen),
        }
        if self.config.bases == "accumulate":
            entry.update(k_right_min=min(k_right), k_right_max=max(k_right))
        self._history.append(entry)
        self.ctx.log({f"svd/{k}": v for k, v in entry.items()
                      if isinstance(v, (int, float)) and k != "task"})

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "task": self._task, "in_task": self._in_task,
            "groups": self.groups.state_dict() if self.groups is not None else None,
            "sharded": self.sharded.state_dict() if self.sharded is not None and self._task >= 0 else None,
            "accumulated": dict(self._accumulated), "history": list(self._history),
            "k_per_target": {k: list(v) for k, v in self._k_per_target.items()},
            "importance_per_target": {k: list(v) for k, v in self._importance_per_target.items()},
            "grad_seconds": self._grad_clock.settle(), "update_seconds": self._update_clock.settle(),
            "steps": self._steps, "projection_point": self.config.projection_point,
            "svd_choices": dict(self._svd_choices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"svd_orthogonal state version {state.get('version')!r}; this "
                             f"code reads version {_STATE_VERSION}")
        saved_point = state.get("projection_point", "both")  # older checkpoints: the one behaviour there was
        if state["in_task"] and saved_point != self.config.projection_point:
            raise ConfigError(bad_value("strategy.projection_point", self.config.projection_point,
                                        f"this checkpoint was written mid-task with projection_point={saved_point} "
                                        f"(its anchors and gradient views follow it): resume with "
                                        f"strategy.projection_point={saved_point}"))
        self._task, self._in_task = state["task"], state["in_task"]
        if state.get("sharded") is not None and self._task >= 0:
            if self.sharded is None:
                raise ValueError("svd_orthogonal: this checkpoint was written by a sharded (trainer.sharding=fsdp) run; "
                                 "resume it with trainer.sharding=fsdp")
            self.sharded.load_state_dict(state["sharded"])
        elif state["groups"] is not None and self._task >= 0:
            if self.groups is None:
                raise ValueError("svd_orthogonal: this checkpoint was written by an unsharded run; resume it "
                                 "with trainer.sharding=none")
            self.groups.load_state_dict(state["groups"])
        self._accumulated = dict(state["accumulated"])
        self._history = list(state["history"])
        self._k_per_target = {k: list(v) for k, v in state["k_per_target"].items()}
        self._importance_per_target = {k: list(v) for k, v in
                                       state["importance_per_target"].items()}
        self._grad_clock = _ProjectionClock(state["grad_seconds"])
        self._update_clock = _ProjectionClock(state["update_seconds"])
        self._steps = state["steps"]
        self._svd_choices = dict(state.get("svd_choices", {}))
        if self._in_task:  # resumed mid-task: before_task is not called again
            self._freeze_untargeted()
            if self.groups is not None and self.projects_gradient:
                self.groups.attach_grads()

    def _basis_bytes(self) -> int:
        """Bytes of the stored bases alone (U, V or their complements, padded per bucket);
        `extra_state_bytes` adds the weight anchors of ProjectionGroups."""
        if self.sharded is not None:
            return self.sharded.nbytes()
        if self.groups is None:
            return 0
        size = torch.empty((), dtype=BASIS_DTYPES[self.config.basis_dtype]).element_size()
        return sum(b["count"] * (b["shape"][0] * b["left_width"] + b["shape"][1] * b["right_width"])
                   for b in self.groups.layout()) * size

    def extra_state_bytes(self) -> int:
        if self.sharded is not None:
            return self.sharded.nbytes()
        total = self.groups.nbytes() if self.groups is not None else 0
        # measure_drift's task-start copies (None outside a task and without it)
        drift = tensor_bytes(self._drift_start or []) + tensor_bytes(self._drift_bases or [])
        return total + tensor_bytes(list(self._accumulated.values())) + drift

    def report(self) -> dict[str, Any]:
        ks = [k for per in self._k_per_target.values() for k, _ in per[-1:]]
        return {
            "targets": len(self.targets),
            "projection": self.config.projection, "bases": self.config.bases,
            "projection_point": self.config.projection_point,
            "rank_mode": self.config.rank.mode, "first_task": self.config.first_task,
            "tasks": list(self._history),
            "k_summary": ({"min": min(ks), "mean": sum(ks) / len(ks), "max": max(ks)}
                          if ks else {}),
            "k_per_target": {k: list(v) for k, v in self._k_per_target.items()},
            "importance_per_target": {k: list(v) for k, v in self._importance_per_target.items()},
            "shapes": {tg.name: list(tg.shape) for tg in self.targets},
            "basis_seconds_total": sum(h["basis_seconds"] for h in self._history),
            "projection_seconds": self._grad_clock.settle() + self._update_clock.settle(),
            "grad_projection_seconds": self._grad_clock.settle(),
            "weight_projection_seconds": self._update_clock.settle(),
            "projection_steps": self._steps,
            "basis_bytes": self._basis_bytes(),
            "svd_choices": dict(self._svd_choices),
            "state_bytes": self.extra_state_bytes(),
        }


def _same_on_every_rank(*seconds: float, device: torch.device) -> tuple[float, ...]:
    """Rank 0's timings on every process (DDP): each rank timed its own SVDs, and a choice
    made from different numbers would give the ranks different bases."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return seconds
    values = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    return tuple(float(v) for v in values.tolist())


class _ProjectionClock:
    """Seconds spent in a projection, without stalling the device every step: perf_counter
    on CPU; on CUDA a pair of events per call, read (one wait) at the task's end, in a
    checkpoint or a report, so the step's kernels stay queued behind each other."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)
        self._pending: list[tuple[Any, Any]] = []

    def time(self, project: Any, device: torch.device) -> None:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            project()
            end.record()
            self._pending.append((start, end))
            if len(self._pending) >= 1024:  # a long task: fold in the pairs already done
                finished = [end.query() for _, end in self._pending]
                self.seconds += sum(a.elapsed_time(b) for (a, b), f in zip(self._pending, finished) if f) / 1000.0
                self._pending = [pair for pair, f in zip(self._pending, finished) if not f]
            return
        started = time.perf_counter()
        project()
        self.seconds += time.perf_counter() - started

    def settle(self) -> float:
        """The seconds so far (waits for the timed work still queued)."""
        for start, end in self._pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._pending = []
        return self.seconds


def _union(old: Optional[torch.Tensor], new: torch.Tensor, cap: int) -> torch.Tensor:
    """Orthonormal basis of span(old) + span(new), old columns first, at most `cap`
    columns. New directions are ranked by how much of them lies outside span(old)."""
    if old is None or old.shape[1] == 0:
        return new[:, :cap].contiguous()
    old = old.to(device=new.device, dtype=new.dtype)
    if old.shape[1] >= cap or new.shape[1] == 0:
        return old[:, :cap].contiguous()
    residual = new.clone()
    ops.project_([residual], [old], [None], "two_sided")  # (I - old oldᵀ) new
    (directions, _), = ops.top_k_bases([residual], [min(residual.shape)])
    strength = (directions.T @ residual).norm(dim=1)  # singular values, descending
    keep = min(int((strength > _NEW_DIRECTION_TOL).sum()), cap - old.shape[1])
    return torch.cat([old, directions[:, :keep]], dim=1).contiguous()
