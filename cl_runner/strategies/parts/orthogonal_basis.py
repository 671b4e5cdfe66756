"""An orthonormal basis of stored gradient directions, grown by Gram-Schmidt, and the
projection of a gradient onto its orthogonal complement (OGD, Farajtabar et al. 2020).

The basis is kept as blocks (one k_t x P matrix per task, rows orthonormal across all
blocks), so growing it never copies the older rows.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def project_out(g: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """g - sum_i <g, u_i> u_i over every row u_i of the blocks (OGD's Eq. 4 / Alg. 1)."""
    for B in blocks:
        if B.shape[0]:
            g = g - B.T @ (B @ g)
    return g


def orthonormal_residual(v: torch.Tensor, blocks: list[torch.Tensor], tol: float) -> Optional[torch.Tensor]:
    """v with its components along the basis removed, normalised; None when what is left
    is at most `tol` * |v| (v lies in the span, up to rounding) or v is zero. Classical
    Gram-Schmidt applied twice ("twice is enough"): one pass leaves rounding errors of the
    order of eps * |v| / |r| along the basis, which the second removes."""
    norm = torch.linalg.vector_norm(v)
    if not bool(norm > 0):
        return None
    r = project_out(project_out(v, blocks), blocks)
    left = torch.linalg.vector_norm(r)
    if not bool(left > tol * norm):
        return None
    return r / left


def extend_basis(blocks: list[torch.Tensor], vectors: Iterable[torch.Tensor], capacity: int, size: int,
                 tol: float) -> torch.Tensor:
    """A new block: the orthonormalised residuals of up to `capacity` vectors (length
    `size`) against `blocks` and against each other, in order; dependent or zero vectors
    are dropped. Vectors may come from a generator: only the block is held, not the inputs."""
    rows: Optional[torch.Tensor] = None
    k = 0
    for v in vectors:
        if k >= capacity:
            break
        if rows is None:
            rows = torch.empty(capacity, size, dtype=torch.float32, device=v.device)
        u = orthonormal_residual(v.float(), blocks + [rows[:k]], tol)
        if u is not None:
            rows[k] = u
            k += 1
    if rows is None:
        return torch.empty(0, size, dtype=torch.float32)
    return rows[:k].clone()
