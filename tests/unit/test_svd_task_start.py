"""svd_orthogonal's task start: the importance forwards batched like evaluation give the
batch-of-one importances (so the same k per layer), and the randomized SVD agrees with the
exact one within the tolerance docs/strategies.md states."""
from __future__ import annotations

import pytest
import torch

from cl_runner import ops
from cl_runner.strategies.svd_orthogonal import SVDOrthogonal
from cl_runner.strategies.svd_orthogonal.rank import adaptive_ranks, importance_order, layer_importances
from tests.unit.test_svd_orthogonal import build, make_collate, make_config, make_ctx, make_stream, run_task, tiny


# --------------------------------------------------------------------- batched importance
def _importances(family: str, batch_size: int, collate=None, n: int = 10):
    model, kind = tiny(family)
    stream = make_stream(1, n)
    strategy = SVDOrthogonal(make_config())
    ctx = make_ctx(model, kind, family, stream)
    strategy.setup(ctx)
    examples = list(stream[0].train)
    # uneven lengths, so the batches pad
    examples = [type(e)(e.prompt + "x" * (3 * i % 7), e.answer) for i, e in enumerate(examples)]
    return layer_importances(model, [tg.module for tg in strategy.targets], examples, collate or ctx.collate,
                             strategy._forward, ctx.accelerator.autocast, batch_size=batch_size), strategy


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_batched_importances_equal_the_batch_of_one(family):
    one, strategy = _importances(family, 1)
    batched, _ = _importances(family, 4)  # 10 examples: batches of 4, 4, 2 with padding
    assert batched == pytest.approx(one, abs=2e-6)
    dims = [tg.rank_dim for tg in strategy.targets]
    assert adaptive_ranks(batched, dims, 0.1, 0.8) == adaptive_ranks(one, dims, 0.1, 0.8)


def test_a_batch_without_attention_mask_runs_one_example_at_a_time():
    collate = make_collate("causal")

    def unmasked(examples):  # no mask to take the padding out of a batch's means
        return {k: v for k, v in collate(examples).items() if k != "attention_mask"}

    one, _ = _importances("llama", 1)
    fallback, _ = _importances("llama", 4, collate=unmasked)
    assert fallback == one  # every batch re-run per example: the batch-of-one numbers exactly


def test_importance_order_is_longest_first_and_stable():
    from cl_runner.streams.task import Example

    examples = [Example("ab", "c"), Example("abcd", "e"), Example("a", "bc"), Example("abc", "de")]
    assert importance_order(examples) == [1, 3, 0, 2]


def test_seq2seq_importances_run_one_example_a_forward():
    strategy, _, _ = build("t5", **{"rank": {"importance_batch_size": 8}})
    assert strategy._importance_batch_size() == 1
    strategy, _, _ = build("llama", **{"rank": {"importance_batch_size": 8}})
    assert strategy._importance_batch_size() == 8
    strategy, _, _ = build("llama")
    strategy._eval_batch_size = 20
    assert strategy._importance_batch_size() == 20




# --------------------------------------------------------------------- randomized vs exact SVD
def _matrix(m: int, n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))
    return ((u * spectrum) @ v.T).float()


def _residual(w: torch.Tensor, u: torch.Tensor) -> float:
    return float((w - u @ (u.T @ w)).norm() / w.norm())


@pytest.mark.parametrize("decay", [0.95, 0.99])
def test_randomized_captures_the_exact_energy_within_two_percent(decay):
    """The stated tolerance: with k + oversample <= r/2 (where `randomized` runs the range
    finder; above it, it is the exact SVD), the randomized bases leave a Frobenius residual
    ||W − UUᵀW|| / ||W|| within 2% of the exact SVD's. On a flat spectrum the top-k subspace
    itself is ill-determined (here s_13 / s_12 = decay), so the projectors may differ a lot
    while capturing the same energy: the tolerance is on energy, not on the projector."""
    spectrum = decay ** torch.arange(96, dtype=torch.float64)
    weights = [_matrix(192, 96, spectrum, seed) for seed in range(3)]
    exact = ops.top_k_bases(weights, [12] * 3, method="exact")
    randomized, stats = ops.top_k_bases(weights, [12] * 3, method="randomized", return_stats=True, seed=0)
    assert all(stats.randomized)
    for w, (ue, _), (ur, _) in zip(weights, exact, randomized):
        assert _residual(w, ur) <= 1.02 * _residual(w, ue)


def test_randomized_gives_the_exact_subspace_where_the_spectrum_has_a_gap():
    """With a clear gap after k (s_{k+1} <= 0.3 s_k) the subspaces agree: the projectors
    differ by < 2e-3 in spectral norm (fp32 bases)."""
    spectrum = 0.97 ** torch.arange(96, dtype=torch.float64)
    spectrum[12:] *= 0.3
    weights = [_matrix(192, 96, spectrum, seed) for seed in range(3)]
    exact = ops.top_k_bases(weights, [12] * 3, method="exact")
    randomized = ops.top_k_bases(weights, [12] * 3, method="randomized", seed=0)
    for (ue, ve), (ur, vr) in zip(exact, randomized):
        assert float(torch.linalg.matrix_norm(ue @ ue.T - ur @ ur.T, 2)) < 2e-3
        assert float(torch.linalg.matrix_norm(ve @ ve.T - vr @ vr.T, 2)) < 2e-3


