"""How many singular directions svd_orthogonal preserves per target matrix (k_l).

- Adaptive (Sculpting Subspaces, Nayak et al. 2025, Sec. 3): layer importance
  I_l = mean over N inputs of cos(x_l, y_l) between the layer's input and output
  activations (first min(m, n) coordinates when the matrix is not square), min-max
  normalised across layers to Î_l ∈ [0, 1] (the paper's I_l ∈ [0, 1]); preserved fraction
  r_l = mrr + Î_l (trr − mrr), so mrr (the paper's minimum) ≤ r_l ≤ trr (its target);
  k_l = round(r_l · min(m, n)) clamped to [0, min(m, n) − 1]. `normalise: mean` keeps an
  earlier reading (I_l / mean I), which lets r_l leave [mrr, trr] on small or mixed-sign
  importances (LLM attention): below mrr when I_l < 0, up to a near-frozen layer when
  I_l ≫ mean I.
- Ratio (Red Hat's mini_trainer OSFT): k = floor(min(m, n) · (1 − unfreeze_ratio)),
  clamped the same way.
- Schedule (the paper's T5 runs): every preserved fraction (mrr, trr, or 1 − unfreeze_ratio)
  grows by `schedule_step` per task, capped at `schedule_cap`.

Token positions (our choice, the paper only says "mean over inputs"): an example's score
is the mean cosine over all positions of that example the layer sees (never a padding
position), and I_l is the mean of the N example scores, so long and short examples weigh
the same. The forwards are batched like evaluation (no gradients, longest first) and the
padding is masked out of each example's mean, which gives the batch-of-one scores up to
float rounding (`layer_importances`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_runner.strategies.parts.rounding import round_half_up

_EPS = 1e-9  # guards floor() against 0.7 * 10 = 6.9999999...

_round_half_up = round_half_up  # the name the rank code and the memory estimate use


def clamp_rank(k: int, dim: int) -> int:
    """Keep at least one trainable direction: k in [0, dim − 1]."""
    return max(0, min(int(k), dim - 1))


NORMALISATIONS = ("minmax", "mean")


def normalised_importances(importances: Sequence[float], normalise: str = "minmax") -> list[float]:
    """Layer importances mapped to the weights of r_l = mrr + w_l (trr − mrr).

    minmax (default; Sculpting Subspaces, Nayak et al. 2025, arXiv 2504.07097, Sec. 3,
    I_l ∈ [0, 1]): w_l = (I_l − min I) / (max I − min I) over the finite importances, so the
    least important layer keeps mrr, the most important trr, and the order is kept. All
    finite importances equal (no signal to rank layers by), or none finite: every layer gets
    w = 1 (r = trr, the target fraction; the earlier code's choice for a degenerate mean).
    A non-finite importance (NaN or ±inf from a layer with zero activations or an fp
    overflow) gets w = 1 as well: no evidence that the layer may move more.

    mean (an earlier reading, kept as a labelled option): w_l = I_l / mean I; a non-positive
    or non-finite mean gives every layer w = 1. Not bounded: r_l can leave [mrr, trr]."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"bad importance normalisation {normalise!r}; use one of {', '.join(NORMALISATIONS)}")
    values = [float(i) for i in importances]
    if normalise == "mean":
        mean = sum(values) / len(values) if values else 0.0
        if not math.isfinite(mean) or mean <= 0:
            return [1.0] * len(values)
        return [i / mean for i in values]
    finite = [i for i in values if math.isfinite(i)]
    if not finite:
        return [1.0] * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    if not span > 0 or not math.isfinite(span):  # all equal (or a span that overflows)
        return [1.0] * len(values)
    return [min(1.0, max(0.0, (i - lo) / span)) if math.isfinite(i) else 1.0 for i in values]


def adaptive_ranks(importances: Sequence[float], dims: Sequence[int], mrr: float,
                   trr: float, normalise: str = "minmax") -> list[int]:
    """k_l = round((mrr + Î_l (trr − mrr)) · dim_l), clamped to [0, dim_l − 1].

    `importances` are the raw mean cosines I_l, `dims` the min(m, n) of each matrix, Î_l
    their normalisation (`normalised_importances`: min-max to [0, 1] by default, so every
    preserved fraction lies in [mrr, trr] and a more important layer never keeps fewer
    directions; all equal or non-finite: trr). Rounding is half-up (2.5 -> 3)."""
    if len(importances) != len(dims):
        raise ValueError(f"got {len(importances)} importances and {len(dims)} dims")
    if not importances:
        return []
    ks = []
    for imp, dim in zip(normalised_importances(importances, normalise), dims):
        r = mrr + imp * (trr - mrr)
        ks.append(clamp_rank(_round_half_up(r * dim), dim))
    return ks


FRACTION_OF = ("min_dim", "max_dim")


def ratio_ranks(dims: Sequence[int], preserved_fraction: float,
                sizes: Optional[Sequence[int]] = None) -> list[int]:
    """k = floor(size · preserved_fraction), clamped to [0, dim − 1], where dim = min(m, n)
    and size = dim (mini_trainer's rule, preserved_fraction = 1 − unfreeze_ratio) or, given
    `sizes`, max(m, n) (the Sculpting Subspaces code's top_k = floor(max(W.shape) · scale))."""
    sizes = dims if sizes is None else sizes
    return [clamp_rank(math.floor(size * preserved_fraction + _EPS), dim) for dim, size in zip(dims, sizes)]


def scheduled_fraction(fraction: float, t: int, step: float, cap: float) -> float:
    """The preserved fraction at task t: fraction + t · step, capped (step 0: unchanged)."""
    if step == 0:
        return fraction
    return min(cap, fraction + t * step)


def importance_order(examples: Sequence[Any]) -> list[int]:
    """Indices of `examples`, longest first (characters of prompt and answer: the collated
    row holds both), so each batch pads little; ties keep their order."""
    return sorted(range(len(examples)), key=lambda i: -(len(examples[i].prompt) + len(examples[i].answer)))


@torch.no_grad()
def layer_importances(model: nn.Module, modules: Sequence[nn.Module], examples: Sequence[Any],
                      collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                      forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
                      autocast: Callable[[], Any], batch_size: int = 1) -> list[float]:
    """Mean cos(x, y) between each module's input and output over `examples` (see the
    module docstring), in eval mode, without gradients.

    Batched like evaluation: longest first, `batch_size` examples a forward. A padded
    position never enters a mean: each example's score is its masked mean over the
    positions its attention_mask marks, which is the batch-of-one score up to float
    rounding. A module whose activations do not line up with the mask (a batch without an
    attention_mask, or positions of another length, as a seq2seq decoder's) makes that
    batch run again one example at a time. I_l is the mean of the example scores, summed
    in the examples' own order (so `batch_size=1` reproduces the per-example forwards)."""
    n_modules = len(modules)
    # scores[i][e]: example e's score for module i (None: the module never saw it)
    scores: list[list[Optional[float]]] = [[None] * len(examples) for _ in modules]
    calls: list[list[torch.Tensor]] = [[] for _ in modules]
    state = {"mask": None, "size": 1, "aligned": True}

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                return
            d = min(x.shape[-1], y.shape[-1])
            cos = F.cosine_similarity(x[..., :d].float(), y[..., :d].float(), dim=-1)
            if state["size"] == 1:
                calls[i].append(cos.mean().reshape(1))
                return
            mask = state["mask"]
            if mask is None or tuple(cos.shape) != tuple(mask.shape):
                state["aligned"] = False
                return
            calls[i].append((cos * mask).sum(-1) / mask.sum(-1).clamp_min(1.0))
        return hook

    def score(positions: list[int]) -> bool:
        """Run one batch; False (nothing recorded) when a module's positions did not line up."""
        batch = collate([examples[e] for e in positions])
        mask = batch.get("attention_mask")
        state.update(size=len(positions), aligned=True,
                     mask=None if mask is None else mask.to(torch.float32))
        for c in calls:
            c.clear()
        with autocast():
            forward(model, batch)
        if not state["aligned"]:
            return False
        # One device-to-host copy per batch: (module, example) means over the module's calls
        # (a module called several times in one forward counts once per example).
        seen = [i for i in range(n_modules) if calls[i]]
        if seen:
            means = torch.stack([torch.stack(calls[i]).mean(0) for i in seen]).cpu().tolist()
            for i, row in zip(seen, means):
                for e, value in zip(positions, row):
                    scores[i][e] = value
        return True

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        order = importance_order(examples)
        size = max(1, int(batch_size))
        for start in range(0, len(order), size):
            positions = order[start:start + size]
            if not score(positions):
                for e in positions:
                    score([e])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for per_example in scores:
        present = [v for v in per_example if v is not None]
        out.append(sum(present) / len(present) if present else 0.0)
    return out
