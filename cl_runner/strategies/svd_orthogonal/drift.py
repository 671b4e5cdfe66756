"""How far a task's update left svd_orthogonal's allowed set (`strategy.measure_drift`).

For the task's update ΔW = W_end − W_start of one target and its preserved bases U (m x k_l),
V (n x k_r), both relative to ||ΔW||_F:

- block = ||Uᵀ ΔW V||_F, what every projection point keeps at zero in exact arithmetic
  except `projection_point: gradient` under AdamW;
- forbidden = ||(I − P) ΔW||_F, the part of ΔW the projection P forbids. high_block: the
  block itself. two_sided: UUᵀΔW + ΔWVVᵀ − UUᵀΔWVVᵀ, three mutually orthogonal pieces,
  so forbidden² = ||UᵀΔW||² + ||ΔW V||² − ||UᵀΔWV||² (no m x m or n x n projector is formed).

fp32 products: values near 1e-6 are zero to rounding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def update_drift(delta: Tensor, u: Tensor, v: Tensor, mode: str = "two_sided") -> tuple[float, float]:
    """(block, forbidden) of one update, each relative to ||delta||_F (0, 0 for a zero update)."""
    d = delta.float()
    total = float(d.norm())
    if total == 0.0:
        return 0.0, 0.0
    u, v = u.to(d), v.to(d)
    left = u.T @ d  # k_l x n
    block = float((left @ v).norm())
    if mode == "high_block":
        return block / total, block / total
    right = d @ v  # m x k_r
    squared = float(left.norm()) ** 2 + float(right.norm()) ** 2 - block ** 2
    return block / total, math.sqrt(max(squared, 0.0)) / total
