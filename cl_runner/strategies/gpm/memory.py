"""gpm's memory estimate: the bytes its code holds for a model's targets, from their shapes.

Upper bound: every target's basis at k = in (the most a basis can grow to; GPM's k grows
with the tasks and depends on the data, so no tighter bound exists before the run).
"""
from __future__ import annotations

from typing import Any

from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, gib


def projection_bytes(n_in: int, n_out: int, k: int, project_update: bool, param_bytes: int = FP32) -> int:
    """What ProjectionGroups holds for one target with an input basis of k columns (the
    other side none): the basis (in x k) or, when 2k > in, its complement (in x (in - k))
    with a dense anchor (out x in, weights' dtype); else the factored anchor W M (out x k)."""
    if k == 0:
        return 0
    if 2 * k > n_in:
        return n_in * (n_in - k) * FP32 + (n_out * n_in * param_bytes if project_update else 0)
    return n_in * k * FP32 + (n_out * k * FP32 if project_update else 0)


def worst_target_bytes(n_in: int, n_out: int, project_update: bool, param_bytes: int = FP32) -> int:
    """The stored M (in x k, fp32) plus ProjectionGroups' bytes, at the worst k: the sum is
    largest at k = in or just either side of in / 2."""
    half = n_in // 2
    return max(n_in * k * FP32 + projection_bytes(n_in, n_out, k, project_update, param_bytes)
               for k in {half, min(n_in, half + 1), n_in})


def estimate_gpm(s: Any, inputs: PlanInputs) -> StrategyEstimate:
    from cl_runner.strategies.base import plain_config
    from cl_runner.strategies.svd_orthogonal.targets import find_targets

    facts = inputs.facts
    targets = find_targets(facts.model, facts.family, plain_config(s.targets) or {})
    # (in, out) of the logical W: Conv1D stores W^T.
    dims = [(t.shape[0], t.shape[1]) if t.transposed else (t.shape[1], t.shape[0]) for t in targets]
    state = sum(worst_target_bytes(i, o, bool(s.project_update), inputs.param_bytes) for i, o in dims)
    grams = sum(i * i * FP32 for i, _ in dims)
    largest = max(i for i, _ in dims)
    eigh = 5 * largest * largest * 8  # fp64 C, P, P C (temporary), P C P and the eigenvectors of the widest target
    shapes = [tuple(t.shape) for t in targets]
    stack = max(shapes.count(sh) * sh[0] * sh[1] * FP32 for sh in set(shapes))
    transient = max(grams + eigh, 2 * stack)
    notes = [f"gpm: {len(targets)} targets: the stored input bases M (in x k, fp32) and ProjectionGroups' "
             f"bases/anchors, UPPER BOUND at k = in for every target (k grows per task with the data): "
             f"{gib(state)}; every process holds all of it"]
    note = (f"the activation pass after a task: every target's input Gram matrix (in x in, fp32) {gib(grams)} "
            f"+ the fp64 eigendecomposition of the widest ({largest}) {gib(eigh)}; or the fp32 stack of the "
            f"largest same-shape bucket in the weight projection, whichever is larger")
    return StrategyEstimate("gpm", state_bytes=state, transient_bytes=transient, notes=notes, transient_note=note)
