"""MbPA++'s pieces (d'Autume et al. 2019, "Episodic Memory in Lifelong Language Learning"):
neighbour retrieval by Euclidean distance, key vectors from a frozen encoder, the sparse
replay schedule, and local adaptation with its L2 pull toward the stored weights (Eq. 3).
Pure functions on tensors; the strategy (`strategies/mbpa.py`) wires them to the loop.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def nearest_neighbours(keys: torch.Tensor, query: torch.Tensor, k: int, distance: str = "euclidean") -> list[int]:
    """Indices of the k rows of `keys` (n x d) nearest `query` (d, or m x d: the memories
    with the least summed squared distance to all m queries, which are the ones nearest
    their mean). `euclidean` as the paper; `dot`: the largest inner product, as TRACE
    ranks them. Ties go to the earlier memory, so every process and a resumed run pick the
    same ones. Nearest first."""
    if query.dim() == 2:
        query = query.mean(0)
    if distance == "dot":
        dist = -(keys.double() @ query.double())
    else:
        dist = (keys.double() - query.double()).pow(2).sum(1)
    # A stable sort keeps equal distances in memory order.
    order = torch.sort(dist, stable=True).indices
    return order[: min(k, keys.shape[0])].tolist()


def pooled_keys(encoder: nn.Module, inputs: Batch, kind: str) -> torch.Tensor:
    """Mean of the last hidden states over the input's tokens (fp32, on the CPU): one key
    per example. The encoder side of a seq2seq model; the whole model otherwise. Autocast off:
    memory keys (after a task) and queries (inside the evaluation's autocast) are computed alike."""
    device = inputs["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device_type=device, enabled=False):
        if kind == "seq2seq":
            hidden = encoder.get_encoder()(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).last_hidden_state
        else:
            hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return pooled.float().cpu()


def replay_steps_after(step: int, examples_per_step: int, every: int, replay_examples: int) -> int:
    """Replay optimizer steps after new-data step `step` (1-based) of a task: one replay of
    `replay_examples` each time the task's count of new examples passes a multiple of
    `every` (the paper's 100 after every 10,000), rounded up to whole steps of
    `examples_per_step`. 0 when `every` or `replay_examples` is 0."""
    if every <= 0 or replay_examples <= 0:
        return 0
    crossings = step * examples_per_step // every - (step - 1) * examples_per_step // every
    return math.ceil(crossings * replay_examples / examples_per_step)


def l2_pull(params: list[nn.Parameter], stored: list[torch.Tensor]) -> torch.Tensor:
    """sum ||theta - theta_stored||^2 over the adapted parameters (Eq. 3's regulariser)."""
    return sum(((p - s.to(p.dtype)) ** 2).sum() for p, s in zip(params, stored))


def adapt_locally(model: nn.Module, params: list[nn.Parameter], loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
                  batch: Batch, steps: int, lr: float, l2: float) -> list[torch.Tensor]:
    """`steps` plain gradient steps on `batch` (the neighbours) of loss + l2 * pull toward
    the weights held on entry; returns those weights (to give back to `restore`). The
    gradients go through torch.autograd.grad, so no parameter's .grad is touched."""
    stored = [p.detach().clone() for p in params]
    try:
        with torch.enable_grad():
            for _ in range(steps):
                objective = loss_fn(model, batch)
                if l2:
                    objective = objective + l2 * l2_pull(params, stored)
                grads = torch.autograd.grad(objective, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g.to(p.dtype))
    except BaseException:  # out of memory, an interrupt: the stored weights come back first
        restore(params, stored)
        raise
    return stored


def restore(params: list[nn.Parameter], stored: list[torch.Tensor]) -> None:
    """Puts the stored values back, bit for bit."""
    with torch.no_grad():
        for p, s in zip(params, stored):
            p.copy_(s)


def key_inputs(collate: Any, examples: list, kind: str) -> Batch:
    """The tokens a key is computed from: the prompt alone (no answer), as at test time."""
    if kind == "classifier":
        return {k: v for k, v in collate(examples).items() if k not in ("labels", "label_mask")}
    return collate.prompts(examples, room=0)