def test_the_svd_method_changes_neither_k_nor_the_constraint():
    """The k per layer comes from the importances (or the ratio) before any SVD runs, so
    exact and randomized choose the same k; both keep Uᵀ ΔW V = 0 for their own bases."""
    reports = {}
    for method in ("exact", "randomized"):
        strategy, model, ctx = build("llama", svd_method=method, measure_drift=True,
                                     **{"rank": {"mode": "ratio", "unfreeze_ratio": 0.8}})  # k = 6 of 32
        run_task(strategy, model, ctx, 0, steps=2)
        reports[method] = strategy.report()
        assert reports[method]["tasks"][0]["drift_block_max"] < 1e-5
    assert reports["exact"]["k_per_target"] == reports["randomized"]["k_per_target"]
    exact, randomized = (reports[m]["tasks"][0]["svd_residual_fro_mean"] for m in ("exact", "randomized"))
    assert exact <= randomized <= 1.02 * exact


def test_randomized_is_chosen_per_target_not_per_shape(monkeypatch):
    """svd_method=randomized: a target whose own k + oversample <= r/2 is sketched even when
    another target of its shape needs the exact SVD; each weight is decomposed once."""
    calls = []
    real = ops.top_k_bases

    def recording(weights, ks, method="exact", **kwargs):
        calls.append((method, [tuple(w.shape) for w in weights], list(ks)))
        return real(weights, ks, method=method, **kwargs)

    monkeypatch.setattr(ops, "top_k_bases", recording)
    strategy, model, ctx = build("llama", svd_method="randomized", svd_oversample=2)
    strategy.before_task(0, ctx.stream[0])
    by_method = {method: (shapes, ks) for method, shapes, ks in calls}
    assert sorted(by_method) == ["exact", "randomized"] and len(calls) == 2
    assert sum(len(shapes) for shapes, _ in by_method.values()) == len(strategy.targets)
    for method, (shapes, ks) in by_method.items():
        for shape, k in zip(shapes, ks):
            assert (2 * (k + 2) <= min(shape)) == (method == "randomized"), (method, shape, k)
    sketched = {shape for shape, _ in zip(*by_method["randomized"])}
    assert sketched & set(by_method["exact"][0])  # one shape, both methods


def test_auto_measures_each_shape_once_and_keeps_the_faster_method_within_tolerance(monkeypatch):
    """svd_method=auto: the first task start runs both methods on each shape's sketchable
    targets and keeps, per shape, the faster one whose residual is within tolerance; later
    task starts run the kept method only; the choice survives a checkpoint."""
    calls = []
    real = ops.top_k_bases
    clock = {"t": 0.0}

    def recording(weights, ks, method="exact", **kwargs):
        calls.append((method, tuple(weights[0].shape), len(weights)))
        clock["t"] += 1.0 if method == "randomized" else 5.0  # the sketch "runs" 5x faster
        return real(weights, ks, method=method, **kwargs)

    monkeypatch.setattr(ops, "top_k_bases", recording)
    import cl_runner.strategies.svd_orthogonal.strategy as module
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock["t"])
    # random weights have a flat spectrum: the sketch leaves ~2% more of W out than the SVD
    strategy, model, ctx = build("llama", svd_method="auto", svd_oversample=2, svd_auto_tolerance=0.05)
    strategy.before_task(0, ctx.stream[0])
    choices = strategy.report()["svd_choices"]
    assert choices and all(c["method"] == "randomized" and c["randomized_seconds"] < c["exact_seconds"]
                           for c in choices.values())
    assert all(0 <= c["residual_excess"] <= 0.05 for c in choices.values())
    measured = {shape for method, shape, _ in calls if method == "randomized"}
    assert {"x".join(map(str, s)) for s in measured} == set(choices)
    # a tolerance nothing meets: exact everywhere, still measured once per shape
    strict, _, ctx2 = build("llama", svd_method="auto", svd_oversample=2, svd_auto_tolerance=0.0)
    clock["t"] = 0.0
    strict.before_task(0, ctx2.stream[0])
    assert {c["method"] for c in strict.report()["svd_choices"].values()} == {"exact"}
    # the next task start: the kept method alone, no second measurement
    strategy.after_task(0, ctx.stream[0])
    calls.clear()
    strategy.before_task(1, ctx.stream[1])
    # each shape: its kept method for the targets the sketch may take, exact for those whose k
    # grew past r/2; one call each, nothing measured again
    assert strategy.report()["svd_choices"] == choices
    pairs = [(method, shape) for method, shape, _ in calls]
    assert len(pairs) == len(set(pairs)) and any(method == "randomized" for method, _ in pairs)
    restored, _, _ = build("llama", svd_method="auto", svd_oversample=2, svd_auto_tolerance=0.05)
    restored.load_state_dict(strategy.state_dict())
    assert restored.report()["svd_choices"] == choices
