"""Will it fit: a per-rank memory plan for a run, made from the model built on PyTorch's
`meta` device (no weights loaded, nothing downloaded). `cl-run dry_run=true` prints it
after the resolved config.

Rows, per rank:

- parameters, gradients (trainable parameters only) and optimizer state (AdamW: exp_avg
  and exp_avg_sq; CLASSP: one fp32 accumulator), in the weights' dtype (`model.dtype`),
  as the runner keeps them: torch's AdamW stores its moments like the weights, so a
  bfloat16 model has no fp32 master copy (a float32 model under `trainer.precision=bf16`
  is the fp32-master set-up: fp32 weights, gradients and moments, bf16 compute);
- the strategy's own state (EWC's Fisher and anchor, svd_orthogonal's bases and weight
  anchors, LiNeS' reference copy, HFT's saved values), counted the way the strategy code
  allocates it, and its largest transient working set where it has one. svd_orthogonal has
  two implementations: `ProjectionGroups` (bases or complements, weight anchors) with
  `trainer.sharding=none`, `strategies/svd_orthogonal/sharded.ShardedSubspaces` (row-sharded bases
  only, bucketed all-gathers of the right sides, a copy of the local target rows across the
  optimizer step) with `fsdp`; the plan counts the one the run would use;
- what the parallel set-up adds: DDP's gradient buckets (a second copy of the gradients)
  with `trainer.sharding=none` on several ranks, FSDP's all-gathered units with `fsdp`,
  autocast's bf16 copies of fp32 weights under mixed precision;
- activations: a rough estimate, labelled as such.

Under `trainer.sharding=fsdp` parameters, gradients, optimizer and strategy state are
divided by the world size (svd_orthogonal's sharded bases as ShardedSubspaces chunks them:
ceil(rows / world) per rank); under `none` (one process or DDP) every rank holds them all.
World size: `plan_world_size`, else $WORLD_SIZE, else 1. `plan_gpu_memory_gb` (GiB per
GPU, 80 for an 80 GB A100/H100) adds a fits / does-not-fit verdict.
"""
from __future__ import annotations

import dataclasses

import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from cl_runner.config import ConfigError
from cl_runner.checks import require, require_choice

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
# Activations kept for backward, in values per token, hidden unit and transformer block:
# attention inputs/outputs and q, k, v (fused SDPA: no score matrix), the norms, the MLP's
# up/gate/activation (2.7-4 x hidden). Korthikanti et al. 2022 count 34 bytes (about 17
# 16-bit values) for a GPT block without the score matrix. A rough figure, no more.
ACTIVATION_FACTOR = 18
# Logits per token and vocabulary entry: the logits (compute dtype), their fp32 copy for
# the loss and its log-softmax (fp32).
LOGIT_EXTRA_BYTES = 8
# Verdict: above this share of the GPU's memory a plan is "tight" (CUDA context, allocator
# fragmentation and what the estimate misses need room too).
HEADROOM = 0.9
SHARDINGS = ("none", "fsdp")


class MemoryPlanError(RuntimeError):
    """No plan for this model offline (its sizes are nowhere to be read)."""


# ----------------------------------------------------------------------------- results
@dataclass
class PlanRow:
    name: str
    unsharded_bytes: int  # what one rank would hold without sharding
    per_rank_bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    model: str
    kind: str
    family: str
    source: str  # where the architecture sizes came from
    params: int
    trainable_params: int
    param_dtype: str
    precision: str
    sharding: str
    world_size: int
    strategy: str
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    rows: list[PlanRow]
    assumptions: list[str] = field(default_factory=list)
    gpu_memory_gb: Optional[float] = None
    # Under a verdict that fails: the smallest power-of-two world size that fits with fsdp.
    fits_from_fsdp_world: Optional[int] = None

    @property
    def per_rank_total(self) -> int:
        return sum(r.per_rank_bytes for r in self.rows)

    def row(self, name: str) -> PlanRow:
        for r in self.rows:
            if r.name == name or r.name.startswith(name + " "):
                return r
        raise KeyError(name)

    def bytes_of(self, name: str) -> int:
        """Per-rank bytes of a row, 0 when the plan has no such row."""
        try:
            return self.row(name).per_rank_bytes
        except KeyError:
            return 0

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu_memory_gb is None:
            return None
        return self.per_rank_total <= self.gpu_memory_gb * GIB

    def verdict(self) -> Optional[str]:
        if self.gpu_memory_gb is None:
            return None
        cap = self.gpu_memory_gb * GIB
        share = self.per_rank_total / cap
        word = "fits" if share <= HEADROOM else "tight" if share <= 1.0 else "does not fit"
        line = (f"{word} on {self.world_size} x {self.gpu_memory_gb:g} GB: {gib(self.per_rank_total)} of "
                f"{self.gpu_memory_gb:g} GiB per rank ({share:.0%})")
        if word == "tight":
            line += "; little room left for the CUDA context and allocator fragmentation"
        if word == "does not fit":
            acts = self.bytes_of("activations")
            if self.fits_from_fsdp_world is not None:
                line += f"; with trainer.sharding=fsdp it would fit from {self.fits_from_fsdp_world} ranks"
            elif acts > HEADROOM * cap:
                line += "; the activations alone do not: lower trainer.batch_size or model.max_length"
        return line

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_rank_total_bytes"] = self.per_rank_total
        out["verdict"] = self.verdict()
        return out


