"""svd_orthogonal on FSDP2-sharded weights: bases, projections and SVDs on row shards.

Under `trainer.sharding=fsdp` every target W (m x n) is a DTensor split by rows: rank r
holds W_r (rows [a_r, b_r)), its gradient G_r likewise. The preserved bases are stored
sharded too, so their bytes per rank fall as 1/world:

- the left side (U, m x k_l, or its complement when k_l > m/2) by the same rows as W;
- the right side (V, n x k_r, or its complement) split by rows of V into even chunks.

The left projector acts on rows: `G - U (Uᵀ G)` needs Uᵀ G = Σ_r U_rᵀ G_r, a k_l x n
product that one all-reduce sums (the complement side likewise, U_cᵀ G). The right
projector acts on each row of G through V in full, so V's chunks are all-gathered for the
moment of the projection (like FSDP's own weight all-gather) and dropped after. Both
collectives are bucketed: targets are packed in order into buckets of at most
`bucket_mb`, one all-gather and one all-reduce per bucket.

After the optimizer step the update of the step, D = W - W_before (AdamW's element-wise
scaling and weight decay leave the allowed set), is projected the same way and
W = W_before + P(D); over a task that keeps (I - P)(W) at its task-start value, as the
unsharded path does with its anchors. W_before is a transient copy of the local target
shards, taken right before the step.

The per-task SVDs are spread over ranks: target i is gathered whole to rank i mod world,
decomposed there (top-k, and the accumulate union when asked), and its bases scattered
back as shards, so task-start time falls with the number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cl_runner.distributed.sharding import local
from cl_runner.ops.subspace import orthonormal_complement

BASIS, COMPLEMENT = "basis", "complement"


def chunk_rows(dim: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk `rank` when `dim` rows are split like torch.chunk (and
    FSDP2's Shard(0)): ceil(dim / world) per rank, the last ones shorter or empty."""
    size = math.ceil(dim / world) if dim else 0
    start = min(rank * size, dim)
    return start, min(start + size, dim)


@dataclass
class _Side:
    kind: str  # BASIS | COMPLEMENT
    k: int  # preserved directions
    shard: Tensor  # this rank's rows of the stored matrix (basis or complement)

    @property
    def width(self) -> int:
        return self.shard.shape[1]


@dataclass
class _Target:
    name: str
    param: Any  # the DTensor parameter
    shape: tuple[int, int]
    left: Optional[_Side] = None
    right: Optional[_Side] = None


