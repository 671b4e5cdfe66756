"""svd_orthogonal's memory estimate: the bytes `ProjectionGroups` (trainer.sharding=none)
and `ShardedSubspaces` (fsdp) hold for the targets of a model, counted from its shapes."""
from __future__ import annotations

import math
from typing import Any, Optional

from cl_runner.strategies.memory import FP32, PlanInputs, ShardedEstimate, StrategyEstimate, gib


def svd_target_bytes(m: int, n: int, k: int, projection: str = "two_sided", basis_bytes: int = FP32,
                     param_bytes: int = FP32) -> tuple[int, int]:
    """(bases, anchors) in bytes that `ProjectionGroups` holds for one m x n target
    preserving k directions on each side (U: m x k, V: n x k). A side with 2k > dim is
    stored through its complement (dim x (dim - k)); a target with a complement side keeps
    a dense anchor (m x n, weights' dtype), otherwise the factored anchors are fp32:
    two_sided Uᵀ W (k x n) and W V (m x k), high_block Uᵀ W V (k x k)."""
    def side(dim: int) -> tuple[str, int]:
        if k == 0 and projection == "two_sided":
            return "none", 0
        if 2 * k > dim:
            return "complement", dim - k
        return "basis", k

    (lk, lw), (rk, rw) = side(m), side(n)
    bases = (m * lw + n * rw) * basis_bytes
    if lk == "none" and rk == "none":
        return bases, 0
    if "complement" in (lk, rk):
        return bases, m * n * param_bytes
    if projection == "high_block":
        return bases, k * k * FP32
    return bases, ((k * n if lk == "basis" else 0) + (m * k if rk == "basis" else 0)) * FP32


def _svd_k(dim: int, fraction: float, rounding: str, size: Optional[int] = None) -> int:
    """k for a matrix of rank dimension `dim`; the fraction multiplies `size` (default dim;
    max(m, n) under rank.fraction_of=max_dim)."""
    from cl_runner.strategies.svd_orthogonal.rank import _EPS, _round_half_up, clamp_rank

    size = dim if size is None else size
    raw = _round_half_up(fraction * size) if rounding == "half_up" else math.floor(fraction * size + _EPS)
    return clamp_rank(raw, dim)


def _fraction_size(r: Any, m: int, n: int) -> int:
    return max(m, n) if r.mode == "ratio" and r.get("fraction_of", "min_dim") == "max_dim" else min(m, n)


