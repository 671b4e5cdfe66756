"""The input Gram matrices C = R R^T = sum_x x x^T of a set of linear layers over a
task's examples (GPM's representation matrices, basis.py), from forward hooks in
no-grad, eval-mode forwards.

Every token position the model reads is one column x of R. Padding positions are left
out with the batch's attention mask where a layer's input lines up with it (causal LMs,
classifiers); a seq2seq model is run one example at a time (no padding at all), because
its decoder layers see other positions than the encoder's mask.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def input_grams(model: nn.Module, modules: Sequence[nn.Module], dims: Sequence[int],
                batches: Sequence[dict[str, torch.Tensor]],
                forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
                autocast: Callable[[], Any]) -> tuple[list[torch.Tensor], list[int]]:
    """(C per module as fp32 (dims[i] x dims[i], the module's input width), columns counted
    per module). A module called several times in one forward adds every call's inputs; one
    never called gets C = 0 (nothing to preserve)."""
    grams: list[Optional[torch.Tensor]] = [None] * len(modules)
    columns = [0] * len(modules)
    mask: dict[str, Optional[torch.Tensor]] = {"positions": None}

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            keep = mask["positions"]
            if keep is not None and tuple(x.shape[:-1]) == tuple(keep.shape):
                rows = x[keep]
            else:  # an input that does not line up with the mask: every position counts
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.float()
            gram = rows.T @ rows
            grams[i] = gram if grams[i] is None else grams[i].add_(gram)
            columns[i] += rows.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                attention = batch.get("attention_mask")
                mask["positions"] = attention.bool() if attention is not None else None
                with autocast():
                    forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    device = next(model.parameters()).device
    out = [torch.zeros((dim, dim), dtype=torch.float32, device=device) if gram is None else gram
           for dim, gram in zip(dims, grams)]
    return out, columns
