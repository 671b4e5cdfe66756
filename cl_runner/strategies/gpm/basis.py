"""Gradient Projection Memory's basis update (Saha et al. 2021, ICLR, "Gradient
Projection Memory for Continual Learning", Sec. 4, Eqs. 5-9; code github.com/sahagobinda/GPM).

For one layer y = W x with representation matrix R = [x_1 ... x_N] (in x N) of a finished
task and the stored orthonormal basis M (in x k) of earlier tasks' inputs:

    R_hat = R - M M^T R                      (Eq. 8: the part of R not yet in span(M))
    R_hat = U diag(sigma) V^T                (SVD)
    r = the fewest with ||M M^T R||^2 + sum_{i<=r} sigma_i^2 >= eps * ||R||^2   (Eq. 9;
        Eq. 5 at the first task, M empty)
    M <- [M, U_r]

We work from the Gram matrix C = R R^T (in x in), summed over token positions as they are
collected, instead of R itself (N = examples x tokens columns): the left singular vectors
and sigma^2 of R_hat are the eigenvectors and eigenvalues of R_hat R_hat^T = P C P with
P = I - M M^T, ||R||^2 = tr C and ||M M^T R||^2 = tr(M^T C M). Exact, and every position
counts (no subsampling), at in^2 numbers per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

VARIANTS = ("paper", "authors")
# Eigenvalues at or below this fraction of ||R||^2 are numerical zeros, directions R does not
# reach (the Gram matrix is summed in fp32: its rounding alone leaves eigenvalues ~1e-7 of tr C).
_ZERO_ENERGY = 1e-6


@dataclass(frozen=True)
class BasisUpdate:
    basis: Tensor  # the new M (in x k'), orthonormal columns, float64
    added: int  # r
    energy_before: float  # ||M M^T R||^2 / ||R||^2 with the old M
    energy_after: float  # the same with the new M


def threshold_at(t: int, threshold: float, step: float) -> float:
    """eps for the basis update after task t (0-based): threshold + t * step, at most 1
    (the paper's Sec. 5: 0.97 + 0.003 per task; main_cifar100.py line 297)."""
    return min(1.0, threshold + t * step)


def energy_rank(energies: Tensor, total: float, kept: float, threshold: float, variant: str = "paper") -> int:
    """The number of new directions r (Eq. 9): the fewest leading `energies` (sigma_i^2 of
    R_hat, descending) with kept + sum_{i<=r} sigma_i^2 >= threshold * total; all of them
    when even that falls short.

    variant="authors" with nothing kept yet (the first task) counts, as the authors'
    update_GPM does (`np.sum(np.cumsum(ratio) < threshold)`), the leading directions whose
    cumulative energy stays below the threshold: one fewer than Eq. 5 asks for."""
    if total <= 0:
        return 0
    need = threshold * total
    reached = kept + torch.cumsum(energies.double(), 0)
    if variant == "authors" and kept == 0:
        return int((reached < need).sum())
    if kept >= need:
        return 0
    short = int((reached < need).sum())  # leading sums still below the target
    return min(short + 1, energies.numel())


def extend_basis(gram: Tensor, basis: Optional[Tensor], threshold: float, variant: str = "paper") -> BasisUpdate:
    """M after one task (the module docstring), from C = R R^T (in x in) and the old M
    (in x k, or None). All in float64."""
    c = gram.double()
    c = (c + c.T) / 2
    dim = c.shape[0]
    total = float(torch.trace(c))
    old = basis.double() if basis is not None and basis.shape[1] else c.new_zeros((dim, 0))
    kept = float(torch.trace(old.T @ c @ old)) if old.shape[1] else 0.0
    if total <= 0:
        return BasisUpdate(old, 0, 0.0, 0.0)
    residual = c
    if old.shape[1]:
        projector = torch.eye(dim, dtype=c.dtype, device=c.device) - old @ old.T
        residual = projector @ c @ projector
        residual = (residual + residual.T) / 2
    values, vectors = torch.linalg.eigh(residual)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    usable = int((values > _ZERO_ENERGY * total).sum())
    r = min(energy_rank(values[:usable], total, kept, threshold, variant), dim - old.shape[1])
    if r == 0:
        return BasisUpdate(old, 0, kept / total, kept / total)
    new = vectors[:, :r]
    if old.shape[1]:  # keep the new directions exactly off span(M), then orthonormal
        new = new - old @ (old.T @ new)
    new, _ = torch.linalg.qr(new)
    merged = torch.cat([old, new], dim=1)
    after = float(torch.trace(merged.T @ c @ merged))
    return BasisUpdate(merged, r, kept / total, after / total)
