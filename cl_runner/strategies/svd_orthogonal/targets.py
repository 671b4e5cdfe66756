"""Which weight matrices svd_orthogonal decomposes (its "targets").

A target is the 2-D `weight` of one module inside the repeated transformer blocks: the
attention projections (q, k, v, o; GPT-2's fused `c_attn` is one target) and the MLP
projections (gate, up, down; T5 wi/wo; BERT intermediate/output). Embeddings, the LM head
and norms are never targets.

Known families name their targets with patterns from the config (`strategy.targets`):
each pattern is a regular expression matched against the *end* of a module's dotted name,
at a dot boundary, so `self_attn.q_proj` matches `model.layers.3.self_attn.q_proj` but not
`model.layers.3.self_attn.xq_proj`. A family with no entry falls back to a structural rule:
every 2-D weight inside the block stacks (`model_parts.block_stacks`), except those of
embedding modules (e.g. T5's relative position bias).

GPT-2's `Conv1D` stores its weight as (in, out), the transpose of `nn.Linear`. Nothing
here needs to undo that: the top-k SVD of Wᵀ swaps U and V, and both projections
((I − UUᵀ) G (I − VVᵀ) and G − U(UᵀGV)Vᵀ) commute with transposition, so decomposing and
projecting the stored matrix preserves exactly the same subspace of the logical W.
`Target.transposed` only records it (for reports and activation shapes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from torch import nn

from cl_runner.models.parts import parameter_blocks


@dataclass(frozen=True)
class Target:
    name: str  # parameter name, e.g. "transformer.h.0.attn.c_attn.weight"
    module_name: str  # owning module, e.g. "transformer.h.0.attn.c_attn"
    module: nn.Module
    param: nn.Parameter
    transposed: bool  # stored as (in, out) (GPT-2 Conv1D) instead of (out, in)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.param.shape)  # type: ignore[return-value]

    @property
    def rank_dim(self) -> int:
        """min(m, n): the most singular directions the matrix has."""
        return min(self.param.shape)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return type(module).__name__ == "Conv1D"
    return isinstance(module, Conv1D)


def compile_patterns(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(rf"(?:^|\.)(?:{pattern})$"))
        except re.error as err:
            raise ValueError(f"bad value for '{key}': pattern {pattern!r} is not a regular "
                             f"expression ({err}); write e.g. 'self_attn\\.q_proj'") from None
    return compiled


def _weight_of(module: nn.Module) -> Optional[nn.Parameter]:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return weight
    return None


def find_targets(model: nn.Module, family: str,
                 patterns_by_family: Mapping[str, Sequence[str]]) -> list[Target]:
    """The target matrices of `model` in named_modules order (see the module docstring)."""
    family = (family or "").lower()
    patterns = patterns_by_family.get(family) if patterns_by_family else None
    in_blocks = {name for name, pos in parameter_blocks(model).items() if pos is not None}
    targets: list[Target] = []
    if patterns is not None:
        key = f"strategy.targets.{family}"
        compiled = compile_patterns(list(patterns), key)
        for mname, module in model.named_modules():
            weight = _weight_of(module)
            if weight is None or isinstance(module, nn.Embedding):
                continue
            if any(p.search(mname) for p in compiled):
                targets.append(_target(mname, module, weight))
        if not targets:
            raise ValueError(
                f"bad value for '{key}': the patterns {list(patterns)} match no 2-D weight of "
                f"this {family} model; module names look like "
                f"{[n for n, m in model.named_modules() if _weight_of(m) is not None][:4]}")
        return targets
    for mname, module in model.named_modules():
        weight = _weight_of(module)
        if weight is None or isinstance(module, nn.Embedding):
            continue
        pname = f"{mname}.weight" if mname else "weight"
        if pname in in_blocks:
            targets.append(_target(mname, module, weight))
    if not targets:
        raise ValueError(
            f"model family {family!r} has no entry in 'strategy.targets' and no 2-D weight "
            "was found inside repeated blocks; add strategy.targets." + (family or "<family>")
            + "=[...] with module-name patterns")
    return targets


def _target(mname: str, module: nn.Module, weight: nn.Parameter) -> Target:
    name = f"{mname}.weight" if mname else "weight"
    return Target(name=name, module_name=mname, module=module, param=weight,
                  transposed=_is_conv1d(module))