@dataclass
class ModelFacts:
    """What the plan needs from the model, read from its meta-device build."""
    name: str
    kind: str
    family: str
    source: str
    params: int
    matmul_params: int  # weights of Linear/Conv1D layers (autocast casts these)
    hidden: int
    blocks: int
    vocab: int
    largest_unit: int  # parameters of the largest block or top-level module (FSDP unit)
    model: nn.Module


@dataclass
class ShardedEstimate:
    """A strategy's own implementation under `trainer.sharding=fsdp` at one world size,
    where that is not its unsharded state split evenly (svd_orthogonal's ShardedSubspaces):
    bytes as that code lays them out on the rank that holds the most (rank 0)."""
    state_unsharded: int  # the same implementation at world size 1
    state_per_rank: int
    transient_unsharded: int
    transient_per_rank: int
    notes: list[str] = field(default_factory=list)
    transient_note: str = ""


@dataclass
class StrategyEstimate:
    name: str
    state_bytes: int = 0
    transient_bytes: int = 0
    trainable_params: Optional[int] = None  # None: every parameter trains
    optimizer_bytes_per_param: Optional[float] = None  # None: AdamW in the weights' dtype
    optimizer_note: str = ""
    notes: list[str] = field(default_factory=list)
    transient_note: str = ""
    # trainer.sharding=fsdp with an implementation of its own: world size -> its estimate,
    # which then replaces state_bytes / transient_bytes (add-ons below are split evenly).
    sharded: Optional[Callable[[int], ShardedEstimate]] = None
    # Add-ons (LiNeS) summed into the fields above, kept apart for `sharded`.
    addon_state_bytes: int = 0
    addon_notes: list[str] = field(default_factory=list)
    addon_transient_bytes: int = 0
    addon_transient_note: str = ""


# ----------------------------------------------------------------------------- settings
def plan_world_size(cfg: Any) -> int:
    """`plan_world_size`, else $WORLD_SIZE, else 1."""
    value = cfg.get("plan_world_size")
    if value is None:
        env = os.environ.get("WORLD_SIZE", "1")
        try:
            value = int(env)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE={env!r} is not a number; unset it or set plan_world_size") from None
    require(int(value) >= 1, "plan_world_size", value, "use a positive number of processes, or null for "
            "$WORLD_SIZE (else 1)", error=ConfigError)
    return int(value)


def plan_gpu_memory_gb(cfg: Any) -> Optional[float]:
    value = cfg.get("plan_gpu_memory_gb")
    require(value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0),
            "plan_gpu_memory_gb", value, "use the memory of one GPU in GiB (e.g. 80), or null for no verdict",
            error=ConfigError)
    return None if value is None else float(value)


def plan_sharding(cfg: Any) -> str:
    # trainer.sharding arrives with FSDP support; configs without it mean one full copy per rank.
    value = str(cfg.trainer.get("sharding", "none") or "none")
    require_choice(value, "trainer.sharding", SHARDINGS, error=ConfigError)
    return value


def _fsdp_option(cfg: Any, key: str, default: bool) -> bool:
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, f"trainer.fsdp.{key}", default=default))


def plan_activation_checkpointing(cfg: Any) -> bool:
    return _fsdp_option(cfg, "activation_checkpointing", False)


# ----------------------------------------------------------------------------- model
def _plan_tokenizer(model_cfg: Any) -> Any:
    from cl_runner.tokenizers import ByteTokenizer

    if model_cfg.tokenizer in (None, "byte"):
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        from cl_runner.models import resolve_model_path
        from cl_runner.tokenizers import HFTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.tokenizer),
                                                         local_files_only=True))
    except Exception:  # noqa: BLE001 - the plan then takes the vocabulary from architecture_config
        return None


def plan_model_config(model_cfg: Any, num_labels: Optional[int] = None) -> tuple[Any, str]:
    """(transformers config, where it came from) without loading any weights: a local
    folder's config.json, else the hub id's config.json in the local Hugging Face cache,
    else `model.architecture` + `model.architecture_config` (the sizes the shipped model
    YAMLs carry). Nothing is downloaded."""
    from transformers import AutoConfig

    from cl_runner.models import ModelLoadError, random_init_config, resolve_model_path

    extra = {"num_labels": num_labels} if num_labels is not None else {}
    if model_cfg.path is None:
        tokenizer = _plan_tokenizer(model_cfg)
        if tokenizer is None:
            config = AutoConfig.for_model(model_cfg.architecture, **dict(model_cfg.architecture_config), **extra)
        else:
            config = random_init_config(model_cfg, tokenizer, num_labels)
        return config, "model.architecture_config (random init)"
    common = dict(trust_remote_code=bool(model_cfg.trust_remote_code), **extra)
    try:
        folder = resolve_model_path(model_cfg.path)
    except ModelLoadError:
        folder = None
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        return AutoConfig.from_pretrained(folder, **common), f"{folder}/config.json"
    if not (folder and os.path.isdir(folder)):
        try:
            return (AutoConfig.from_pretrained(model_cfg.path, local_files_only=True, **common),
                    "config.json in the local Hugging Face cache")
        except (OSError, ValueError):
            pass
    if model_cfg.architecture:
        config = AutoConfig.for_model(model_cfg.architecture, **dict(model_cfg.architecture_config), **extra)
        return config, "model.architecture_config"
    raise MemoryPlanError(
        f"model.path={model_cfg.path!r} is neither a local folder with config.json nor in the local Hugging Face "
        "cache, and the model config names no architecture: add model.architecture and model.architecture_config "
        "(the HF config's sizes, e.g. hidden_size, num_hidden_layers) to its YAML")


