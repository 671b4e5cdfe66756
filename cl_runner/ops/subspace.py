"""Preserved subspaces per task: top-k singular directions of each weight matrix.

At the start of every task svd_orthogonal takes, for each target W (m x n), the top-k left
and right singular vectors U (m x k), V (n x k) of the current W. Same-shape matrices are
stacked and decomposed in one batched call (chunked to bound memory).

`method="randomized"` is a randomized range finder (Halko, Martinsson & Tropp 2011,
Algorithm 4.4 with power iterations, then an SVD of the small projected matrix); it
reports how good the captured subspace is in `SubspaceStats`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

# Bytes of fp32 input decomposed per batched SVD call (the workspace is a few times more).
_CHUNK_BYTES = 256 * 2**20


@dataclass
class SubspaceStats:
    """Quality of the bases, one entry per input matrix (floats)."""

    # ||W - U U^T W||_F / ||W||_F: energy outside the captured left subspace. For the
    # exact method this is the optimal rank-k value sqrt(sum_{i>k} s_i^2) / ||W||_F.
    residual_fro: list[float] = field(default_factory=list)
    # ||(I - U U^T) W||_2 / ||W||_2 (spectral; power-iteration estimate for randomized).
    residual_spectral: list[float] = field(default_factory=list)
    # residual_spectral over the best possible (s_{k+1} / s_1). Exact: 1. Randomized: an
    # upper bound (s_{k+1} estimated from the sketch, which underestimates it).
    spectral_suboptimality: list[float] = field(default_factory=list)
    method: str = "exact"
    # Per matrix: whether the randomized method ran (it falls back to exact for large k).
    randomized: list[bool] = field(default_factory=list)


def orthonormal_complement(basis: Tensor) -> Tensor:
    """Columns spanning the orthogonal complement of `basis` (..., d, k) -> (..., d, d-k),
    via a complete QR (the first k columns of Q span the basis, the rest complement it)."""
    d, k = basis.shape[-2], basis.shape[-1]
    if k == 0:
        eye = torch.eye(d, dtype=basis.dtype, device=basis.device)
        return eye.expand(*basis.shape[:-2], d, d).clone()
    q, _ = torch.linalg.qr(basis.to(torch.float64 if basis.dtype == torch.float64
                                    else torch.float32), mode="complete")
    return q[..., k:].to(basis.dtype).contiguous()


def _chunks(n_items: int, bytes_per_item: int) -> list[slice]:
    per = max(1, _CHUNK_BYTES // max(1, bytes_per_item))
    return [slice(i, min(n_items, i + per)) for i in range(0, n_items, per)]


def _exact(w: Tensor):
    """Batched SVD of w (B, m, n) -> U (B, m, *), s (B, r), V (B, n, *)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh.transpose(1, 2)


def _randomized(w: Tensor, k_max: int, oversample: int, power_iters: int,
                generator: Optional[torch.Generator]):
    """Randomized range finder with power iterations, re-orthonormalised each pass."""
    b, m, n = w.shape
    width = min(k_max + oversample, m, n)
    omega = torch.randn((b, n, width), generator=generator, dtype=w.dtype, device="cpu")
    q, _ = torch.linalg.qr(torch.bmm(w, omega.to(w.device)))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(torch.bmm(w.transpose(1, 2), q))
        q, _ = torch.linalg.qr(torch.bmm(w, z))
    small = torch.bmm(q.transpose(1, 2), w)  # (B, width, n)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return torch.bmm(q, ub), s, vh.transpose(1, 2)


def _spectral_norm_est(x: Tensor, iters: int = 8) -> Tensor:
    """Largest singular value of each x (B, m, n) by power iteration (an underestimate
    that converges quickly when s_1 stands out)."""
    v = torch.ones(x.shape[0], x.shape[2], 1, dtype=x.dtype, device=x.device)
    v = v / v.norm(dim=1, keepdim=True)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        u = torch.bmm(x, v)
        sigma = u.norm(dim=1).squeeze(-1)
        u = u / sigma.clamp_min(1e-30)[:, None, None]
        v = torch.bmm(x.transpose(1, 2), u)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return sigma


