"""Gradients as one flat fp32 vector over the trained parameters, and the gradient of the
loss on chosen examples computed beside the training step's accumulated `.grad`.

GEM, A-GEM and OGD compare and project whole-model gradient vectors; this is where the
parameters' `.grad` tensors become such a vector and where a projected vector goes back.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cl_runner.streams.task import Example


class GradientLayout:
    """The trained parameters (requires_grad, in `named_parameters` order) laid end to end:
    parameter i owns entries [offsets[i], offsets[i] + numel_i) of the flat vector."""

    def __init__(self, model: nn.Module) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters to take gradients of")
        sizes = [p.numel() for _, p in self.named]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)
        self.device = self.named[0][1].device

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat`, one per parameter, each shaped like it."""
        return [flat[o:o + p.numel()].view_as(p) for o, (_, p) in zip(self.offsets, self.named)]

    def flatten(self, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """One fp32 vector from per-parameter tensors (None reads as zeros)."""
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        for part, t in zip(self.slices(flat), tensors):
            if t is not None:
                part.copy_(t.detach())
        return flat

    def read_grad(self) -> torch.Tensor:
        return self.flatten([p.grad for p in self.params])

    def write_grad(self, flat: torch.Tensor) -> None:
        """Copy `flat` into every parameter's .grad (a parameter without one gets one only
        where the new gradient is non-zero)."""
        with torch.no_grad():
            for p, part in zip(self.params, self.slices(flat)):
                if p.grad is not None:
                    p.grad.copy_(part)
                elif bool(part.ne(0).any()):
                    p.grad = part.to(p.dtype).clone()


def loss_scale(accelerator) -> float:
    """The factor the accumulated gradients carry (fp16 loss scaling; 1 otherwise): the
    loop unscales only at clipping or the step, after `after_backward`."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def loss_gradient(ctx, layout: GradientLayout, examples: list[Example], chunk_size: int,
                  objective: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None) -> torch.Tensor:
    """Flat fp32 gradient of the mean loss over `examples` (chunks weighted by their size),
    taken with torch.autograd.grad so no parameter's accumulated .grad is touched.
    `objective(model, batch)` replaces the loss (OGD's ground-truth logit).

    The model runs in eval mode (no dropout) on the unwrapped module (no DDP hooks): every
    process computes the same vector from the same examples, so the projected gradients,
    and the replicas, stay identical."""
    if not examples:
        return torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)
    objective = objective or ctx.loss_fn
    model = ctx.unwrapped_model
    was_training = model.training
    model.eval()
    total = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)
    try:
        for start in range(0, len(examples), chunk_size):
            part = examples[start:start + chunk_size]
            batch = ctx.collate(part)
            with ctx.accelerator.autocast():
                loss = objective(model, batch) * (len(part) / len(examples))
            grads = torch.autograd.grad(loss, layout.params, allow_unused=True)
            for acc, g in zip(layout.slices(total), grads):
                if g is not None:
                    acc.add_(g.float())
    finally:
        model.train(was_training)
    return total