def meta_model(model_cfg: Any, num_labels: Optional[int] = None) -> tuple[nn.Module, str]:
    """The model with every tensor on `meta` (shapes only), and where its sizes came from."""
    from cl_runner.models import _auto_class

    if model_cfg.kind == "classifier" and num_labels is None:
        num_labels = 2  # the head is hidden x labels: negligible at any realistic label count
    config, source = plan_model_config(model_cfg, num_labels)
    kwargs = {"trust_remote_code": True} if model_cfg.trust_remote_code else {}
    with torch.device("meta"):
        model = _auto_class(model_cfg.kind).from_config(config, **kwargs)
    return model, source


def _is_matmul(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def model_facts(model_cfg: Any) -> ModelFacts:
    from cl_runner.strategies.parts.model_parts import block_stacks

    model, source = meta_model(model_cfg)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    seen: set[int] = set()
    matmul = 0
    for module in model.modules():
        w = module._parameters.get("weight") if _is_matmul(module) else None
        if w is not None and id(w) not in seen:
            seen.add(id(w))
            matmul += w.numel()
    stacks = block_stacks(model)
    blocks = sum(len(s) for s in stacks.values())
    in_blocks = {id(p) for s in stacks.values() for p in s.parameters()}
    largest = max((sum(p.numel() for p in block.parameters()) for s in stacks.values() for block in s), default=0)
    for module in model.modules():  # top-level pieces FSDP gathers whole: embeddings, LM head
        own = [p for p in module._parameters.values() if p is not None and id(p) not in in_blocks]
        largest = max(largest, sum(p.numel() for p in own))
    c = model.config
    hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "d_model", 0) or getattr(c, "n_embd", 0) or 0)
    vocab = int(getattr(c, "vocab_size", 0) or 0)
    family = str(getattr(c, "model_type", type(model).__name__)).lower()
    return ModelFacts(name=str(model_cfg.name), kind=str(model_cfg.kind), family=family, source=source,
                      params=params, matmul_params=matmul, hidden=hidden, blocks=blocks, vocab=vocab,
                      largest_unit=largest, model=model)


# ----------------------------------------------------------------------------- strategies
def svd_target_bytes(m: int, n: int, k: int, projection: str = "two_sided", basis_bytes: int = FP32,
                     param_bytes: int = FP32) -> tuple[int, int]:
    """(bases, anchors) in bytes that `ProjectionGroups` holds for one m x n target
    preserving k directions on each side (U: m x k, V: n x k). A side with 2k > dim is
    stored through its complement (dim x (dim - k)); a target with a complement side keeps
    a dense anchor (m x n, weights' dtype), otherwise the factored anchors are fp32:
    two_sided Uᵀ W (k x n) and W V (m x k), high_block Uᵀ W V (k x k)."""
    def side(dim: int) -> tuple[str, int]:
        if k == 0 and projection == "two_sided":
            return "none", 0
        if 2 * k > dim:
            return "complement", dim - k
        return "basis", k

    (lk, lw), (rk, rw) = side(m), side(n)
    bases = (m * lw + n * rw) * basis_bytes
    if lk == "none" and rk == "none":
        return bases, 0
    if "complement" in (lk, rk):
        return bases, m * n * param_bytes
    if projection == "high_block":
        return bases, k * k * FP32
    return bases, ((k * n if lk == "basis" else 0) + (m * k if rk == "basis" else 0)) * FP32


def _svd_k(dim: int, fraction: float, rounding: str, size: Optional[int] = None) -> int:
    """k for a matrix of rank dimension `dim`; the fraction multiplies `size` (default dim;
    max(m, n) under rank.fraction_of=max_dim)."""
    from cl_runner.strategies.svd_orthogonal.rank import _EPS, _round_half_up, clamp_rank

    size = dim if size is None else size
    raw = _round_half_up(fraction * size) if rounding == "half_up" else math.floor(fraction * size + _EPS)
    return clamp_rank(raw, dim)


def _fraction_size(r: Any, m: int, n: int) -> int:
    return max(m, n) if r.mode == "ratio" and r.get("fraction_of", "min_dim") == "max_dim" else min(m, n)


