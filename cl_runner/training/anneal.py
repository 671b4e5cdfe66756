"""Pieces of the anneal of lr_schedule's infinite schedule that are not the step itself:
the optimizer it steps (a copy of the task's, moments included) and the accelerate
bookkeeping around it. The steps run through the loop's `_optimizer_step`."""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections import defaultdict
from typing import Any, Iterator

import torch


def optimizer_copy(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of the same class over the same parameters, with the same param
    groups (lr, initial_lr, betas, ...) and a clone of every per-parameter state (AdamW's
    step, exp_avg, exp_avg_sq): stepping the copy leaves `optimizer` untouched."""
    groups = [dict(g, params=list(g["params"])) for g in optimizer.param_groups]
    # Constructor keywords only: `defaults` may hold keys the constructor does not take
    # (AdamW's decoupled_weight_decay); the groups carry every key anyway.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    clone = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    state: defaultdict = defaultdict(dict)
    for param, values in optimizer.state.items():
        state[param] = {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in values.items()}
    clone.state = state
    return clone


@contextlib.contextmanager
def prepared_alone(accelerator: Any, optimizer: torch.optim.Optimizer) -> Iterator[Any]:
    """`optimizer` prepared by accelerate (fp16 loss scaling) and, while the context lasts,
    the only optimizer it knows: its clipping unscales the gradients of every registered
    optimizer, and the training one must not unscale the anneal's gradients a second time.
    On exit accelerate forgets the copy again."""
    registered = accelerator._optimizers
    accelerator._optimizers = []
    try:
        yield accelerator.prepare_optimizer(optimizer, device_placement=False)
    finally:
        accelerator._optimizers = registered
