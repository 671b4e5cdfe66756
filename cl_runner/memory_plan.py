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
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.errors import ConfigError, require, require_choice
from cl_runner.strategies.memory import FP32, GIB, ModelFacts, PlanInputs, StrategyEstimate, count, gib

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Activations kept for backward, in values per token and transformer block (see
# `activation_values_per_token`): each norm keeps its input, its normalised output and the
# scaled output the next matmul reads (3h, twice), the attention its rotated q and k and its
# v (h + 2 kv) and its output for the out-projection (h), the MLP 2 x intermediate (up and
# activation) or, gated (SwiGLU), 4 x (gate, up, activation, their product). Checked with
# autograd's saved-tensor hooks on a LLaMA block (h 256, intermediate 688: 21.8 h
# measured, 20.8 h + the score matrix counted). Korthikanti et al. 2022 count about 17 h
# for a GPT block (MLP 4h, GeLU), which this gives as 18 h. Without intermediate_size in the
# model config the MLP is taken as 4 x hidden, ungated. A rough figure, no more.
NORM_VALUES, ATTENTION_VALUES = 6, 2
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
    from cl_runner.models.tokenizers import ByteTokenizer

    if model_cfg.tokenizer in (None, "byte"):
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        from cl_runner.models.build import resolve_model_path
        from cl_runner.models.tokenizers import HFTokenizer

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

    from cl_runner.models.build import ModelLoadError, random_init_config, resolve_model_path

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
    from cl_runner.models.build import _auto_class

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
    from cl_runner.models.parts import block_stacks

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
    inner = int(getattr(c, "intermediate_size", 0) or getattr(c, "n_inner", 0) or getattr(c, "d_ff", 0) or 0)
    heads = int(getattr(c, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(c, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(c, "head_dim", 0) or (hidden // heads if heads else 0))
    names = [n for n, _ in model.named_parameters()]
    gated = any(m in n for n in names for m in ("gate_proj", "gate_up_proj", ".wi_0."))
    return ModelFacts(name=str(model_cfg.name), kind=str(model_cfg.kind), family=family, source=source,
                      params=params, matmul_params=matmul, hidden=hidden, blocks=blocks, vocab=vocab,
                      largest_unit=largest, model=model, intermediate=inner, kv_dim=kv_heads * head_dim,
                      gated_mlp=gated)


# ----------------------------------------------------------------------------- strategies
def adapter_sizes(cfg: Any, facts: ModelFacts) -> Optional[tuple[int, int]]:
    """(parameters of one LoRA, parameters of a classifier's head) under model.adapter=lora,
    from the meta-device model (None without an adapter): r x (in + out) per target layer."""
    if cfg.model.get("adapter", "none") != "lora":
        return None
    from cl_runner.models.adapters import default_target_modules, head_modules

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


def strategy_estimate(cfg: Any, facts: ModelFacts, n_tasks: int, stack: Any = None) -> StrategyEstimate:
    """The run's strategy stack's own estimate (`Strategy.memory_estimate`: the base and its
    add-ons), with what model.adapter=lora changes about what trains."""
    from cl_runner.strategies import build_strategy

    stack = stack if stack is not None else build_strategy(cfg)
    adapter = adapter_sizes(cfg, facts)
    trainable = facts.params if adapter is None else sum(adapter)  # what strategies see as trainable
    inputs = PlanInputs(cfg=cfg, facts=facts, n_tasks=n_tasks, param_bytes=DTYPE_BYTES[cfg.model.dtype],
                        trainable=trainable, adapter_params=adapter[0] if adapter else None)
    try:
        est = stack.memory_estimate(inputs)
    except ValueError as err:  # e.g. target patterns that match nothing: the run would fail the same way
        est = StrategyEstimate(stack.name, notes=[f"{stack.name}: state not estimated ({err})"])
    if adapter is not None:  # only the current LoRA (and a classifier's head) has gradients and optimizer state
        est.trainable_params = trainable
        est.notes.append(f"model.adapter=lora: {count(adapter[0])} LoRA parameters per adapter"
                         + (f" + {count(adapter[1])} head" if adapter[1] else "") + " train; the base is frozen")
    return est


# ----------------------------------------------------------------------------- the plan
def activation_values_per_token(facts: ModelFacts) -> int:
    """Values one transformer block keeps for backward per token (fused attention: no
    score matrix), from the model's hidden, key/value and MLP widths."""
    h = facts.hidden
    kv = facts.kv_dim or h
    inner = facts.intermediate or 4 * h
    return NORM_VALUES * h + ATTENTION_VALUES * h + 2 * kv + (4 if facts.gated_mlp else 2) * inner


def activation_bytes(batch: int, seq: int, hidden: int, blocks: int, vocab: int, compute_bytes: int,
                     checkpointing: bool, logits: bool = True, values_per_token: Optional[int] = None) -> int:
    """Rough: batch x seq x blocks x values_per_token (default 18 x hidden, a GPT block)
    values (with checkpointing: each block's input, plus one block recomputed), plus the
    logits for the loss."""
    tokens = batch * seq
    per_block = tokens * (values_per_token or 18 * hidden) * compute_bytes
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
    rows += [row(name, size, note) for name, size, note in est.rows]  # the strategy's own rows
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
    values = activation_values_per_token(facts)
    acts = activation_bytes(batch, seq, facts.hidden, facts.blocks, facts.vocab, compute, checkpointing,
                            logits=facts.kind != "classifier", values_per_token=values)
    ckpt = "with activation checkpointing" if checkpointing else "no activation checkpointing"
    rows.append(row("activations (rough est.)", acts,
                    f"batch {batch} x seq {seq} x hidden {facts.hidden} x {facts.blocks} blocks x "
                    f"{values / max(1, facts.hidden):.1f} values per hidden unit ("
                    f"{'gated' if facts.gated_mlp else 'plain'} MLP of {facts.intermediate or 4 * facts.hidden}) x "
                    f"{compute} B, + logits; {ckpt}", sharded=False))
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
    if est.host_bytes:
        assumptions.append(f"strategy state in host memory, not in the rows: up to {gib(est.host_bytes)} per process "
                           f"({est.name})")
    assumptions.append("not counted: the CUDA context and allocator fragmentation (keep ~10% free), evaluation's "
                       "generation cache, temporary buffers of single ops (on a GPU AdamW's foreach step holds up to "
                       "one more copy of the trainable parameters); the rows are not all alive at once (a strategy's "
                       "task-end working set never meets the activations), so the total is an upper bound on what "
                       "they count; on a CPU the process's own memory (interpreter, libraries, data, freed memory the "
                       "allocator keeps) comes on top: compare a CPU run's peak RSS above its floor")
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
    from cl_runner.strategies import build_strategy

    stack = build_strategy(cfg)
    n_tasks = planned_tasks(cfg)
    adapter = adapter_sizes(cfg, facts)
    if adapter is not None:  # the adapters' own parameters sit beside the base model's (O-LoRA: one per task)
        count_ = len(stack.adapter_names(n_tasks) or [None])
        facts = dataclasses.replace(facts, params=facts.params + count_ * adapter[0])
    est = strategy_estimate(cfg, facts, n_tasks, stack)
    plan = assemble(cfg, facts, est, world, mode, ckpt, gpu)
    if gpu is not None and not plan.fits:
        for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            trial = assemble(cfg, facts, est, w, "fsdp", ckpt, gpu)
            if trial.per_rank_total <= HEADROOM * gpu * GIB:
                plan.fits_from_fsdp_world = w
                break
    return plan


# ----------------------------------------------------------------------------- printing
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