def _estimate_svd(s: Any, facts: ModelFacts, param_bytes: int, n_tasks: int) -> StrategyEstimate:
    from cl_runner.strategies.base import plain_config
    from cl_runner.strategies.svd_orthogonal.strategy import BASIS_DTYPES
    from cl_runner.strategies.svd_orthogonal.rank import scheduled_fraction
    from cl_runner.strategies.svd_orthogonal.targets import find_targets

    targets = find_targets(facts.model, facts.family, plain_config(s.targets) or {})
    shapes = [tuple(t.param.shape) for t in targets]
    basis_bytes = torch.empty((), dtype=BASIS_DTYPES[s.basis_dtype]).element_size()
    r = s.rank
    if r.mode == "ratio":
        base, rounding = 1.0 - r.unfreeze_ratio, "floor"
        how = f"ratio mode: k = floor(min(m, n) x {base:g})"
    else:
        base, rounding = r.trr, "half_up"
        how = (f"adaptive mode: k = round(min(m, n) x trr={r.trr:g}) (a layer of mean importance, not a "
               "bound)")
    best: tuple[int, int, int, float] = (-1, 0, 0, base)
    for t in range(max(1, n_tasks)):  # the schedule may grow k; the stored bytes need not grow with it
        fraction = scheduled_fraction(base, t, r.schedule_step, r.schedule_cap)
        if s.bases == "accumulate":
            fraction = max(fraction, s.rank_budget)  # worst case: the union has reached the budget
        bases = anchors = 0
        for m, n in shapes:
            k = _svd_k(min(m, n), fraction, "floor" if s.bases == "accumulate" else rounding, _fraction_size(r, m, n))
            b, a = svd_target_bytes(m, n, k, s.projection, basis_bytes, param_bytes)
            bases, anchors = bases + b, anchors + a
        if bases + anchors > best[0]:
            best = (bases + anchors, bases, anchors, fraction)
    total, bases, anchors, fraction = best
    notes = [f"ProjectionGroups (the unsharded implementation): {len(targets)} targets, {how}: "
             f"bases {gib(bases)}, weight anchors {gib(anchors)}"]
    if s.bases == "accumulate":
        kept = sum((m + n) * _svd_k(min(m, n), s.rank_budget, "floor") for m, n in shapes) * FP32
        total += kept
        notes.append(f"bases=accumulate: the union at its rank_budget={s.rank_budget:g} (worst case) plus its "
                     f"fp32 copy ({gib(kept)})")
    # project_weight_update_ stacks each bucket (targets of one shape) in fp32; a bucket with a
    # dense anchor also holds the projected copy while the anchor is taken.
    transient = 0
    for shape in set(shapes):
        m, n = shape
        count = shapes.count(shape)
        k = _svd_k(min(m, n), fraction, rounding, _fraction_size(r, m, n))
        dense = 2 * k > min(m, n)
        transient = max(transient, count * m * n * FP32 * (2 if dense else 1))
    trainable = sum(m * n for m, n in shapes) if s.freeze_untargeted else None
    freeze = ["freeze_untargeted: only the targets train (gradients and optimizer state for them alone)"]
    if s.freeze_untargeted:
        notes += freeze

    def sharded(world: int) -> ShardedEstimate:
        est = _estimate_svd_sharded(s, shapes, basis_bytes, param_bytes, n_tasks, world, how)
        if s.freeze_untargeted:
            est.notes += freeze
        return est

    return StrategyEstimate("svd_orthogonal", state_bytes=total, transient_bytes=transient,
                            trainable_params=trainable, notes=notes,
                            transient_note="fp32 stack of the largest same-shape bucket in the weight projection",
                            sharded=sharded)


def svd_sharded_side_widths(m: int, n: int, k: int, projection: str = "two_sided") -> tuple[int, int]:
    """(left, right) columns `ShardedSubspaces` stores for one m x n target preserving k
    directions per side: U (m x k) and V (n x k), or in two_sided mode a side's orthonormal
    complement (dim - k columns) where 2k > dim; high_block always keeps the bases."""
    def width(dim: int) -> int:
        return dim - k if projection == "two_sided" and 2 * k > dim else k

    return width(m), width(n)


def svd_sharded_bytes(shapes: list[tuple[int, int]], ks: list[int], world: int, projection: str = "two_sided",
                      basis_bytes: int = FP32, param_bytes: int = FP32,
                      bucket_mb: float = 256.0) -> tuple[int, int, int, int]:
    """What `strategies/svd_orthogonal/sharded.ShardedSubspaces` holds on rank 0 (the largest chunks)
    at `world` ranks: (bases, largest projection bucket, W_before, number of buckets).

    bases: per target, the left side's rows split like the weight and the right side's in
    even chunks, ceil(dim / world) rows each, in the basis dtype; no weight anchors.
    bucket: targets packed in order while their (n x right + left x n) x 4 bytes fit in
    `bucket_mb` (ShardedSubspaces._buckets); a bucket holds the all-gathered right sides
    (n x width, fp32), the products (left width x n, or k x k in high_block, fp32) and fp32
    work copies of the local rows (ceil(m / world) x n).
    W_before: every target's local rows in the weights' dtype, from before the optimizer
    step to the projection of its update (remember_weights)."""
    limit = int(bucket_mb * 2 ** 20)
    bases = before = 0
    buckets: list[int] = []
    size = work = 0
    opened = False
    for (m, n), k in zip(shapes, ks):
        lw, rw = svd_sharded_side_widths(m, n, k, projection)
        rows_m, rows_n = math.ceil(m / world), math.ceil(n / world)
        bases += (rows_m * lw + rows_n * rw) * basis_bytes
        before += rows_m * n * param_bytes
        cost = (n * rw + lw * n) * 4
        if opened and size + cost > limit:
            buckets.append(work)
            size = work = 0
        opened = True
        size += cost
        product = lw * rw if projection == "high_block" else lw * n
        work += (n * rw + product + rows_m * n) * FP32
    if opened:
        buckets.append(work)
    return bases, max(buckets, default=0), before, len(buckets)


