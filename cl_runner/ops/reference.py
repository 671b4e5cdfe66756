"""The `torch` backend: gradient projection in plain PyTorch (the reference).

Every other backend is held to these functions in the tests. The math (svd_orthogonal,
the Sculpting Subspaces / OSFT projection), for a gradient G (m x n) and preserved bases
U (m x k) and V (n x k) with orthonormal columns:

- ``two_sided``:  G <- (I - U U^T) G (I - V V^T)
- ``high_block``: G <- G - U (U^T G V) V^T

A side may instead be given by the orthonormal *complement* of its preserved basis
(U_c, m x (m - k)), since (I - U U^T) = U_c U_c^T: for k > m/2 that costs
4 m n (m - k) flops instead of 4 m n k. A side given as None is the identity: no
projection on that side for ``two_sided``, and the whole side preserved for
``high_block`` (G <- G - U U^T G).

Stacked tensors: grads (B, m, n), left (B, m, k_l), right (B, n, k_r). Zero columns in a
basis (padding to a common k within a stack) contribute nothing, so padding is exact.
Math runs in fp32 (fp64 stays fp64); bf16/fp16 gradients are converted once per call and
written back.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

MODES = ("two_sided", "high_block")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 gradients, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply_left_(work: Tensor, left: Tensor, complement: bool) -> None:
    """work <- (I - U U^T) work, in place; `left` is U, or U_c when `complement`."""
    t = torch.bmm(left.transpose(1, 2), work)  # (B, k, n)
    if complement:
        torch.bmm(left, t, out=work)  # U_c (U_c^T G)
    else:
        work.baddbmm_(left, t, alpha=-1.0)  # G - U (U^T G)


def _apply_right_(work: Tensor, right: Tensor, complement: bool) -> None:
    """work <- work (I - V V^T), in place; `right` is V, or V_c when `complement`."""
    t = torch.bmm(work, right)  # (B, m, k)
    if complement:
        torch.bmm(t, right.transpose(1, 2), out=work)
    else:
        work.baddbmm_(t, right.transpose(1, 2), alpha=-1.0)


def _project_two_sided_(work: Tensor, left: Optional[Tensor], right: Optional[Tensor],
                        left_complement: bool, right_complement: bool) -> None:
    """work <- (I - U U^T) work (I - V V^T). A side stored as a complement is contracted
    first (work V_c is only m x (n - k)), and the other side is projected on that small
    product: 4 m n k_c + 4 m k_other k_c flops instead of 4 m n (k_c + k_other)."""
    right_first = right is not None and right_complement
    left_first = left is not None and left_complement
    if right_first and left_first:  # both complements: contract the cheaper side first
        m, n = work.shape[1], work.shape[2]
        kl, kr = left.shape[2], right.shape[2]
        right_first = m * n * kr + m * kl * kr <= m * n * kl + n * kl * kr
        left_first = not right_first
    if right_first:
        t = torch.bmm(work, right)  # (B, m, k_c)
        if left is not None:
            _apply_left_(t, left, left_complement)
        torch.bmm(t, right.transpose(1, 2), out=work)
    elif left_first:
        t = torch.bmm(left.transpose(1, 2), work)  # (B, k_c, n)
        if right is not None:
            _apply_right_(t, right, right_complement)
        torch.bmm(left, t, out=work)
    else:
        if left is not None:
            _apply_left_(work, left, False)
        if right is not None:
            _apply_right_(work, right, False)


def projection_flops(m: int, n: int, left_width: Optional[int], right_width: Optional[int],
                     left_complement: bool = False, right_complement: bool = False,
                     mode: str = "two_sided") -> int:
    """Flops this module executes for one m x n matrix (widths = stored basis columns,
    None = no basis): what the benchmarks divide by."""
    kl, kr = left_width, right_width
    if mode == "high_block":
        if kl is None or kr is None:
            k = kl if kr is None else kr
            return 0 if k is None else 4 * m * n * k
        return 4 * m * n * kr + 4 * m * kl * kr  # (the complement variants cost more)
    if right_complement and kr is not None and (
            not (left_complement and kl is not None)
            or m * n * kr + m * kl * kr <= m * n * kl + n * kl * kr):
        return 4 * m * n * kr + (0 if kl is None else 4 * m * kl * kr)
    if left_complement and kl is not None:
        return 4 * m * n * kl + (0 if kr is None else 4 * n * kl * kr)
    return 4 * m * n * ((kl or 0) + (kr or 0))


def _left_preserved(x: Tensor, left: Tensor, complement: bool) -> Tensor:
    """U U^T x (a new tensor); with the complement, x - U_c U_c^T x."""
    t = torch.bmm(left, torch.bmm(left.transpose(1, 2), x))
    return x - t if complement else t


def _project_high_block_(work: Tensor, left: Optional[Tensor], right: Optional[Tensor],
                         left_complement: bool, right_complement: bool) -> None:
    """work <- work - P_U work P_V with P_U = U U^T (= I - U_c U_c^T), P_V likewise."""
    if right is None and left is None:
        return
    if right is not None and not right_complement:
        # Keep the block factored on the right: work V is only (B, m, k_r).
        block = torch.bmm(work, right)
        if left is not None:
            block = _left_preserved(block, left, left_complement)
        work.baddbmm_(block, right.transpose(1, 2), alpha=-1.0)
        return
    if right is None:
        block = work.clone()
    else:  # P_V work = work - (work V_c) V_c^T
        block = work - torch.bmm(torch.bmm(work, right), right.transpose(1, 2))
    if left is not None:
        block = _left_preserved(block, left, left_complement)
    work.sub_(block)


def project_stacked_(grads: Tensor, left: Optional[Tensor], right: Optional[Tensor],
                     left_complement: bool = False, right_complement: bool = False,
                     mode: str = "two_sided") -> None:
    """Project a stack of gradients (B, m, n) in place; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a projection mode; use one of {MODES}")
    if grads.numel() == 0 or (left is None and right is None):
        return
    dtype = compute_dtype(grads.dtype)
    inplace = grads.dtype == dtype and grads.is_contiguous()
    work = grads if inplace else grads.to(dtype).contiguous()
    left = None if left is None else left.to(dtype)
    right = None if right is None else right.to(dtype)
    if mode == "two_sided":
        _project_two_sided_(work, left, right, left_complement, right_complement)
    else:
        _project_high_block_(work, left, right, left_complement, right_complement)
    if not inplace:
        grads.copy_(work)


