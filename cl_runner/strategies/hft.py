"""hft: Half Fine-Tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language
Models").

At the start of every task a new random half of each transformer block is frozen for that
task (seeded from the run seed and the task index, so reruns draw the same masks). The
modules of a block fall into categories (attention projections, MLP projections, norms);
with n modules in a category and `ratio` ρ, ρ·n of them are frozen per block. When ρ·n is
not a whole number, a random share (ρ·n − ⌊ρ·n⌋) of the blocks of each stack freezes
⌈ρ·n⌉ and the others ⌊ρ·n⌋, so the paper's scheme falls out at ρ = 0.5:

- LLaMA (q/k/v/o, gate/up/down, 2 norms): 2 of 4 attention, 2 of 3 MLP in a random half of
  the blocks and 1 of 3 in the other half, 1 of 2 norms.
- GPT-2 (fused c_attn + c_proj, c_fc + c_proj, ln_1/ln_2): "half" is half of the modules of
  each category, i.e. 1 of the 2 attention modules (c_attn holds q, k and v together, so
  the frozen share of attention weights is 3/4 or 1/4, 1/2 in expectation), 1 of 2 MLP
  modules (equal sizes: exactly half), 1 of 2 norms.
- T5: self-attention and cross-attention are separate categories (2 of 4 each), the MLP
  (wi, wo: 1 of 2; gated wi_0, wi_1, wo: as LLaMA) and the 2 (encoder) or 3 (decoder)
  norms of a block.
- BERT: 2 of the 4 attention modules (query, key, value, attention output), 1 of the 2 MLP
  modules (intermediate, output), 1 of the 2 LayerNorms.
- A family not in `strategy.modules`: every leaf module with parameters inside a block is
  a norm (class name contains "norm"), an attention module (a name part contains "attn" or
  "attention") or an MLP module (any other 2-D weight); embeddings inside blocks are left
  alone. Half of each category per block, by the same rule.

Embeddings, the LM head, the final norm and anything outside the blocks always train.

Freezing: with `granularity: module` (the paper) and a fresh optimizer per task, frozen
modules get requires_grad=False in before_task, so the loop's optimizer never sees them (no
weight decay, no momentum) and backward skips their gradients; after_task unfreezes them.
`granularity: row | element` (our extension) freeze a random ρ share of the output rows
(weight rows and their bias entries; Conv1D's rows are its columns) or of the elements of
every categorised module instead: the parameters stay in the optimizer, their masked
gradient entries are zeroed in after_backward, and the masked entries are copied back after
every optimizer step, because decoupled weight decay (and stale momentum) would move them
even with a zero gradient. `carry_optimizer: true` uses the same mask-and-restore path for
whole modules, so the carried optimizer keeps a fixed parameter set across tasks.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.models.parts import block_stacks
from cl_runner.strategies.base import Strategy, plain_config
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.rounding import round_half_up
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task

GRANULARITIES = ("module", "row", "element")
_STATE_VERSION = 1


def _default_modules() -> Dict[str, Dict[str, List[str]]]:
    llama = {"attention": [r"self_attn\.(q|k|v|o)_proj"],
             "mlp": [r"mlp\.(gate|up|down)_proj"],
             "norm": [r"input_layernorm", r"post_attention_layernorm"]}
    return {
        "llama": {k: list(v) for k, v in llama.items()},
        "mistral": {k: list(v) for k, v in llama.items()},
        "qwen2": {k: list(v) for k, v in llama.items()},
        "gpt2": {"attention": [r"attn\.c_attn", r"attn\.c_proj"],
                 "mlp": [r"mlp\.c_fc", r"mlp\.c_proj"],
                 "norm": [r"ln_1", r"ln_2"]},
        "t5": {"self_attention": [r"SelfAttention\.(q|k|v|o)"],
               "cross_attention": [r"EncDecAttention\.(q|k|v|o)"],
               "mlp": [r"DenseReluDense\.(wi|wi_0|wi_1|wo)"],
               "norm": [r"layer_norm"]},
        "bert": {"attention": [r"attention\.self\.(query|key|value)", r"attention\.output\.dense"],
                 "mlp": [r"intermediate\.dense", r"^output\.dense"],
                 "norm": [r"LayerNorm"]},
    }


@dataclass
class HFTConfig:
    name: str = "hft"
    # Share of each block's modules (rows, elements) frozen per task.
    ratio: float = 0.5
    # module (the paper) | row | element (our extension: gradient mask + restore).
    granularity: str = "module"
    # Module categories per model family: category -> regexes matched against the end of
    # a module's name inside its block. Families not listed use the structural rule.
    modules: Dict[str, Dict[str, List[str]]] = field(default_factory=_default_modules)
    # Keep AdamW's state across tasks (frozen modules then use mask-and-restore).
    carry_optimizer: bool = False


@dataclass
class Unit:
    """One freezable module of a block."""
    name: str  # full module name
    module: nn.Module
    row_dim: dict[str, int]  # parameter name (local) -> its output-row dimension


@dataclass
class _Mask:
    param: nn.Parameter
    kind: str  # "whole" | "rows" | "elements"
    index: Optional[torch.Tensor] = None  # rows: LongTensor; elements: BoolTensor
    dim: int = 0
    saved: Optional[torch.Tensor] = None  # frozen values to restore after each step


_round_half_up = round_half_up


def _own_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module._parameters.items() if isinstance(p, nn.Parameter)}


def _row_dims(module: nn.Module) -> dict[str, int]:
    transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
    return {n: (1 if transposed and p.dim() == 2 else 0) for n, p in _own_params(module).items()}


def block_units(model: nn.Module, family: str,
                modules_by_family: dict[str, dict[str, list[str]]]) -> dict:
    """{stack name: [per block: {category: [Unit, ...]}]} for every block stack."""
    family = (family or "").lower()
    spec = (modules_by_family or {}).get(family)
    compiled = None
    if spec is not None:
        compiled = {}
        for category, patterns in spec.items():
            try:
                compiled[category] = [re.compile(rf"(?:^|\.)(?:{p})$") for p in patterns]
            except re.error as err:
                raise ValueError(f"bad value for 'strategy.modules.{family}.{category}': "
                                 f"{err}") from None
    out: dict[str, list[dict[str, list[Unit]]]] = {}
    for sname, stack in block_stacks(model).items():
        per_block = []
        for idx, block in enumerate(stack):
            cats: dict[str, list[Unit]] = {c: [] for c in (compiled or {})}
            for rel, module in block.named_modules():
                if not rel or not _own_params(module):
                    continue
                category = (_match(compiled, rel) if compiled is not None
                            else _structural_category(rel, module))
                if category is None:
                    continue
                cats.setdefault(category, []).append(
                    Unit(f"{sname}.{idx}.{rel}", module, _row_dims(module)))
            per_block.append(cats)
        out[sname] = per_block
    if not any(units for blocks in out.values() for cats in blocks for units in cats.values()):
        where = f"strategy.modules.{family}" if spec is not None else "the structural rule"
        raise ValueError(f"hft found no freezable module inside the blocks of this {family!r} "
                         f"model with {where}; add strategy.modules.{family or '<family>'} "
                         "with category -> module-name patterns")
    return out


def _match(compiled: dict[str, list[re.Pattern]], rel: str) -> Optional[str]:
    for category, patterns in compiled.items():  # the first category that matches wins
        if any(p.search(rel) for p in patterns):
            return category
    return None


def _structural_category(rel: str, module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Embedding):
        return None
    if "norm" in type(module).__name__.lower():
        return "norm"
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
        return None
    parts = rel.lower().split(".")
    return "attention" if any("attn" in p or "attention" in p for p in parts) else "mlp"


def choose_frozen_modules(units: dict, ratio: float, rng: random.Random) -> list[Unit]:
    """The module-level mask: ratio·n modules of each category per block (see the module
    docstring for the fractional rule)."""
    frozen: list[Unit] = []
    for sname, blocks in units.items():
        categories = list(dict.fromkeys(c for cats in blocks for c in cats))
        # Blocks that take the larger count, per category (chosen per stack).
        larger: dict[str, set[int]] = {}
        for category in categories:
            counts = {len(cats.get(category, [])) for cats in blocks}
            n = max(counts)
            share = ratio * n - math.floor(ratio * n + 1e-9)
            holders = [i for i, cats in enumerate(blocks) if cats.get(category)]
            take = _round_half_up(share * len(holders)) if share > 1e-9 else 0
            larger[category] = set(rng.sample(holders, take))
        for i, cats in enumerate(blocks):
            for category in categories:
                members = cats.get(category, [])
                if not members:
                    continue
                base = math.floor(ratio * len(members) + 1e-9)
                count = min(len(members), base + (1 if i in larger[category] else 0))
                frozen.extend(rng.sample(members, count))
    return frozen


@register("hft", config=HFTConfig, summary="half fine-tuning: half of each block's parameters frozen per task, chosen at random",
          adapters="it freezes half of the base model's modules, which an adapter already freezes in full")
class HalfFineTuning(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        s, facts, param_bytes, seed = self.config, inputs.facts, inputs.param_bytes, int(inputs.cfg.seed)
        units = block_units(facts.model, facts.family, plain_config(s.modules) or {})
        every = [u for blocks in units.values() for cats in blocks for us in cats.values() for u in us]
        if s.granularity == "module":
            frozen = sum(p.numel() for u in choose_frozen_modules(units, s.ratio, random.Random(f"hft:{seed}:0"))
                         for p in _own_params(u.module).values())
            if not s.carry_optimizer:
                return StrategyEstimate(self.name, trainable_params=facts.params - frozen, notes=[
                    f"module granularity: {count(frozen)} parameters frozen per task leave the optimizer "
                    "(no gradients, no moments); nothing saved"])
            return StrategyEstimate(self.name, state_bytes=frozen * param_bytes, notes=[
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
        return StrategyEstimate(self.name, state_bytes=saved * param_bytes + index, notes=[
            f"{s.granularity} granularity: the frozen {count(saved)} values ({param_bytes} B each) and their "
            f"{'row indices' if s.granularity == 'row' else 'bool masks'}"])


    def __init__(self, config: HFTConfig) -> None:
        super().__init__(config)
        require_choice(config.granularity, "strategy.granularity", GRANULARITIES)
        require(0.0 <= config.ratio <= 1.0, "strategy.ratio", config.ratio, "use a fraction in [0, 1] (0.5 freezes half)")
        self.freezes_parameters = True
        self.units: dict = {}
        self._masks: list[_Mask] = []
        self._excluded: list[nn.Parameter] = []
        self._in_task = False
        self._task = -1
        self._history: list[dict[str, Any]] = []

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.units = block_units(ctx.unwrapped_model, ctx.model_family,
                                 plain_config(self.config.modules) or {})

    # ------------------------------------------------------------------ masks
    def _rng(self, t: int) -> random.Random:
        return random.Random(f"hft:{self.ctx.seed}:{t}")

    def _all_units(self) -> list[Unit]:
        return [u for blocks in self.units.values() for cats in blocks
                for units in cats.values() for u in units]

    def _freeze(self, t: int) -> dict[str, Any]:
        rng = self._rng(t)
        gran = self.config.granularity
        frozen_names: list[str] = []
        frozen_params = 0
        if gran == "module":
            for unit in choose_frozen_modules(self.units, self.config.ratio, rng):
                frozen_names.append(unit.name)
                for p in _own_params(unit.module).values():
                    frozen_params += p.numel()
                    if self.carry_optimizer:
                        self._masks.append(_Mask(p, "whole"))
                    else:
                        p.requires_grad_(False)
                        p.grad = None
                        self._excluded.append(p)
        else:
            gen = torch.Generator().manual_seed(rng.getrandbits(63))
            for unit in self._all_units():
                params = _own_params(unit.module)
                if gran == "row":
                    dims = {n: unit.row_dim[n] for n in params}
                    rows = params[next(iter(params))].shape[dims[next(iter(params))]]
                    if any(p.shape[dims[n]] != rows for n, p in params.items()):
                        raise ValueError(f"hft granularity=row: the parameters of "
                                         f"{unit.name} disagree on the number of rows")
                    k = _round_half_up(self.config.ratio * rows)
                    chosen = torch.randperm(rows, generator=gen)[:k].sort().values
                    for n, p in params.items():
                        index = chosen.to(p.device)
                        self._masks.append(_Mask(p, "rows", index, dims[n]))
                        frozen_params += k * (p.numel() // rows)
                else:
                    for p in params.values():
                        k = _round_half_up(self.config.ratio * p.numel())
                        flat = torch.zeros(p.numel(), dtype=torch.bool)
                        flat[torch.randperm(p.numel(), generator=gen)[:k]] = True
                        self._masks.append(_Mask(p, "elements", flat.view_as(p).to(p.device)))
                        frozen_params += k
        self._save_frozen_values()
        block_params = sum(p.numel() for u in self._all_units()
                           for p in _own_params(u.module).values())
        return {"frozen_modules": frozen_names, "frozen_params": frozen_params,
                "categorised_params": block_params,
                "frozen_fraction": frozen_params / block_params if block_params else 0.0,
                "state_bytes": self.extra_state_bytes()}

    @torch.no_grad()
    def _save_frozen_values(self) -> None:
        for m in self._masks:
            w = m.param.detach()
            if m.kind == "whole":
                m.saved = w.clone()
            elif m.kind == "rows":
                m.saved = w.index_select(m.dim, m.index).clone()
            else:
                m.saved = w[m.index].clone()

    def _unfreeze(self) -> None:
        for p in self._excluded:
            p.requires_grad_(True)
        self._excluded, self._masks = [], []

    # ------------------------------------------------------------------ hooks
    def before_task(self, t: int, task: Task) -> None:
        self._unfreeze()
        info = self._freeze(t)
        self._in_task, self._task = True, t
        self._history.append({"task": t, "name": task.name, **info})
        self.ctx.log({"hft/frozen_modules": len(info["frozen_modules"]),
                      "hft/frozen_params": info["frozen_params"],
                      "hft/frozen_fraction": info["frozen_fraction"]})

    @torch.no_grad()
    def after_backward(self) -> None:
        for m in self._masks:
            g = m.param.grad
            if g is None:
                continue
            if m.kind == "whole":
                g.zero_()
            elif m.kind == "rows":
                g.index_fill_(m.dim, m.index, 0)
            else:
                g.masked_fill_(m.index, 0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for m in self._masks:
            w = m.param.data
            if m.kind == "whole":
                w.copy_(m.saved)
            elif m.kind == "rows":
                w.index_copy_(m.dim, m.index, m.saved)
            else:
                w.masked_scatter_(m.index, m.saved)

    def after_task(self, t: int, task: Task) -> None:
        self._unfreeze()
        self._in_task = False

    # ------------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        # The masks are a pure function of (seed, task): only the task is stored.
        return {"version": _STATE_VERSION, "task": self._task, "in_task": self._in_task,
                "history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"hft state version {state.get('version')!r}; this code reads "
                             f"version {_STATE_VERSION}")
        self._unfreeze()
        self._task, self._in_task = state["task"], state["in_task"]
        self._history = list(state["history"])
        if self._in_task:  # resumed mid-task: before_task is not called again
            # Frozen entries have not moved since the task start, so the values saved now
            # are the task-start values.
            self._freeze(self._task)

    def extra_state_bytes(self) -> int:
        total = 0
        for m in self._masks:
            for t in (m.index, m.saved):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def report(self) -> dict[str, Any]:
        return {"ratio": self.config.ratio, "granularity": self.config.granularity,
                "tasks": list(self._history),
                "peak_state_bytes": max((h["state_bytes"] for h in self._history), default=0)}

    def frozen_parameters(self) -> list[str]:
        """Names of the parameters excluded from training right now (module granularity)."""
        ids = {id(p) for p in self._excluded} | {id(m.param) for m in self._masks
                                                 if m.kind == "whole"}
        return [n for n, p in self.ctx.unwrapped_model.named_parameters() if id(p) in ids]
