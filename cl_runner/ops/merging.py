"""Continual model merging math: OPCM's projection and scaling, TIES' trim/elect/merge.

Pure functions on tensors (and on name -> tensor dicts where a rule spans the whole model);
the strategies in `cl_runner/strategies/{opcm,continual_task_arithmetic,continual_ties}.py`
own the life cycle. Every formula follows Tang et al. 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging" (arXiv
2501.09522, Sec. 4: orthogonal projection and adaptive scaling) as implemented in the
authors' reference code, FusionBench `fusion_bench/method/opcm/opcm.py`
(`merge_linear_weights`, `merge_other_parameters`, the lambda_t update in `run`), and TIES
(Yadav et al. 2023, arXiv 2306.01708, Sec. 3) as in FusionBench
`fusion_bench/method/ties_merging/ties_merging_utils.py`, used by the continual variant
`fusion_bench/method/opcm/ties_merging.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

MERGE_FUNCS = ("sum", "mean", "max")


# ------------------------------------------------------------------------------- OPCM
def split_rank(singular_values: Tensor, alpha: float) -> int:
    """How many leading singular directions of the merged update count as its principal
    subspace: the 0-based index of the first singular value at which the cumulative share
    sum_{i<=k} s_i / sum_i s_i exceeds alpha (FusionBench: `(cumsum / sum > alpha).argmax()`).
    0 when the update is zero (or no share exceeds alpha)."""
    s = singular_values.double()
    total = float(s.sum())
    if not total > 0:
        return 0
    above = (s.cumsum(0) / total) > alpha
    return int(above.nonzero()[0, 0]) if bool(above.any()) else 0


@dataclass(frozen=True)
class ProjectionInfo:
    split_rank: int  # r: the principal block U_r, V_r of the merged update
    rank: int  # min(m, n)
    projected_fraction: float  # share of ||tau||_F^2 removed by the projection (0..1)


def opcm_project(task_update: Tensor, merged_update: Tensor, alpha: float,
                 zero_diagonal: bool = True) -> tuple[Tensor, ProjectionInfo]:
    """OPCM's projection of one weight matrix's task vector tau (m x n) away from the merged
    update so far, M = U S V^T (thin SVD, k = min(m, n)):

        C = U^T tau V  (k x k);   C[:r, :r] <- 0;   C_ii <- 0 for all i (zero_diagonal);
        P(tau) = tau - U (C_removed) V^T,

    i.e. tau loses its component in the principal block span{u_i v_j^T : i, j < r} (r =
    split_rank(S, alpha)) and, with zero_diagonal, along every u_i v_i^T. Same result as
    FusionBench's full-SVD form U (U^T tau V with those entries zeroed) V^T, whose extra
    columns only complete the basis. fp32 (fp64 in, fp64 out) math."""
    work = torch.float64 if task_update.dtype == torch.float64 else torch.float32
    tau = task_update.to(work)
    m, n = tau.shape
    k = min(m, n)
    u, s, vh = torch.linalg.svd(merged_update.to(work), full_matrices=False)
    r = split_rank(s, alpha)
    coeff = u.T @ tau @ vh.T  # (k, k): tau in the merged update's singular basis
    removed = torch.zeros_like(coeff)
    removed[:r, :r] = coeff[:r, :r]
    if zero_diagonal:
        removed.diagonal().copy_(coeff.diagonal())
    projected = tau - u @ removed @ vh
    total = float(tau.pow(2).sum())
    # ||tau||^2 = ||P tau||^2 + ||removed||^2 (an orthogonal projection in the Frobenius product)
    fraction = float(removed.pow(2).sum()) / total if total > 0 else 0.0
    return projected, ProjectionInfo(r, k, min(1.0, fraction))


def opcm_lambda(running_sum_norm: float, mean_task_norm: float) -> float:
    """OPCM's adaptive scale lambda_t = ||sum_{i<=t} P(tau_i)|| / mean_{i<=t} ||tau_i||, so that
    the merged update sum / lambda_t keeps the mean task vector norm (FusionBench: lambda_t
    *= task_vector_norm / avg_task_vector_norm). 1 when either norm is 0 (nothing to scale)."""
    if not (running_sum_norm > 0 and mean_task_norm > 0):
        return 1.0
    return running_sum_norm / mean_task_norm


@torch.no_grad()
def opcm_merge_(merged: dict[str, Tensor], task_vector: Mapping[str, Tensor], previous_lambda: float,
                mean_task_norm: float, matrices: Iterable[str], alpha: float,
                zero_diagonal: bool = True) -> tuple[float, dict[str, ProjectionInfo]]:
    """One OPCM merge, in place on `merged` (the merged update theta_merged - theta_0, already
    divided by `previous_lambda`):

        S = previous_lambda * merged + P(tau)   (P per matrix in `matrices`; identity else)
        lambda_t = opcm_lambda(||S||, mean_task_norm);   merged <- S / lambda_t

    (FusionBench `merge_linear_weights` / `merge_other_parameters`, then the rescale in
    `run`). ||.|| is over every entry of every tensor. Returns (lambda_t, info per matrix)."""
    matrices = set(matrices)
    infos: dict[str, ProjectionInfo] = {}
    squared = 0.0
    for name, m in merged.items():
        tau = task_vector[name].to(device=m.device, dtype=m.dtype)
        if name in matrices:
            tau, infos[name] = opcm_project(tau, m, alpha, zero_diagonal)
            tau = tau.to(m.dtype)
        m.mul_(previous_lambda).add_(tau)
        squared += float(m.double().pow(2).sum())
    lam = opcm_lambda(math.sqrt(squared), mean_task_norm)
    for m in merged.values():
        m.div_(lam)
    return lam, infos


def vector_norm(tensors: Iterable[Tensor]) -> float:
    """The L2 norm of all entries of `tensors` taken as one vector (fp64 accumulation)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