def _group_key(g: Tensor, left: Optional[Tensor], right: Optional[Tensor],
               lc: bool, rc: bool) -> tuple:
    return (tuple(g.shape), g.dtype, g.device, left is None, right is None, lc, rc)


def stack_padded(bases: Sequence[Optional[Tensor]], dtype: torch.dtype,
                 device: Optional[torch.device] = None) -> Optional[Tensor]:
    """Stack (dim, k_i) bases to (B, dim, max k), padding with zero columns (exact: a zero
    column projects nothing); a None basis stays all zeros; None if every basis is None."""
    present = [b for b in bases if b is not None]
    if not present:
        return None
    width = max(b.shape[1] for b in present)
    out = torch.zeros((len(bases), present[0].shape[0], width), dtype=dtype,
                      device=present[0].device if device is None else device)
    for i, b in enumerate(bases):
        if b is not None:
            out[i, :, : b.shape[1]] = b
    return out


def project_list_(grads: Sequence[Tensor], left_bases: Sequence[Optional[Tensor]],
                  right_bases: Sequence[Optional[Tensor]], left_complement: Sequence[bool],
                  right_complement: Sequence[bool], mode: str = "two_sided") -> None:
    """Project a list of matrices in place: same-shape matrices are stacked, projected
    as one batch and written back (the reference still loops in Python to stack)."""
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        key = _group_key(g, left_bases[i], right_bases[i], left_complement[i],
                         right_complement[i])
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        _, _, _, no_left, no_right, lc, rc = key
        if no_left and no_right:
            continue
        dtype = compute_dtype(grads[idx[0]].dtype)
        stack = torch.stack([grads[i] for i in idx]).to(dtype)
        left = None if no_left else stack_padded([left_bases[i] for i in idx], dtype)
        right = None if no_right else stack_padded([right_bases[i] for i in idx], dtype)
        project_stacked_(stack, left, right, lc, rc, mode)
        torch._foreach_copy_([grads[i] for i in idx], list(stack.unbind(0)))


def project_one(grad: Tensor, left: Optional[Tensor], right: Optional[Tensor],
                mode: str = "two_sided") -> Tensor:
    """The textbook formula for one matrix, out of place, in fp64: what tests compare to.
    `left`/`right` are preserved bases (never complements)."""
    g = grad.double()
    m, n = g.shape
    p_left = torch.eye(m, dtype=g.dtype, device=g.device)
    p_right = torch.eye(n, dtype=g.dtype, device=g.device)
    if mode == "two_sided":
        if left is not None:
            p_left = p_left - left.double() @ left.double().T
        if right is not None:
            p_right = p_right - right.double() @ right.double().T
        return p_left @ g @ p_right
    if mode == "high_block":
        if left is None and right is None:
            return g
        keep_left = p_left if left is None else left.double() @ left.double().T
        keep_right = p_right if right is None else right.double() @ right.double().T
        return g - keep_left @ g @ keep_right
    raise ValueError(f"mode={mode!r} is not a projection mode; use one of {MODES}")