class ShardedSubspaces:
    """Sharded bases of a set of 2-D DTensor parameters, and the projections on them."""

    def __init__(self, named_params: Sequence[tuple[str, Any]], mode: str, basis_dtype: torch.dtype,
                 bucket_mb: float = 256.0) -> None:
        self.mode = mode
        self.basis_dtype = basis_dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.targets = [_Target(n, p, tuple(p.shape)) for n, p in named_params]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = None
        self._before: list[Optional[Tensor]] = []
        # (bucket_bytes, buckets): fixed between basis changes, so packed once per task.
        self._bucket_list: Optional[tuple[int, list[list[_Target]]]] = None
        for tg in self.targets:
            start, stop = chunk_rows(tg.shape[0], self.world, self.rank)
            if local(tg.param).shape[0] != stop - start:
                raise RuntimeError(f"svd_orthogonal: {tg.name} is not sharded by rows as expected "
                                   f"(local rows {local(tg.param).shape[0]}, expected {stop - start})")

    # ------------------------------------------------------------------ bases
    def _gather_rows(self, shard: Tensor, dim: int, owner: int) -> Optional[Tensor]:
        """The whole matrix on `owner` (None elsewhere) from row chunks (torch.chunk split)."""
        size = math.ceil(dim / self.world)
        padded = torch.zeros((size, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        padded[: shard.shape[0]] = shard
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(padded, parts, dst=owner)
        return torch.cat(parts)[:dim] if self.rank == owner else None

    def _scatter_rows(self, whole: Optional[Tensor], dim: int, width: int, owner: int, device) -> Tensor:
        """This rank's row chunk of `whole` (given on `owner` only)."""
        size = math.ceil(dim / self.world)
        out = torch.empty((size, width), dtype=self.basis_dtype, device=device)
        parts = None
        if self.rank == owner:
            padded = torch.zeros((size * self.world, width), dtype=self.basis_dtype, device=device)
            padded[:dim] = whole.to(self.basis_dtype)
            parts = list(padded.split(size))
        dist.scatter(out, parts, src=owner)
        start, stop = chunk_rows(dim, self.world, self.rank)
        return out[: stop - start].contiguous()

    def _side_matrix(self, basis: Tensor, dim: int) -> tuple[str, Tensor]:
        """What to store for one side: the basis, or its complement when that is narrower."""
        if 2 * basis.shape[1] > dim and self.mode == "two_sided":
            return COMPLEMENT, orthonormal_complement(basis.float())
        return BASIS, basis

    @torch.no_grad()
    def set_bases_from_weights(self, ks: Sequence[int],
                               decompose: Callable[[Tensor, int, int], tuple[Tensor, Tensor]],
                               combine: Optional[Callable[[int, Tensor, Tensor, Optional[tuple[Tensor, Tensor]]],
                                                          tuple[Tensor, Tensor]]] = None) -> list[tuple[int, int]]:
        """New bases for every target: W_i gathered to rank i mod world, `decompose(W, k,
        i)` -> (U, V) there (and `combine(i, U, V, old)` -> (U, V) with the old bases
        gathered, for `bases: accumulate`), stored sides scattered back as shards.
        Returns (k_left, k_right) per target (the same on every rank)."""
        kept: list[tuple[int, int]] = []
        self._bucket_list = None
        for i, (tg, k) in enumerate(zip(self.targets, ks)):
            owner = i % self.world
            m, n = tg.shape
            w_shard = local(tg.param).detach().float()
            old = None
            if combine is not None and tg.left is not None:
                old = (self._full_basis(tg.left, m, owner), self._full_basis(tg.right, n, owner))
            whole = self._gather_rows(w_shard, m, owner)
            header = torch.zeros(6, dtype=torch.int64, device=w_shard.device)
            left = right = None
            if self.rank == owner:
                u, v = decompose(whole, k, i)
                if combine is not None:
                    u, v = combine(i, u, v, old)
                left_kind, left = self._side_matrix(u, m)
                right_kind, right = self._side_matrix(v, n)
                header = torch.tensor([u.shape[1], v.shape[1], left.shape[1], right.shape[1],
                                       left_kind == COMPLEMENT, right_kind == COMPLEMENT],
                                      dtype=torch.int64, device=w_shard.device)
            dist.broadcast(header, src=owner)
            k_l, k_r, width_l, width_r, comp_l, comp_r = (int(x) for x in header.tolist())
            device = w_shard.device
            tg.left = _Side(COMPLEMENT if comp_l else BASIS, k_l, self._scatter_rows(left, m, width_l, owner, device))
            # V is split into even row chunks of n (it is not a parameter: no FSDP layout).
            tg.right = _Side(COMPLEMENT if comp_r else BASIS, k_r, self._scatter_rows(right, n, width_r, owner, device))
            kept.append((k_l, k_r))
        return kept

    def _full_basis(self, side: _Side, dim: int, owner: int) -> Optional[Tensor]:
        """The preserved basis itself (never the complement) of one side, on `owner`."""
        whole = self._gather_rows(side.shard.float(), dim, owner)
        if self.rank != owner:
            return None
        return orthonormal_complement(whole) if side.kind == COMPLEMENT else whole

    # ------------------------------------------------------------------ projections
    def _buckets(self) -> list[list[_Target]]:
        """Targets packed in order up to bucket_bytes (computed once per set of bases)."""
        if self._bucket_list is None or self._bucket_list[0] != self.bucket_bytes:
            self._bucket_list = (self.bucket_bytes, self._pack_buckets())
        return self._bucket_list[1]

    def _pack_buckets(self) -> list[list[_Target]]:
        buckets, current, size = [], [], 0
        for tg in self.targets:
            if tg.left is None:
                continue
            m, n = tg.shape
            cost = (n * tg.right.width + tg.left.width * n) * 4
            if current and size + cost > self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(tg)
            size += cost
        if current:
            buckets.append(current)
        return buckets

    def _gather_right(self, bucket: list[_Target]) -> list[Tensor]:
        """Every target's right-side matrix in full (n x width), one all-gather per bucket."""
        device = bucket[0].right.shard.device
        chunks, shapes = [], []
        for tg in bucket:
            n = tg.shape[1]
            size = math.ceil(n / self.world)
            padded = torch.zeros((size, tg.right.width), dtype=self.basis_dtype, device=device)
            padded[: tg.right.shard.shape[0]] = tg.right.shard
            chunks.append(padded.flatten())
            shapes.append((size, tg.right.width, n))
        flat = torch.cat(chunks)
        gathered = torch.empty(flat.numel() * self.world, dtype=flat.dtype, device=device)
        dist.all_gather_into_tensor(gathered, flat)
        per_rank = gathered.view(self.world, flat.numel())
        out, offset = [], 0
        for size, width, n in shapes:
            part = per_rank[:, offset: offset + size * width].reshape(self.world * size, width)[:n]
            out.append(part.float())
            offset += size * width
        return out

    def _project_(self, tensors: list[Tensor], bucket: list[_Target], rights: list[Tensor]) -> None:
        """Project each local row block X_r (in place) with one all-reduce for the bucket."""
        lefts = [tg.left.shard.float() for tg in bucket]
        if self.mode == "high_block":
            # X - U (Uᵀ X V) Vᵀ: the reduced product is only k_l x k_r.
            products = [u.T @ (x @ v) for u, x, v in zip(lefts, tensors, rights)]
        else:
            products = [u.T @ x for u, x in zip(lefts, tensors)]  # Uᵀ X (or U_cᵀ X), k x n
        flat = torch.cat([p.flatten() for p in products])
        if self.world > 1:
            dist.all_reduce(flat)
        offset = 0
        for tg, x, u, v, p in zip(bucket, tensors, lefts, rights, products):
            summed = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            if self.mode == "high_block":
                x.sub_(u @ summed @ v.T)
                continue
            # Left: (I - UUᵀ) X = X - U (UᵀX), or U_c (U_cᵀ X) with the complement.
            if tg.left.kind == COMPLEMENT:
                x.copy_(u @ summed)
            else:
                x.sub_(u @ summed)
            # Right, row by row on the local rows: X (I - VVᵀ), or (X V_c) V_cᵀ.
            if tg.right.kind == COMPLEMENT:
                x.copy_((x @ v) @ v.T)
            else:
                x.sub_((x @ v) @ v.T)

    @torch.no_grad()
    def project_grads_(self) -> None:
        for bucket in self._buckets():
            grads = []
            for tg in bucket:
                g = tg.param.grad
                grads.append(None if g is None else local(g))
            if any(g is None for g in grads):
                continue  # frozen this step: the optimizer skips them as well
            work = [g.float() for g in grads]
            self._project_(work, bucket, self._gather_right(bucket))
            for g, w in zip(grads, work):
                if w is not g:
                    g.copy_(w)

    @torch.no_grad()
    def remember_weights(self) -> None:
        """Copy the local target shards before the optimizer step (freed after it)."""
        self._before = [local(tg.param).detach().clone() if tg.left is not None else None for tg in self.targets]

    @torch.no_grad()
    def project_update_(self) -> None:
        """W = W_before + P(W - W_before) for every target, on local rows."""
        before = dict(zip((tg.name for tg in self.targets), self._before))
        for bucket in self._buckets():
            deltas = [(local(tg.param).float() - before[tg.name].float()) for tg in bucket]
            self._project_(deltas, bucket, self._gather_right(bucket))
            for tg, d in zip(bucket, deltas):
                w = local(tg.param)
                w.copy_((before[tg.name].float() + d).to(w.dtype))
        self._before = []

    # ------------------------------------------------------------------ state
    def nbytes(self) -> int:
        """Bytes of bases this rank holds (its shards)."""
        return sum(s.shard.numel() * s.shard.element_size() for tg in self.targets
                   for s in (tg.left, tg.right) if s is not None)

    def ranks(self) -> dict[str, tuple[int, int]]:
        return {tg.name: (tg.left.k, tg.right.k) for tg in self.targets if tg.left is not None}

    def state_dict(self) -> dict[str, Any]:
        """The stored sides as DTensors (row shards over the model's process grid): the
        sharded checkpoint writes each rank's rows and re-shards them on load."""
        from torch.distributed.tensor import DTensor, Shard

        def as_dtensor(tg: _Target, side: _Side, dim: int) -> Any:
            return DTensor.from_local(side.shard, tg.param.device_mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((dim, side.width)), stride=(side.width, 1))

        return {"mode": self.mode,
                "targets": {tg.name: {"left_kind": tg.left.kind, "left_k": tg.left.k,
                                      "left": as_dtensor(tg, tg.left, tg.shape[0]),
                                      "right_kind": tg.right.kind, "right_k": tg.right.k,
                                      "right": as_dtensor(tg, tg.right, tg.shape[1])}
                            for tg in self.targets if tg.left is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._bucket_list = None
        for tg in self.targets:
            saved = state["targets"].get(tg.name)
            if saved is None:
                continue
            device = local(tg.param).device
            tg.left = _Side(saved["left_kind"], int(saved["left_k"]),
                            local(saved["left"]).to(device, self.basis_dtype).contiguous())
            tg.right = _Side(saved["right_kind"], int(saved["right_k"]),
                             local(saved["right"]).to(device, self.basis_dtype).contiguous())