def _estimate_svd_sharded(s: Any, shapes: list[tuple[int, int]], basis_bytes: int, param_bytes: int,
                          n_tasks: int, world: int, how: str) -> ShardedEstimate:
    from cl_runner.strategies.svd_orthogonal.rank import scheduled_fraction

    r = s.rank
    base, rounding = (1.0 - r.unfreeze_ratio, "floor") if r.mode == "ratio" else (r.trr, "half_up")
    mb = float(s.get("sharded_bucket_mb", 256.0))
    worst = {1: (0, 0, 0, 0), world: (0, 0, 0, 0)}
    for t in range(max(1, n_tasks)):  # the schedule may grow k: the largest over the tasks
        if s.bases == "accumulate":  # the union never grows past its rank_budget
            ks = [_svd_k(min(m, n), s.rank_budget, "floor") for m, n in shapes]
        else:
            fraction = scheduled_fraction(base, t, r.schedule_step, r.schedule_cap)
            ks = [_svd_k(min(m, n), fraction, rounding, _fraction_size(r, m, n)) for m, n in shapes]
        for w in worst:
            got = svd_sharded_bytes(shapes, ks, w, s.projection, basis_bytes, param_bytes, mb)
            worst[w] = tuple(max(a, b) for a, b in zip(worst[w], got))  # type: ignore[assignment]
    (bases1, bucket1, before1, _), (bases, bucket, before, n_buckets) = worst[1], worst[world]
    sides = "basis" if s.projection == "high_block" else "basis or complement"
    notes = [f"strategies/svd_orthogonal/sharded.ShardedSubspaces (the trainer.sharding=fsdp implementation): "
             f"{len(shapes)} targets, {how}: bases only ({sides} per side, {basis_bytes} B), in row shards of "
             f"ceil(rows / {world}), no weight anchors"]
    if s.bases == "accumulate":
        notes.append(f"bases=accumulate: the union at its rank_budget={s.rank_budget:g} (worst case), kept only "
                     "as the stored sides")
    transient_note = (f"ShardedSubspaces per step: the largest of {n_buckets} projection buckets "
                      f"(sharded_bucket_mb={mb:g}; all-gathered right sides, products, fp32 work rows) "
                      f"{gib(bucket)} + W_before (every target's local rows in the weights' dtype, {param_bytes} B, "
                      f"across the optimizer step) {gib(before)}")
    return ShardedEstimate(state_unsharded=bases1, state_per_rank=bases, transient_unsharded=bucket1 + before1,
                           transient_per_rank=bucket + before, notes=notes, transient_note=transient_note)


def _estimate_ewc(s: Any, facts: ModelFacts, trainable: int, n_tasks: int) -> StrategyEstimate:
    pairs = 1 if s.mode == "online" else max(1, n_tasks - 1)
    note = (f"Fisher + anchor: 2 fp32 copies of the {count(trainable)} trainable parameters per kept pair; "
            + ("online: 1 pair" if s.mode == "online" else
               f"separate: one pair per past task, {pairs} while training the last of {n_tasks} tasks"))
    return StrategyEstimate("ewc", state_bytes=2 * FP32 * trainable * pairs, transient_bytes=FP32 * trainable * pairs,
                            notes=[note], transient_note="the penalty's autograd keeps theta - theta* (fp32) until backward")


