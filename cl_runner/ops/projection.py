"""List-of-matrices entry points: `project_` (gradients) and `project_update_` (weights).

Thin wrappers: validate in Python only for the reference backend (the compiled ops check
their arguments in C++), pick a backend, call it once for the whole list.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from cl_runner.ops import _backends, reference


def _check_pair(i: int, g: Tensor, left: Optional[Tensor], right: Optional[Tensor]) -> None:
    if g.dim() != 2:
        raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; project_ takes matrices "
                         "(reshape conv/embedding gradients to 2-D first)")
    m, n = g.shape
    for side, basis, dim, dim_name in (("left_bases", left, m, "m"),
                                       ("right_bases", right, n, "n")):
        if basis is None:
            continue
        if basis.dim() != 2 or basis.shape[0] != dim:
            raise ValueError(
                f"{side}[{i}] has shape {tuple(basis.shape)} but grads[{i}] is {m}x{n}: "
                f"the basis must be {dim_name} x k = ({dim}, k) with orthonormal columns")
        if basis.shape[1] > dim:
            raise ValueError(f"{side}[{i}] has k={basis.shape[1]} columns > {dim_name}={dim}:"
                             " an orthonormal basis has at most as many columns as rows")
        if basis.device != g.device:
            raise ValueError(f"{side}[{i}] is on {basis.device} but grads[{i}] on {g.device};"
                             " move the bases to the gradients' device")


def _prepare(grads: Sequence[Tensor], left_bases, right_bases, left_complement,
             right_complement, mode: str, backend: Optional[str]):
    grads = list(grads)
    n = len(grads)
    left_bases = [None] * n if left_bases is None else list(left_bases)
    right_bases = [None] * n if right_bases is None else list(right_bases)
    if len(left_bases) != n or len(right_bases) != n:
        raise ValueError(f"got {n} grads, {len(left_bases)} left_bases and "
                         f"{len(right_bases)} right_bases; pass one (or None) per gradient")
    if mode not in reference.MODES:
        raise ValueError(f"mode={mode!r} is not a projection mode; use one of "
                         f"{reference.MODES}")
    lc = _backends._as_flags(left_complement, n, "left_complement")
    rc = _backends._as_flags(right_complement, n, "right_complement")
    name = _backends.resolve(backend, grads[0].device if n else torch.device("cpu"))
    if name == "torch":
        for i, g in enumerate(grads):
            _check_pair(i, g, left_bases[i], right_bases[i])
    return grads, left_bases, right_bases, lc, rc, name


@torch.no_grad()
def project_(grads: Sequence[Tensor], left_bases: Optional[Sequence[Optional[Tensor]]],
             right_bases: Optional[Sequence[Optional[Tensor]]], mode: str = "two_sided",
             backend: Optional[str] = None, *,
             left_complement: bool | Sequence[bool] = False,
             right_complement: bool | Sequence[bool] = False) -> None:
    """Project every gradient matrix (m x n) in place onto the complement of its
    preserved subspace: ``two_sided`` G <- (I - U U^T) G (I - V V^T), ``high_block``
    G <- G - U (U^T G V) V^T. U (m x k), V (n x k) have orthonormal columns; None means
    no basis on that side; with ``left_complement[i]`` the left entry is instead the
    orthonormal complement U_c (cheaper when k > m/2). All matrices in one call; same
    shapes are batched."""
    grads, lefts, rights, lc, rc, name = _prepare(grads, left_bases, right_bases,
                                                  left_complement, right_complement,
                                                  mode, backend)
    if grads:
        _backends.list_impl(name)(grads, lefts, rights, lc, rc, mode)


@torch.no_grad()
def project_update_(params: Sequence[Tensor], previous: Sequence[Tensor],
                    left_bases: Optional[Sequence[Optional[Tensor]]],
                    right_bases: Optional[Sequence[Optional[Tensor]]],
                    mode: str = "two_sided", backend: Optional[str] = None, *,
                    left_complement: bool | Sequence[bool] = False,
                    right_complement: bool | Sequence[bool] = False) -> None:
    """After an optimizer step: W <- W_prev + P(W - W_prev), so the step's update lies in
    the allowed subspace (AdamW's element-wise scaling and weight decay move it out).
    `previous` holds the weights before the step. `ProjectionGroups` offers the same
    without storing W_prev (see its `snapshot_weights`)."""
    params = list(params)
    previous = list(previous)
    if len(previous) != len(params):
        raise ValueError(f"got {len(params)} params and {len(previous)} previous weights;"
                         " pass the pre-step copy of every parameter")
    for i, (w, w0) in enumerate(zip(params, previous)):
        if w.shape != w0.shape:
            raise ValueError(f"previous[{i}] has shape {tuple(w0.shape)} but params[{i}] "
                             f"{tuple(w.shape)}: pass the pre-step copy of each parameter")
    if not params:
        return
    deltas = torch._foreach_sub(params, previous)
    project_(deltas, left_bases, right_bases, mode, backend,
             left_complement=left_complement, right_complement=right_complement)
    torch._foreach_add_(deltas, previous)
    torch._foreach_copy_(params, deltas)