@torch.no_grad()
def top_k_bases(weights: Sequence[Tensor], ks: Sequence[int], method: str = "exact",
                oversample: int = 10, power_iters: int = 2,
                keep_complement: bool | str = False, *, out_dtype: Optional[torch.dtype] = None,
                return_stats: bool = False, seed: int = 0):
    """Top-k singular directions of each weight: a list of (U (m x k), V (n x k)).

    method: "exact" (batched torch.linalg.svd) or "randomized" (range finder with
    `oversample` extra columns and `power_iters` power iterations; where
    k + oversample > min(m, n) / 2 it is slower than exact and falls back to exact:
    `SubspaceStats.randomized` says which ran).
    keep_complement: True -> 4-tuples (U, V, U_c, V_c) with the orthonormal complements
    (m x (m-k), n x (n-k)); "auto" -> complements only for sides where k > dim/2 (where
    projecting through the complement is cheaper), None elsewhere.
    out_dtype: dtype of the bases (default: each weight's dtype); math is fp32 (fp64 kept).
    return_stats: also return a `SubspaceStats` (the randomized method's error).
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method={method!r}; use 'exact' or 'randomized'")
    if keep_complement not in (True, False, "auto"):
        raise ValueError(f"keep_complement={keep_complement!r}; use True, False or 'auto'")
    weights = list(weights)
    ks = [int(k) for k in ks]
    if len(ks) != len(weights):
        raise ValueError(f"got {len(weights)} weights and {len(ks)} ks; pass one k each")
    for i, (w, k) in enumerate(zip(weights, ks)):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}; pass 2-D matrices")
        if not 0 <= k <= min(w.shape):
            raise ValueError(f"ks[{i}]={k} for a {w.shape[0]}x{w.shape[1]} weight: k must be"
                             f" in [0, min(m, n)] = [0, {min(w.shape)}]")
    generator = torch.Generator().manual_seed(seed)
    results: list = [None] * len(weights)
    stats = SubspaceStats(residual_fro=[0.0] * len(weights),
                          residual_spectral=[0.0] * len(weights),
                          spectral_suboptimality=[1.0] * len(weights), method=method,
                          randomized=[False] * len(weights))

    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.device), []).append(i)
    for (shape, device), idx in groups.items():
        m, n = shape
        r = min(m, n)
        for part in _chunks(len(idx), 4 * m * n * 3):
            members = idx[part]
            k_max = max(ks[i] for i in members)
            dtype = torch.float64 if weights[members[0]].dtype == torch.float64 \
                else torch.float32
            w = torch.stack([weights[i].detach().to(dtype) for i in members])
            # The sketch only pays off while it is small: with k + oversample > r/2 the
            # QRs and power iterations cost more than an exact SVD (measured on CPU).
            randomized = method == "randomized" and 2 * (k_max + oversample) <= r
            if randomized:
                u, s, v = _randomized(w, k_max, oversample, power_iters, generator)
            else:
                u, s, v = _exact(w)
            w_norm_f = w.flatten(1).norm(dim=1).clamp_min(1e-30)
            for j, i in enumerate(members):
                k = ks[i]
                u_k, v_k = u[j, :, :k], v[j, :, :k]
                out = out_dtype or weights[i].dtype
                entry = [u_k.to(out).contiguous(), v_k.to(out).contiguous()]
                if keep_complement:
                    for basis, dim in ((u_k, m), (v_k, n)):
                        wanted = keep_complement is True or 2 * k > dim
                        entry.append(orthonormal_complement(basis).to(out)
                                     if wanted else None)
                results[i] = tuple(entry)
            for i in members:
                stats.randomized[i] = randomized
            if return_stats:
                _fill_stats(stats, w, u, s, members, ks, randomized, w_norm_f)
    return (results, stats) if return_stats else results


def _fill_stats(stats: SubspaceStats, w: Tensor, u: Tensor, s: Tensor,
                members: list[int], ks: list[int], randomized: bool, w_norm_f: Tensor):
    for j, i in enumerate(members):
        k = ks[i]
        u_k = u[j, :, :k]
        resid = w[j] - u_k @ (u_k.T @ w[j])
        stats.residual_fro[i] = float(resid.norm() / w_norm_f[j])
        if randomized:
            s1 = _spectral_norm_est(w[j:j + 1])[0]
            spec = _spectral_norm_est(resid[None])[0]
            # s_{k+1} of the sketch <= the true s_{k+1}, so the ratio is an upper bound.
            s_next = s[j, k] if k < s.shape[1] else s.new_zeros(())
        else:
            s1 = s[j, 0]
            spec = s[j, k] if k < s.shape[1] else s.new_zeros(())
            s_next = spec
        stats.residual_spectral[i] = float(spec / s1.clamp_min(1e-30))
        stats.spectral_suboptimality[i] = float(spec / s_next) if s_next > 0 else 1.0