def _estimate_hft(s: Any, facts: ModelFacts, param_bytes: int, seed: int) -> StrategyEstimate:
    from cl_runner.strategies.base import plain_config
    from cl_runner.strategies.hft import _own_params, _round_half_up, block_units, choose_frozen_modules

    units = block_units(facts.model, facts.family, plain_config(s.modules) or {})
    every = [u for blocks in units.values() for cats in blocks for us in cats.values() for u in us]
    if s.granularity == "module":
        frozen = sum(p.numel() for u in choose_frozen_modules(units, s.ratio, random.Random(f"hft:{seed}:0"))
                     for p in _own_params(u.module).values())
        if not s.carry_optimizer:
            return StrategyEstimate("hft", trainable_params=facts.params - frozen, notes=[
                f"module granularity: {count(frozen)} parameters frozen per task leave the optimizer "
                "(no gradients, no moments); nothing saved"])
        return StrategyEstimate("hft", state_bytes=frozen * param_bytes, notes=[
            f"carry_optimizer: the frozen modules' values ({count(frozen)} parameters, {param_bytes} B each) are "
            "saved and restored after every step"])
    saved = index = 0
    for u in every:
        params = _own_params(u.module)
        if s.granularity == "row":
            first = next(iter(params))
            rows = params[first].shape[u.row_dim[first]]
            k = _round_half_up(s.ratio * rows)
            saved += sum(k * (p.numel() // rows) for p in params.values())
            index += k * 8 * len(params)  # one int64 row index per parameter
        else:
            for p in params.values():
                saved += _round_half_up(s.ratio * p.numel())
                index += p.numel()  # bool mask
    return StrategyEstimate("hft", state_bytes=saved * param_bytes + index, notes=[
        f"{s.granularity} granularity: the frozen {count(saved)} values ({param_bytes} B each) and their "
        f"{'row indices' if s.granularity == 'row' else 'bool masks'}"])


def _estimate_lines(node: Any, facts: ModelFacts, param_bytes: int) -> StrategyEstimate:
    if node.reference_on_cpu:
        return StrategyEstimate("lines", notes=[f"lines: its fp32 reference ({gib(FP32 * facts.params)}) is in "
                                                "host memory (reference_on_cpu)"])
    est = StrategyEstimate("lines", state_bytes=FP32 * facts.params,
                           notes=["lines: one fp32 reference copy of the weights"])
    if node.apply_to == "eval_only":
        est.transient_bytes = param_bytes * facts.params
        est.transient_note = "eval_only: a copy of the weights while the scaled ones are evaluated"
    return est


def adapter_sizes(cfg: Any, facts: ModelFacts) -> Optional[tuple[int, int]]:
    """(parameters of one LoRA, parameters of a classifier's head) under model.adapter=lora,
    from the meta-device model (None without an adapter): r x (in + out) per target layer."""
    if cfg.model.get("adapter", "none") != "lora":
        return None
    from cl_runner.adapters import default_target_modules, head_modules

    lora = cfg.model.lora
    targets = list(lora.target_modules) if lora.target_modules else default_target_modules(facts.family)
    one = 0
    for name, module in facts.model.named_modules():
        if _is_matmul(module) and any(name == t or name.endswith("." + t) for t in targets):
            d_in, d_out = ((module.in_features, module.out_features) if isinstance(module, nn.Linear)
                           else tuple(module.weight.shape))  # Conv1D stores (in, out)
            one += int(lora.r) * (d_in + d_out)
    head = sum(p.numel() for m in head_modules(facts.model).values() for p in m.parameters()) \
        if facts.kind == "classifier" else 0
    return one, head


def adapter_count(cfg: Any, n_tasks: int) -> int:
    """How many LoRAs the run holds: one per task for O-LoRA, else one."""
    return max(1, n_tasks) if cfg.strategy.name == "olora" else 1


def strategy_estimate(cfg: Any, facts: ModelFacts, n_tasks: int) -> StrategyEstimate:
    """The base strategy and its enabled add-ons, summed."""
    param_bytes = DTYPE_BYTES[cfg.model.dtype]
    s = cfg.strategy
    name = s.name
    adapter = adapter_sizes(cfg, facts)
    trainable = facts.params if adapter is None else sum(adapter)  # what strategies see as trainable
    try:
        if name in ("seq_ft", "multitask"):
            est = StrategyEstimate(name, notes=[f"{name}: no state of its own"])
        elif name == "olora":
            kept = (adapter_count(cfg, n_tasks) - 1) * (adapter[0] if adapter else 0)
            est = StrategyEstimate(name, state_bytes=kept * param_bytes, notes=[
                f"olora: the frozen LoRAs of the finished tasks, {count(kept)} parameters after the last task"])
        elif name == "ewc":
            est = _estimate_ewc(s, facts, trainable, n_tasks)
        elif name == "svd_orthogonal":
            est = _estimate_svd(s, facts, param_bytes, n_tasks)
        elif name == "hft":
            est = _estimate_hft(s, facts, param_bytes, int(cfg.seed))
        elif name == "classp":
            est = StrategyEstimate("classp", optimizer_bytes_per_param=FP32,
                                   optimizer_note="CLASSP's update rule: one fp32 accumulator per parameter "
                                                  "(replaces AdamW; kept across tasks)",
                                   notes=["classp: its state is the optimizer's accumulator (optimizer row)"])
        else:
            est = StrategyEstimate(name, notes=[f"{name}: not known to the memory plan, its state is not counted"])
    except ValueError as err:  # e.g. target patterns that match nothing: the run would fail the same way
        est = StrategyEstimate(name, notes=[f"{name}: state not estimated ({err})"])
    lines = cfg.get("lines")
    if lines is not None and lines.get("enabled"):
        extra = _estimate_lines(lines, facts, param_bytes)
        est.state_bytes += extra.state_bytes
        est.notes += extra.notes
        est.addon_state_bytes += extra.state_bytes
        est.addon_notes += extra.notes
        if extra.transient_bytes > est.transient_bytes:
            est.transient_bytes, est.transient_note = extra.transient_bytes, extra.transient_note
        if extra.transient_bytes > est.addon_transient_bytes:
            est.addon_transient_bytes, est.addon_transient_note = extra.transient_bytes, extra.transient_note
    replay = cfg.get("replay")
    if replay is not None and replay.get("enabled"):
        est.notes.append("replay: its buffer is examples in host memory (negligible on the GPU)")
    if adapter is not None:  # only the current LoRA (and a classifier's head) has gradients and optimizer state
        est.trainable_params = trainable
        est.notes.append(f"model.adapter=lora: {count(adapter[0])} LoRA parameters per adapter"
                         + (f" + {count(adapter[1])} head" if adapter[1] else "") + " train; the base is frozen")
    return est


# ----------------------------------------------------------------------------- the plan
def activation_bytes(batch: int, seq: int, hidden: int, blocks: int, vocab: int, compute_bytes: int,
                     checkpointing: bool, logits: bool = True) -> int:
    """Rough: batch x seq x hidden x blocks x ACTIVATION_FACTOR values (with checkpointing:
    each block's input, plus one block recomputed), plus the logits for the loss."""
    tokens = batch * seq
    per_block = tokens * hidden * ACTIVATION_FACTOR * compute_bytes
    body = tokens * hidden * compute_bytes * blocks + per_block if checkpointing else per_block * blocks
    head = tokens * vocab * (compute_bytes + LOGIT_EXTRA_BYTES) if logits else 0
    return body + head


def assemble(cfg: Any, facts: ModelFacts, est: StrategyEstimate, world_size: int, sharding: str,
             checkpointing: bool, gpu_memory_gb: Optional[float] = None) -> MemoryPlan:
    """The plan for one world size and sharding (model and strategy already measured)."""
    dtype = str(cfg.model.dtype)
    pb = DTYPE_BYTES[dtype]
    precision = str(cfg.trainer.precision)
    compute = 2 if precision in ("bf16", "fp16") else pb
    shards = world_size if sharding == "fsdp" else 1
    where = f"sharded over {world_size} ranks" if shards > 1 else (
        "every rank holds all (DDP)" if world_size > 1 else "one process")

    def row(name: str, unsharded: int, note: str, sharded: bool = True) -> PlanRow:
        return PlanRow(name, int(unsharded), int(math.ceil(unsharded / shards)) if sharded else int(unsharded), note)

    P = facts.params
    T = est.trainable_params if est.trainable_params is not None else P
    rows = [row("parameters", P * pb, f"{dtype}, {pb} B each; {where}"),
            row("gradients", T * pb, f"{dtype}, trainable parameters only" if T != P else f"{dtype}")]
    if est.optimizer_bytes_per_param is None:
        rows.append(row("optimizer state", T * 2 * pb,
                        f"AdamW exp_avg + exp_avg_sq in {dtype} (torch keeps them in the weights' dtype)"))
    else:
        rows.append(row("optimizer state", T * est.optimizer_bytes_per_param, est.optimizer_note))
    anneal = cfg.get("lr_schedule")
    if anneal is not None and anneal.get("enabled") and anneal.get("curve") == "infinite" \
            and int(anneal.get("anneal_steps", 0)) > 0:
        # The anneal steps a copy of the optimizer state, and one spare copy of the weights
        # holds the annealed (or the trained) weights while the other is in the model.
        optimizer_bytes = rows[-1].unsharded_bytes
        spare = 0 if anneal.get("backup_on_cpu") else P * pb
        rows.append(row("anneal copies (infinite schedule)", optimizer_bytes + spare,
                        "lr_schedule.curve=infinite: the anneal's copy of the optimizer state"
                        + ("; the spare weights are in host memory (backup_on_cpu)" if not spare
                           else f" and one spare copy of the weights ({dtype})")))
    own = est.sharded(world_size) if sharding == "fsdp" and est.sharded is not None else None
    if own is None:
        rows.append(row(f"strategy state ({est.name})", est.state_bytes, "; ".join(est.notes)))
        if est.transient_bytes:
            rows.append(row("strategy working set (est.)", est.transient_bytes, est.transient_note))
    else:  # the strategy's sharded implementation, plus any add-on split evenly
        addon = row("", est.addon_state_bytes, "")
        rows.append(PlanRow(f"strategy state ({est.name})", own.state_unsharded + addon.unsharded_bytes,
                            own.state_per_rank + addon.per_rank_bytes, "; ".join(own.notes + est.addon_notes)))
        extra = row("strategy working set (est.)", est.addon_transient_bytes, est.addon_transient_note)
        if own.transient_per_rank >= extra.per_rank_bytes and own.transient_per_rank:
            rows.append(PlanRow("strategy working set (est.)", own.transient_unsharded, own.transient_per_rank,
                                own.transient_note))
        elif extra.per_rank_bytes:
            rows.append(extra)
    if sharding == "none" and world_size > 1:
        rows.append(row("DDP gradient buckets", T * pb, "DDP reduces gradients through a bucketed copy of them",
                        sharded=False))
    if sharding == "none" and precision != "no" and pb == FP32:
        rows.append(row("autocast weight copies", facts.matmul_params * 2,
                        f"{precision} copies of the fp32 matmul weights, kept from forward to backward",
                        sharded=False))
    if sharding == "fsdp":
        unit = facts.largest_unit
        grad_bytes = compute + (FP32 if precision != "no" else 0)  # reduce_dtype fp32 under mixed precision
        if _fsdp_option(cfg, "reshard_after_forward", True):
            gathered, what = 2 * unit * compute, "2 units (current + prefetched)"
        else:
            gathered, what = P * compute, "every unit from its forward to its backward (reshard_after_forward=false)"
        rows.append(row("FSDP gathered units (est.)", gathered + unit * grad_bytes,
                        f"{what} unsharded in {compute} B, and one unit's gradients before reduce-scatter; "
                        f"largest unit {count(unit)} parameters", sharded=False))
    batch, seq = int(cfg.trainer.batch_size), int(cfg.model.max_length)
    acts = activation_bytes(batch, seq, facts.hidden, facts.blocks, facts.vocab, compute, checkpointing,
                            logits=facts.kind != "classifier")
    ckpt = "with activation checkpointing" if checkpointing else "no activation checkpointing"
    rows.append(row("activations (rough est.)", acts,
                    f"batch {batch} x seq {seq} x hidden {facts.hidden} x {facts.blocks} blocks x "
                    f"{ACTIVATION_FACTOR} values x {compute} B, + logits; {ckpt}", sharded=False))
    assumptions = []
    if sharding == "fsdp" and _fsdp_option(cfg, "cpu_offload", False):
        host = 0
        for r in rows:
            if r.name in ("parameters", "gradients", "optimizer state") or r.name.startswith("strategy "):
                host += r.per_rank_bytes
                r.per_rank_bytes, r.note = 0, "on the host (trainer.fsdp.cpu_offload); " + r.note
        assumptions.append(f"trainer.fsdp.cpu_offload: {gib(host)} of parameters, gradients, optimizer and strategy "
                           "state per rank in host memory (strategy state assumed to follow the parameters)")
    if pb == FP32 and precision != "no":
        assumptions.append(f"trainer.precision={precision} with model.dtype=float32: the fp32 weights are the master "
                           f"copy, gradients and AdamW moments are fp32 too; matmuls run in {precision}")
    elif pb == 2:
        fp32 = (P * FP32 + T * FP32 + T * 2 * FP32) / shards
        assumptions.append(f"model.dtype={dtype}: weights, gradients and optimizer moments are all {dtype}, no fp32 "
                           f"master copy; with fp32 master weights (model.dtype=float32) those three rows would be "
                           f"{gib(fp32)} per rank")
    assumptions.append("not counted: the CUDA context and allocator fragmentation (keep ~10% free), evaluation's "
                       "generation cache, temporary buffers of single ops")
    return MemoryPlan(model=facts.name, kind=facts.kind, family=facts.family, source=facts.source, params=P,
                      trainable_params=T, param_dtype=dtype, precision=precision, sharding=sharding,
                      world_size=world_size, strategy=est.name, batch_size=batch, seq_len=seq,
                      activation_checkpointing=checkpointing, rows=rows, assumptions=assumptions,
                      gpu_memory_gb=gpu_memory_gb)


def planned_tasks(cfg: Any) -> int:
    from cl_runner.streams.build import planned_task_names

    try:
        names = planned_task_names(cfg.task_stream)
    except ValueError:
        names = None
    return len(names) if names else 1


def build_plan(cfg: Any, world_size: Optional[int] = None, sharding: Optional[str] = None,
               gpu_memory_gb: Optional[float] = None, facts: Optional[ModelFacts] = None) -> MemoryPlan:
    """The memory plan of a validated run config. world_size, sharding and gpu_memory_gb
    default to the config (plan_world_size / $WORLD_SIZE, trainer.sharding,
    plan_gpu_memory_gb)."""
    world = world_size if world_size is not None else plan_world_size(cfg)
    mode = sharding if sharding is not None else plan_sharding(cfg)
    gpu = gpu_memory_gb if gpu_memory_gb is not None else plan_gpu_memory_gb(cfg)
    ckpt = plan_activation_checkpointing(cfg)
    facts = facts or model_facts(cfg.model)
    adapter = adapter_sizes(cfg, facts)
    if adapter is not None:  # the adapters' own parameters sit beside the base model's
        facts = dataclasses.replace(facts, params=facts.params + adapter_count(cfg, planned_tasks(cfg)) * adapter[0])
    est = strategy_estimate(cfg, facts, planned_tasks(cfg))
    plan = assemble(cfg, facts, est, world, mode, ckpt, gpu)
    if gpu is not None and not plan.fits:
        for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            trial = assemble(cfg, facts, est, w, "fsdp", ckpt, gpu)
            if trial.per_rank_total <= HEADROOM * gpu * GIB:
                plan.fits_from_fsdp_world = w
                break
    return plan


# ----------------------------------------------------------------------------- printing
def gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024 ** 2:
        return f"{n / 1024 ** 2:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_plan(plan: MemoryPlan) -> str:
    head = (f"Memory plan (per rank; model built on the meta device, nothing loaded): {plan.model} "
            f"({plan.family}, {plan.kind}), {count(plan.params)} parameters, {count(plan.trainable_params)} trainable")
    setup = (f"  model.dtype={plan.param_dtype}  trainer.precision={plan.precision}  "
             f"trainer.sharding={plan.sharding}  world size {plan.world_size}  strategy={plan.strategy}  "
             f"sizes from {plan.source}")
    width = max(len(r.name) for r in plan.rows) + 2
    lines = [head, setup, "", "  " + "".ljust(width) + "unsharded".rjust(12) + "per rank".rjust(12)]
    for r in plan.rows:
        lines.append("  " + r.name.ljust(width) + gib(r.unsharded_bytes).rjust(12) + gib(r.per_rank_bytes).rjust(12)
                     + "  " + r.note)
    lines.append("  " + "-" * (width + 24))
    lines.append("  " + "total per rank".ljust(width) + "".rjust(12) + gib(plan.per_rank_total).rjust(12))
    verdict = plan.verdict()
    lines.append("")
    lines.append(f"  verdict: {verdict}" if verdict else
                 "  verdict: none (set plan_gpu_memory_gb=<GiB per GPU> for one)")
    lines += [f"  assumed: {a}" for a in plan.assumptions]
    return "\n".join(lines)


def print_memory_plan(cfg: Any) -> Optional[MemoryPlan]:
    """Print the plan (cl-run dry_run=true); a model whose sizes cannot be read offline
    gets one line saying why instead. Bad plan_* values raise ConfigError."""
    try:
        plan = build_plan(cfg)
    except MemoryPlanError as err:
        print(f"Memory plan: not available: {err}", flush=True)
        return None
    print(format_plan(plan), flush=True)
    return plan
