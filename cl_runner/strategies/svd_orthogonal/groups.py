"""`ProjectionGroups`: stacked storage that makes svd_orthogonal's projection cheap.

Parameters of the same shape (and dtype, device, kind of basis per side) form a bucket.
A bucket owns

- a gradient buffer (B, m, n); each parameter's ``.grad`` is a view of one slice, so
  backward accumulates straight into the stack and the projection never stacks or
  scatters per step;
- the stacked bases (B, m, k_l) and (B, n, k_r), padded with zero columns to the largest
  k in the bucket (exact: zero columns project nothing);
- after `snapshot_weights`, the anchors of the preserved component of the weights.

Per side a bucket stores either the preserved basis U or, when k > dim/2 and
``use_complement="auto"``, its orthonormal complement U_c (I - U U^T = U_c U_c^T), which
costs 4 m n (dim - k) flops instead of 4 m n k and less memory.

Gradient views and ``zero_grad``: autograd accumulates into an existing ``.grad`` in
place, so the views survive backward and ``optimizer.zero_grad(set_to_none=False)``.
``zero_grad(set_to_none=True)`` (PyTorch's default) drops them: call `attach_grads()`
before the next backward (cheap, idempotent). If a view was replaced anyway (by
set_to_none, DDP's bucket views, ...) `project_grads_` copies that gradient into the
buffer, projects, and re-attaches it, so results stay correct, only slower; a ``.grad``
that is None stays None (the optimizer then skips the parameter, as it would without us).

Weight update without storing W_prev (`snapshot_weights` / `project_weight_update_`):
with P the gradient projector, (I - P) is a projector onto the preserved part, and
    W <- W - (I - P)(W) + (I - P)(W_snap)
equals W_snap + P(W - W_snap) exactly, whether W_snap is the weight before this step or
before the task (every earlier step kept (I - P)(W) fixed). (I - P)(W_snap) is stored
factored: two_sided keeps U^T W_snap (k_l x n) and W_snap V (m x k_r); high_block keeps
U^T W_snap V (k_l x k_r); one-sided keeps only its factor. Buckets stored through a
complement keep the dense (I - P)(W_snap) (m x n, like a snapshot), because there the
preserved part has rank > dim/2 anyway.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from cl_runner.ops import _backends, reference
from cl_runner.ops.subspace import orthonormal_complement

NONE, BASIS, COMPLEMENT = "none", "basis", "complement"
_STATE_VERSION = 1


@dataclass
class _Bucket:
    names: list[str]
    params: list[Tensor]
    left_kind: str = NONE
    right_kind: str = NONE
    left: Optional[Tensor] = None  # (B, m, k_l): U, or U_c for COMPLEMENT
    right: Optional[Tensor] = None  # (B, n, k_r)
    left_ranks: list[int] = field(default_factory=list)  # preserved k per member
    right_ranks: list[int] = field(default_factory=list)
    grads: Optional[Tensor] = None  # (B, m, n) buffer behind each param.grad
    views: list[Tensor] = field(default_factory=list)
    anchors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.params[0].shape)  # type: ignore[return-value]

    @property
    def projects(self) -> bool:
        return self.left_kind != NONE or self.right_kind != NONE

    @property
    def dense_anchor(self) -> bool:
        return COMPLEMENT in (self.left_kind, self.right_kind)


class ProjectionGroups:
    """Stacked gradients, bases and weight anchors for a set of target matrices.

    Typical use by a strategy (names are the model's parameter names)::

        groups = ProjectionGroups(targets, mode="two_sided")   # once, at setup
        groups.set_bases({name: (U, V), ...})   # each task start (top_k_bases)
        groups.snapshot_weights()               # each task start, after set_bases
        groups.attach_grads()                   # before backward (see module doc)
        ... backward ...
        groups.project_grads_()                 # after backward, before the step
        optimizer.step()
        groups.project_weight_update_()         # right after the step
    """

    def __init__(self, named_params: Iterable[tuple[str, Tensor]], mode: str = "two_sided",
                 *, backend: Optional[str] = None, use_complement: str = "auto",
                 basis_dtype: Optional[torch.dtype] = None,
                 check_orthonormal: bool = True) -> None:
        if mode not in reference.MODES:
            raise ValueError(f"mode={mode!r}; use one of {reference.MODES}")
        if use_complement not in ("auto", "never"):
            raise ValueError(f"use_complement={use_complement!r}; use 'auto' or 'never'")
        self.mode = mode
        self.backend = backend
        self.use_complement = use_complement
        self.basis_dtype = basis_dtype
        self.check_orthonormal = check_orthonormal
        self._params: dict[str, Tensor] = {}
        for name, p in named_params:
            if p.dim() != 2:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}; "
                                 "ProjectionGroups takes 2-D weight matrices only")
            if name in self._params:
                raise ValueError(f"parameter name {name!r} appears twice")
            self._params[name] = p
        self._specs: dict[str, tuple[str, str, Optional[Tensor], Optional[Tensor], int, int]]
        self._specs = {name: (NONE, NONE, None, None, 0, 0) for name in self._params}
        self._attached = False
        self._buckets: list[_Bucket] = []
        self._rebuild()

    # ----------------------------------------------------------------- layout
    def _rebuild(self) -> None:
        """Re-bucket after the bases changed; keeps gradient contents if attached."""
        old_grads = {}
        if self._attached:
            for bucket in self._buckets:
                for name, p, view in zip(bucket.names, bucket.params, bucket.views):
                    g = p.grad
                    old_grads[name] = None if g is None else g.detach().clone()
                    if g is view:
                        p.grad = None
        keys: dict[tuple, list[str]] = {}
        for name, p in self._params.items():
            lk, rk = self._specs[name][:2]
            keys.setdefault((tuple(p.shape), p.dtype, p.device, lk, rk), []).append(name)
        self._buckets = []
        for (shape, dtype, device, lk, rk), names in keys.items():
            bucket = _Bucket(names=names, params=[self._params[n] for n in names],
                             left_kind=lk, right_kind=rk)
            bucket.left_ranks = [self._specs[n][4] for n in names]
            bucket.right_ranks = [self._specs[n][5] for n in names]
            bdtype = self.basis_dtype or dtype
            bucket.left = reference.stack_padded([self._specs[n][2] for n in names], bdtype, device)
            bucket.right = reference.stack_padded([self._specs[n][3] for n in names], bdtype, device)
            self._buckets.append(bucket)
        if self._attached:
            self._attached = False
            self.attach_grads()
            for bucket in self._buckets:
                for i, (name, p) in enumerate(zip(bucket.names, bucket.params)):
                    g = old_grads.get(name)
                    if g is None:
                        p.grad = None
                    else:
                        bucket.grads[i].copy_(g)

    def set_bases(self, bases: Mapping[str, Sequence[Optional[Tensor]]]) -> None:
        """Preserved bases per parameter name: (U (m x k_l) or None, V (n x k_r) or None),
        optionally (U, V, U_c, V_c) with complements (e.g. from top_k_bases with
        keep_complement). Parameters not named are not projected. Clears the anchors:
        call `snapshot_weights()` afterwards."""
        unknown = [n for n in bases if n not in self._params]
        if unknown:
            raise KeyError(f"set_bases got names that are not in this ProjectionGroups: "
                           f"{unknown[:5]}; known names start with {list(self._params)[:5]}")
        specs = {name: (NONE, NONE, None, None, 0, 0) for name in self._params}
        for name, value in bases.items():
            value = tuple(value)
            if len(value) not in (2, 4):
                raise ValueError(f"bases[{name!r}] has {len(value)} entries; pass (U, V) or "
                                 "(U, V, U_complement, V_complement)")
            u, v = value[0], value[1]
            u_c, v_c = (value[2], value[3]) if len(value) == 4 else (None, None)
            m, n = self._params[name].shape
            lk, left, kl = self._side(name, "U", u, u_c, m)
            rk, right, kr = self._side(name, "V", v, v_c, n)
            specs[name] = (lk, rk, left, right, kl, kr)
        self._specs = specs
        self._rebuild()

    def _side(self, name: str, label: str, basis: Optional[Tensor],
              complement: Optional[Tensor], dim: int):
        """(kind, stored tensor, preserved k) for one side of one parameter."""
        if basis is None:
            return NONE, None, 0
        p = self._params[name]
        if basis.dim() != 2 or basis.shape[0] != dim:
            raise ValueError(f"basis {label} for {name!r} has shape {tuple(basis.shape)}; "
                             f"expected ({dim}, k) for a weight of shape {tuple(p.shape)}")
        k = basis.shape[1]
        if k > dim:
            raise ValueError(f"basis {label} for {name!r} has k={k} > {dim} columns")
        basis = basis.detach().to(p.device)
        if self.check_orthonormal and k > 0:
            _check_orthonormal(basis, f"basis {label} for {name!r}")
        if k == 0 and self.mode == "two_sided":
            return NONE, None, 0  # nothing preserved on that side: identity
        if self.use_complement == "auto" and 2 * k > dim:
            if complement is None:
                complement = orthonormal_complement(basis.float())
            elif tuple(complement.shape) != (dim, dim - k):
                raise ValueError(f"complement of {label} for {name!r} has shape "
                                 f"{tuple(complement.shape)}; expected ({dim}, {dim - k})")
            return COMPLEMENT, complement.detach().to(p.device), k
        return BASIS, basis, k

    # -------------------------------------------------------------- gradients
    def attach_grads(self) -> None:
        """Make every parameter's .grad a view into its bucket's stacked buffer. A
        parameter whose .grad is some other tensor has it copied in; a None grad gets a
        zeroed slice. Idempotent; call before backward when zero_grad sets grads to None."""
        for bucket in self._buckets:
            if bucket.grads is None:
                p0 = bucket.params[0]
                bucket.grads = torch.zeros((len(bucket.params), *p0.shape), dtype=p0.dtype,
                                           device=p0.device)
                bucket.views = list(bucket.grads.unbind(0))
            for i, p in enumerate(bucket.params):
                g = p.grad
                if g is bucket.views[i]:
                    continue
                if g is None:
                    bucket.views[i].zero_()
                else:
                    bucket.views[i].copy_(g)
                p.grad = bucket.views[i]
        self._attached = True

    def detach_grads(self) -> None:
        """Give each parameter a private copy of its gradient and free the buffers."""
        for bucket in self._buckets:
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is view:
                    p.grad = view.clone()
            bucket.grads, bucket.views = None, []
        self._attached = False

    @torch.no_grad()
    def project_grads_(self) -> None:
        """Project every gradient in place (one batched op per bucket)."""
        name = None
        for bucket in self._buckets:
            if not bucket.projects:
                continue
            if bucket.grads is None:
                self.attach_grads()
            views = bucket.views
            missing = []
            for i, p in enumerate(bucket.params):
                g = p.grad
                if g is views[i]:
                    continue
                if g is None:  # no gradient this step: keep None, keep the slice clean
                    views[i].zero_()
                    missing.append(i)
                else:
                    views[i].copy_(g)
                    p.grad = views[i]
            if name is None:
                name = _backends.resolve(self.backend, bucket.grads.device)
            _backends.stacked_impl(name)(bucket.grads, bucket.left, bucket.right,
                                         bucket.left_kind == COMPLEMENT,
                                         bucket.right_kind == COMPLEMENT, self.mode)
            for i in missing:
                bucket.params[i].grad = None

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def snapshot_weights(self) -> None:
        """Record the preserved component (I - P)(W) of every target weight (factored
        where possible; see the module docstring). Call after `set_bases`, at the task
        start (or before every step: the result is the same)."""
        for bucket in self._buckets:
            bucket.anchors = {}
            if not bucket.projects:
                continue
            w = _stack_weights(bucket)
            if bucket.dense_anchor:
                projected = w.clone()
                self._project_stacked(bucket, projected)
                bucket.anchors["dense"] = (w - projected).to(bucket.params[0].dtype)
                continue
            left, right = _compute_bases(bucket, w.dtype)
            if left is not None and right is not None and self.mode == "high_block":
                bucket.anchors["core"] = torch.bmm(left.transpose(1, 2), torch.bmm(w, right))
                continue
            if left is not None:
                bucket.anchors["left"] = torch.bmm(left.transpose(1, 2), w)  # U^T W
            if right is not None:
                bucket.anchors["right"] = torch.bmm(w, right)  # W V

    @torch.no_grad()
    def project_weight_update_(self) -> None:
        """Make W - W_snapshot lie in the allowed subspace: W <- W - (I-P)(W) +
        (I-P)(W_snapshot). Call right after optimizer.step()."""
        for bucket in self._buckets:
            if not bucket.projects:
                continue
            if not bucket.anchors:
                raise RuntimeError("project_weight_update_ called before snapshot_weights(); "
                                   "call groups.snapshot_weights() after set_bases() at the "
                                   "task start")
            w = _stack_weights(bucket)
            if bucket.dense_anchor:
                self._project_stacked(bucket, w)
                w.add_(bucket.anchors["dense"])
            else:
                left, right = _compute_bases(bucket, w.dtype)
                a = bucket.anchors
                if "core" in a:
                    d_core = torch.bmm(left.transpose(1, 2), torch.bmm(w, right)) - a["core"]
                    w.baddbmm_(torch.bmm(left, d_core), right.transpose(1, 2), alpha=-1.0)
                else:
                    d_left = torch.bmm(left.transpose(1, 2), w) - a["left"] \
                        if "left" in a else None
                    d_right = torch.bmm(w, right) - a["right"] if "right" in a else None
                    if d_left is not None:
                        w.baddbmm_(left, d_left, alpha=-1.0)  # U dA
                    if d_right is not None:
                        if d_left is not None:  # (dB - U (dA V)): the U U^T part is done
                            d_right.baddbmm_(left, torch.bmm(d_left, right), alpha=-1.0)
                        w.baddbmm_(d_right, right.transpose(1, 2), alpha=-1.0)
            torch._foreach_copy_(bucket.params, list(w.unbind(0)))

    def _project_stacked(self, bucket: _Bucket, stack: Tensor) -> None:
        name = _backends.resolve(self.backend, stack.device)
        _backends.stacked_impl(name)(stack, bucket.left, bucket.right,
                                     bucket.left_kind == COMPLEMENT,
                                     bucket.right_kind == COMPLEMENT, self.mode)

    # ------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        return list(self._params)

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Preserved k per parameter: name -> (k_left, k_right)."""
        return {n: (s[4], s[5]) for n, s in self._specs.items()}

    def layout(self) -> list[dict]:
        """One line per bucket: shape, count, kinds and stored widths (for logs)."""
        return [{"shape": b.shape, "count": len(b.params), "left": b.left_kind,
                 "right": b.right_kind,
                 "left_width": 0 if b.left is None else b.left.shape[2],
                 "right_width": 0 if b.right is None else b.right.shape[2]}
                for b in self._buckets]

    def nbytes(self, include_grads: bool = False) -> int:
        """Bytes held for the projection: stacked bases and anchors (and the gradient
        buffers, which replace the parameters' own .grad, when include_grads)."""
        total = 0
        for b in self._buckets:
            tensors = [b.left, b.right, *b.anchors.values()]
            if include_grads:
                tensors.append(b.grads)
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Bases (as stored: basis or complement, padded) and anchors, per bucket."""
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "buckets": [{
                "names": list(b.names), "left_kind": b.left_kind,
                "right_kind": b.right_kind, "left_ranks": list(b.left_ranks),
                "right_ranks": list(b.right_ranks), "left": b.left, "right": b.right,
                "anchors": dict(b.anchors)} for b in self._buckets],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore bases and anchors saved by `state_dict` (same parameter names)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ProjectionGroups state version {state.get('version')!r}; "
                             f"this code reads version {_STATE_VERSION}")
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint has mode={state['mode']!r} but these groups use "
                             f"mode={self.mode!r}; build ProjectionGroups with the same mode")
        saved = [n for b in state["buckets"] for n in b["names"]]
        if sorted(saved) != sorted(self._params):
            missing = sorted(set(self._params) - set(saved))[:5]
            extra = sorted(set(saved) - set(self._params))[:5]
            raise ValueError(f"checkpoint names differ from these groups: missing {missing},"
                             f" unexpected {extra}")
        specs, anchors = {}, {}
        for b in state["buckets"]:
            for i, name in enumerate(b["names"]):
                left = _unpad(b["left"], i, b["left_kind"], b["left_ranks"][i],
                              self._params[name].shape[0])
                right = _unpad(b["right"], i, b["right_kind"], b["right_ranks"][i],
                               self._params[name].shape[1])
                specs[name] = (b["left_kind"], b["right_kind"], left, right,
                               b["left_ranks"][i], b["right_ranks"][i])
                anchors[name] = {key: t[i] for key, t in b["anchors"].items()}
        self._specs = specs
        self._rebuild()
        for bucket in self._buckets:
            keys = anchors[bucket.names[0]].keys()
            bucket.anchors = {key: _stack_anchor([anchors[n][key] for n in bucket.names],
                                                 bucket.params[0].device) for key in keys}


def _check_orthonormal(basis: Tensor, what: str) -> None:
    b = basis.float()
    gram = b.T @ b
    err = (gram - torch.eye(gram.shape[0], device=b.device)).abs().max().item()
    tol = 1e-3 if basis.dtype in (torch.float32, torch.float64) else 3e-2
    if err > tol:
        raise ValueError(f"{what} is not orthonormal (max |B^T B - I| = {err:.2e} > {tol}); "
                         "pass bases from top_k_bases or orthonormalise with torch.linalg.qr")


def _unpad(stacked: Optional[Tensor], i: int, kind: str, k: int, dim: int):
    if stacked is None or kind == NONE:
        return None
    width = dim - k if kind == COMPLEMENT else k
    return stacked[i, :, :width]


def _stack_anchor(parts: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(parts).to(device)


def _stack_weights(bucket: _Bucket) -> Tensor:
    dtype = reference.compute_dtype(bucket.params[0].dtype)
    return torch.stack([p.detach() for p in bucket.params]).to(dtype)


def _compute_bases(bucket: _Bucket, dtype: torch.dtype):
    left = None if bucket.left is None else bucket.left.to(dtype)
    right = None if bucket.right is None else bucket.right.to(dtype)
    return left, right
