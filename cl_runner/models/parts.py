"""Where the repeated transformer blocks are, and which block a parameter belongs to.

Works for any model by structure rather than by name: a "block stack" is an
`nn.ModuleList` of at least two children of the same class (GPT-2 `transformer.h`,
LLaMA `model.layers`, BERT `encoder.layer`, T5 `encoder.block` and `decoder.block`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockPosition:
    stack: str  # dotted name of the ModuleList, e.g. "transformer.h"
    index: int  # 0-based block index inside its stack
    depth: int  # number of blocks in that stack


def block_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    stacks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and sum(1 for _ in module[0].parameters()) > 0:
                # Skip lists nested inside a block already found (e.g. per-head lists).
                if not any(name.startswith(s + ".") for s in stacks):
                    stacks[name] = module
    return stacks


def parameter_blocks(model: nn.Module) -> dict[str, BlockPosition | None]:
    """Parameter name -> its block position, or None for parameters outside all blocks
    (embeddings, final norm, LM head, classifier head)."""
    stacks = block_stacks(model)
    positions: dict[str, BlockPosition | None] = {}
    for pname, _ in model.named_parameters():
        positions[pname] = None
        for sname, stack in stacks.items():
            prefix = sname + "."
            if pname.startswith(prefix):
                idx = int(pname[len(prefix):].split(".", 1)[0])
                positions[pname] = BlockPosition(sname, idx, len(stack))
                break
    return positions