def estimate_svd(s: Any, inputs: PlanInputs, basis_bytes: int) -> StrategyEstimate:
    """`basis_bytes`: bytes per value of the bases (strategy.basis_dtype)."""
    facts, param_bytes, n_tasks = inputs.facts, inputs.param_bytes, inputs.n_tasks
    from cl_runner.strategies.base import plain_config
    from cl_runner.strategies.svd_orthogonal.rank import scheduled_fraction
    from cl_runner.strategies.svd_orthogonal.targets import find_targets

    targets = find_targets(facts.model, facts.family, plain_config(s.targets) or {})
    shapes = [tuple(t.param.shape) for t in targets]
    r = s.rank
    if r.mode == "ratio":
        base, rounding = 1.0 - r.unfreeze_ratio, "floor"
        how = f"ratio mode: k = floor(min(m, n) x {base:g})"
    else:
        base, rounding = r.trr, "half_up"
        how = (f"adaptive mode: k = round(min(m, n) x trr={r.trr:g}) (a layer of mean importance, not a "
               "bound)")
    point = s.get("projection_point", "both")
    anchored = point in ("both", "update")  # projection_point=gradient keeps no weight anchors
    best: tuple[int, int, int, float] = (-1, 0, 0, base)
    for t in range(max(1, n_tasks)):  # the schedule may grow k; the stored bytes need not grow with it
        fraction = scheduled_fraction(base, t, r.schedule_step, r.schedule_cap)
        if s.bases == "accumulate":
            fraction = max(fraction, s.rank_budget)  # worst case: the union has reached the budget
        bases = anchors = 0
        for m, n in shapes:
            k = _svd_k(min(m, n), fraction, "floor" if s.bases == "accumulate" else rounding, _fraction_size(r, m, n))
            b, a = svd_target_bytes(m, n, k, s.projection, basis_bytes, param_bytes)
            bases, anchors = bases + b, anchors + (a if anchored else 0)
        if bases + anchors > best[0]:
            best = (bases + anchors, bases, anchors, fraction)
    total, bases, anchors, fraction = best
    notes = [f"ProjectionGroups (the unsharded implementation): {len(targets)} targets, {how}: "
             f"bases {gib(bases)}, weight anchors {gib(anchors)}"
             + (" (projection_point=gradient: none)" if not anchored else "")]
    if s.get("measure_drift", False):
        start = sum(m * n for m, n in shapes) * param_bytes
        kept = sum((m + n) * _svd_k(min(m, n), fraction, rounding, _fraction_size(r, m, n)) for m, n in shapes) * FP32
        total += start + kept
        notes.append(f"measure_drift: a copy of the targets from the task start ({gib(start)}) and their fp32 bases "
                     f"({gib(kept)})")
    if s.bases == "accumulate":
        kept = sum((m + n) * _svd_k(min(m, n), s.rank_budget, "floor") for m, n in shapes) * FP32
        total += kept
        notes.append(f"bases=accumulate: the union at its rank_budget={s.rank_budget:g} (worst case) plus its "
                     f"fp32 copy ({gib(kept)})")
    # project_weight_update_ stacks each bucket (targets of one shape) in fp32; a bucket with a
    # dense anchor also holds the projected copy while the anchor is taken. The gradient
    # projection works in the stacked gradient buffers themselves (fp32 grads: no copy).
    transient = 0
    for shape in set(shapes) if anchored else ():
        m, n = shape
        count = shapes.count(shape)
        k = _svd_k(min(m, n), fraction, rounding, _fraction_size(r, m, n))
        dense = 2 * k > min(m, n)
        transient = max(transient, count * m * n * FP32 * (2 if dense else 1))
    trainable = sum(m * n for m, n in shapes) if s.freeze_untargeted else None
    freeze = ["freeze_untargeted: only the targets train (gradients and optimizer state for them alone)"]
    if s.freeze_untargeted:
        notes += freeze

    def sharded(world: int) -> ShardedEstimate:
        est = _estimate_svd_sharded(s, shapes, basis_bytes, param_bytes, n_tasks, world, how)
        if s.freeze_untargeted:
            est.notes += freeze
        return est

    return StrategyEstimate("svd_orthogonal", state_bytes=total, transient_bytes=transient,
                            trainable_params=trainable, notes=notes,
                            transient_note=("fp32 stack of the largest same-shape bucket in the weight projection"
                                            if anchored else "none (projection_point=gradient: no weight projection)"),
                            sharded=sharded)


def svd_sharded_side_widths(m: int, n: int, k: int, projection: str = "two_sided") -> tuple[int, int]:
    """(left, right) columns `ShardedSubspaces` stores for one m x n target preserving k
    directions per side: U (m x k) and V (n x k), or in two_sided mode a side's orthonormal
    complement (dim - k columns) where 2k > dim; high_block always keeps the bases."""
    def width(dim: int) -> int:
        return dim - k if projection == "two_sided" and 2 * k > dim else k

    return width(m), width(n)