# ------------------------------------------------------------------------------- TIES
def check_keep_percent(keep_percent: float) -> None:
    if not 1.0 < keep_percent <= 100.0:
        raise ValueError(f"keep percent {keep_percent!r} must be in (1, 100]")


def trim_threshold(values: Tensor, keep_percent: float) -> float:
    """TIES trim: the magnitude at or above which an entry of one task vector (all its
    entries as one vector) is kept. FusionBench `topk_values_mask`: with d entries and
    K = keep_percent / 100, the (d - int(d K))-th smallest |x|; entries with |x| >= it stay
    (about K d of them). keep_percent 100 keeps everything."""
    check_keep_percent(keep_percent)
    flat = values.reshape(-1).abs()
    d = flat.numel()
    kth = d - int(d * keep_percent / 100.0)
    if kth <= 0 or d == 0:
        return 0.0
    return float(flat.kthvalue(kth).values)


def trim(values: Tensor, threshold: float) -> Tensor:
    return values * (values.abs() >= threshold)


def elect_sign(trimmed_sum: Tensor, majority: float) -> Tensor:
    """TIES elect: sign of the summed trimmed vectors per entry; entries whose sum is 0 take
    `majority` (FusionBench `resolve_sign` / `resolve_zero_signs`: the sign of the sum of all
    entries' signs, over the whole model)."""
    sign = torch.sign(trimmed_sum)
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(rows: Tensor, sign: Tensor, merge_func: str = "sum") -> Tensor:
    """TIES disjoint merge of trimmed rows (n, ...) that agree with the elected sign:
    `sum` (FusionBench's continual default), `mean` (over the agreeing non-zero entries;
    the TIES paper), or `max` (largest magnitude, with the elected sign)."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func {merge_func!r}: choose one of {', '.join(MERGE_FUNCS)}")
    agree = torch.where(sign.unsqueeze(0) > 0, rows > 0, rows < 0)
    selected = rows * agree
    if merge_func == "sum":
        return selected.sum(0)
    if merge_func == "mean":
        return selected.sum(0) / (selected != 0).sum(0).clamp(min=1).to(rows.dtype)
    return selected.abs().max(0).values * sign


def ties_merge(rows: Tensor, keep_percent: float, merge_func: str = "sum") -> Tensor:
    """TIES-merging of task vectors given as rows (n, d): trim each row to its top
    keep_percent entries by magnitude, elect a sign per entry, disjoint-merge."""
    trimmed = torch.stack([trim(r, trim_threshold(r, keep_percent)) for r in rows])
    summed = trimmed.sum(0)
    majority = float(torch.sign(torch.sign(summed).sum()))
    return disjoint_merge(trimmed, elect_sign(summed, majority), merge_func)


@torch.no_grad()
def ties_merge_dicts(vectors: list[Mapping[str, Tensor]], keep_percent: float,
                     merge_func: str = "sum") -> tuple[dict[str, Tensor], list[float]]:
    """`ties_merge` over task vectors given as name -> tensor dicts, each taken as one
    vector over all its tensors (FusionBench flattens the whole state dict), without
    concatenating the merged result. Returns (merged per name, kept share per vector)."""
    names = list(vectors[0])
    thresholds = [trim_threshold(torch.cat([v[n].reshape(-1) for n in names]), keep_percent) for v in vectors]
    kept = [0] * len(vectors)
    total = sum(vectors[0][n].numel() for n in names)
    sign_sum = 0.0
    for n in names:  # first pass: the model-wide majority sign (for entries whose sum is 0)
        summed = sum(trim(v[n], thr) for v, thr in zip(vectors, thresholds))
        sign_sum += float(torch.sign(summed).sum())
    majority = float(math.copysign(1.0, sign_sum)) if sign_sum != 0 else 0.0
    out: dict[str, Tensor] = {}
    for n in names:
        rows = torch.stack([trim(v[n], thr) for v, thr in zip(vectors, thresholds)])
        for i in range(len(vectors)):
            kept[i] += int((rows[i] != 0).sum())
        out[n] = disjoint_merge(rows, elect_sign(rows.sum(0), majority), merge_func)
    return out, [k / total if total else 0.0 for k in kept]