def svd_sharded_bytes(shapes: list[tuple[int, int]], ks: list[int], world: int, projection: str = "two_sided",
                      basis_bytes: int = FP32, param_bytes: int = FP32,
                      bucket_mb: float = 256.0) -> tuple[int, int, int, int]:
    """What `strategies/svd_orthogonal/sharded.ShardedSubspaces` holds on rank 0 (the largest chunks)
    at `world` ranks: (bases, largest projection bucket, W_before, number of buckets).

    bases: per target, the left side's rows split like the weight and the right side's in
    even chunks, ceil(dim / world) rows each, in the basis dtype; no weight anchors.
    bucket: targets packed in order while their (n x right + left x n) x 4 bytes fit in
    `bucket_mb` (ShardedSubspaces._buckets); a bucket holds the all-gathered right sides
    (n x width, fp32), the products (left width x n, or k x k in high_block, fp32) and fp32
    work copies of the local rows (ceil(m / world) x n).
    W_before: every target's local rows in the weights' dtype, from before the optimizer
    step to the projection of its update (remember_weights)."""
    limit = int(bucket_mb * 2 ** 20)
    bases = before = 0
    buckets: list[int] = []
    size = work = 0
    opened = False
    for (m, n), k in zip(shapes, ks):
        lw, rw = svd_sharded_side_widths(m, n, k, projection)
        rows_m, rows_n = math.ceil(m / world), math.ceil(n / world)
        bases += (rows_m * lw + rows_n * rw) * basis_bytes
        before += rows_m * n * param_bytes
        cost = (n * rw + lw * n) * 4
        if opened and size + cost > limit:
            buckets.append(work)
            size = work = 0
        opened = True
        size += cost
        product = lw * rw if projection == "high_block" else lw * n
        work += (n * rw + product + rows_m * n) * FP32
    if opened:
        buckets.append(work)
    return bases, max(buckets, default=0), before, len(buckets)


def _estimate_svd_sharded(s: Any, shapes: list[tuple[int, int]], basis_bytes: int, param_bytes: int,
                          n_tasks: int, world: int, how: str) -> ShardedEstimate:
    from cl_runner.strategies.svd_orthogonal.rank import scheduled_fraction

    r = s.rank
    base, rounding = (1.0 - r.unfreeze_ratio, "floor") if r.mode == "ratio" else (r.trr, "half_up")
    mb = float(s.get("sharded_bucket_mb", 256.0))
    worst = {1: (0, 0, 0, 0), world: (0, 0, 0, 0)}
    for t in range(max(1, n_tasks)):  # the schedule may grow k: the largest over the tasks
        if s.bases == "accumulate":  # the union never grows past its rank_budget
            ks = [_svd_k(min(m, n), s.rank_budget, "floor") for m, n in shapes]
        else:
            fraction = scheduled_fraction(base, t, r.schedule_step, r.schedule_cap)
            ks = [_svd_k(min(m, n), fraction, rounding, _fraction_size(r, m, n)) for m, n in shapes]
        for w in worst:
            got = svd_sharded_bytes(shapes, ks, w, s.projection, basis_bytes, param_bytes, mb)
            worst[w] = tuple(max(a, b) for a, b in zip(worst[w], got))  # type: ignore[assignment]
    (bases1, bucket1, before1, _), (bases, bucket, before, n_buckets) = worst[1], worst[world]
    if s.get("projection_point", "both") == "gradient":  # no update projection: no W_before
        before1 = before = 0
    sides = "basis" if s.projection == "high_block" else "basis or complement"
    notes = [f"strategies/svd_orthogonal/sharded.ShardedSubspaces (the trainer.sharding=fsdp implementation): "
             f"{len(shapes)} targets, {how}: bases only ({sides} per side, {basis_bytes} B), in row shards of "
             f"ceil(rows / {world}), no weight anchors"]
    if s.bases == "accumulate":
        notes.append(f"bases=accumulate: the union at its rank_budget={s.rank_budget:g} (worst case), kept only "
                     "as the stored sides")
    transient_note = (f"ShardedSubspaces per step: the largest of {n_buckets} projection buckets "
                      f"(sharded_bucket_mb={mb:g}; all-gathered right sides, products, fp32 work rows) "
                      f"{gib(bucket)} + W_before (every target's local rows in the weights' dtype, {param_bytes} B, "
                      f"across the optimizer step) {gib(before)}")
    return ShardedEstimate(state_unsharded=bases1, state_per_rank=bases, transient_unsharded=bucket1 + before1,
                           transient_per_rank=bucket + before, notes=notes, transient_note=transient_note)


