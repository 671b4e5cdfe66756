"""svd_orthogonal's projection_point (both | update | gradient) and measure_drift: what each
point projects, the drift of a task's update under AdamW, state and resume, the FSDP path,
the memory plan, the phases it marks."""
from __future__ import annotations

import io
import math

import pytest
import torch

from cl_runner.errors import ConfigError
from cl_runner.strategies.svd_orthogonal import SVDOrthogonal
from cl_runner.strategies.svd_orthogonal.drift import update_drift
from cl_runner.training import phases
from tests.unit.test_svd_orthogonal import (build, make_config, make_ctx, make_stream, new_optimizer,
                                            run_task, tiny, top_k, train_steps)

RATIO = {"rank": {"mode": "ratio"}}  # k = floor(32 * 0.75) = 24 on the tiny models


# --------------------------------------------------------------------- drift, by hand
def test_update_drift_on_hand_numbers():
    u = torch.tensor([[1.0], [0.0], [0.0]])  # e1 of R^3
    v = torch.tensor([[0.0], [1.0]])  # e2 of R^2
    delta = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])  # ||delta||^2 = 14
    block, forbidden = update_drift(delta, u, v, "two_sided")
    assert block == pytest.approx(2.0 / math.sqrt(14))  # u^T delta v = delta[0, 1]
    # forbidden^2 = ||u^T d||^2 + ||d v||^2 - block^2 = (1 + 4) + (4 + 0) - 4 = 5: row 0 and column 1
    assert forbidden == pytest.approx(math.sqrt(5 / 14))
    assert update_drift(delta, u, v, "high_block") == pytest.approx((2.0 / math.sqrt(14),) * 2)
    allowed = torch.tensor([[0.0, 0.0], [3.0, 0.0], [5.0, 0.0]])  # off row 0 and column 1
    assert update_drift(allowed, u, v) == (0.0, 0.0)
    assert update_drift(torch.zeros(3, 2), u, v) == (0.0, 0.0)


# --------------------------------------------------------------------- config
def test_projection_point_defaults_to_both_and_bad_values_name_the_key_and_choices():
    from tests.helpers import compose

    assert compose(["strategy=svd_orthogonal"]).strategy.projection_point == "both"
    with pytest.raises(ConfigError, match=r"strategy\.projection_point.*both, update, gradient"):
        SVDOrthogonal(make_config(projection_point="weights"))
    with pytest.raises(ValueError, match=r"strategy\.rank\.importance_batch_size"):
        SVDOrthogonal(make_config(**{"rank": {"importance_batch_size": 0}}))


def test_measure_drift_is_refused_under_fsdp():
    from tests.helpers import compose

    strategy = SVDOrthogonal(make_config(measure_drift=True))
    with pytest.raises(ConfigError, match=r"strategy\.measure_drift"):
        strategy.check_run_config(compose(["strategy=svd_orthogonal", "trainer.sharding=fsdp"]))
    strategy.check_run_config(compose(["strategy=svd_orthogonal", "evaluation.batch_size=7"]))
    assert strategy._eval_batch_size == 7


# --------------------------------------------------------------------- what each point does
def _one_step_views(point: str):
    """After one backward: (raw grads, grads after after_backward, weights before the step,
    weights after after_optimizer_step, strategy)."""
    strategy, model, ctx = build("llama", projection_point=point, **RATIO)
    strategy.before_task(0, ctx.stream[0])
    optimizer = new_optimizer(model)
    batch = ctx.collate(ctx.stream[0].train[:3])
    ctx.loss_fn(model, batch).backward()
    targets = strategy.targets
    raw = [tg.param.grad.detach().clone() for tg in targets]
    strategy.after_backward()
    projected = [tg.param.grad.detach().clone() for tg in targets]
    before = [tg.param.detach().clone() for tg in targets]
    strategy.before_optimizer_step()
    optimizer.step()
    strategy.after_optimizer_step()
    return raw, projected, before, [tg.param.detach().clone() for tg in targets], strategy


@pytest.mark.parametrize("point", ["both", "update", "gradient"])
def test_each_point_projects_what_it_says(point):
    raw, projected, before, after, strategy = _one_step_views(point)
    for tg, g0, g1, w0, w1 in zip(strategy.targets, raw, projected, before, after):
        u, v = top_k(w0, 24)
        grad_leak = float((u.T @ g1.double() @ v).abs().max()) / float(g0.abs().max())
        step_leak = float((u.T @ (w1 - w0).double() @ v).abs().max()) / float((w1 - w0).abs().max())
        if point == "update":
            assert torch.equal(g0, g1), tg.name  # the gradient is left as backward made it
        else:
            assert grad_leak < 1e-5, tg.name
        # AdamW with weight decay: the step leaves the allowed set unless the update is projected
        assert (step_leak > 1e-3) if point == "gradient" else (step_leak < 1e-5), (tg.name, step_leak)
    groups = strategy.groups
    assert bool(any(b.anchors for b in groups._buckets)) == (point != "gradient")  # no anchors without update
    attached = all(tg.param.grad is not None and tg.param.grad.data_ptr() in
                   {view.data_ptr() for b in groups._buckets for view in b.views} for tg in strategy.targets)
    assert attached == (point != "update")  # gradient views only where the gradient is projected


@pytest.mark.parametrize("point", ["both", "update", "gradient"])
def test_drift_over_a_task_under_adamw(point):
    """||Uᵀ ΔW V|| / ||ΔW|| after 4 AdamW steps (weight decay 0.1): ~0 for both and update,
    measurably not for gradient; measure_drift reports the same numbers."""
    logs: list = []
    strategy, model, ctx = build("llama", logs=logs, projection_point=point, measure_drift=True, **RATIO)
    start = {tg.name: tg.param.detach().clone() for tg in strategy.targets}
    run_task(strategy, model, ctx, 0, steps=4)
    blocks = []
    for tg in strategy.targets:
        u, v = top_k(start[tg.name], 24)
        delta = (tg.param.detach() - start[tg.name]).double()
        blocks.append(float((u.T @ delta @ v).norm() / delta.norm()))
    task = strategy.report()["tasks"][0]
    assert task["drift_block_max"] == pytest.approx(max(blocks), abs=1e-5)
    assert task["drift_forbidden_max"] >= task["drift_block_max"] - 1e-6
    if point == "gradient":
        assert min(blocks) > 1e-3 and task["drift_forbidden_mean"] > 1e-3
    else:
        assert max(blocks) < 1e-5 and task["drift_forbidden_max"] < 1e-5
    assert any("svd/drift_block_max" in entry for entry in logs)
    # the task start's copies were counted while the task ran (its record), and dropped after
    assert task["state_bytes"] > strategy.extra_state_bytes() + sum(p.numel() * 4 for p in start.values()) - 1
    assert strategy.report()["projection_point"] == point


# --------------------------------------------------------------------- state
@pytest.mark.parametrize("point", ["update", "gradient"])
def test_resume_mid_task_is_bit_identical(point):
    config = {"projection_point": point, **RATIO}
    strategy, model, ctx = build("gpt2", **config)
    strategy.before_task(0, ctx.stream[0])
    optimizer = new_optimizer(model)
    train_steps(strategy, model, ctx, 0, 2, optimizer)
    buffer = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "optimizer": optimizer.state_dict(),
                "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["strategy"]["projection_point"] == point

    model_b, kind = tiny("gpt2")
    model_b.load_state_dict(saved["model"])
    ctx_b = make_ctx(model_b, kind, "gpt2", ctx.stream)
    resumed = SVDOrthogonal(make_config(**config))
    resumed.setup(ctx_b)
    resumed.load_state_dict(saved["strategy"])
    optimizer_b = new_optimizer(model_b)
    optimizer_b.load_state_dict(saved["optimizer"])
    train_steps(strategy, model, ctx, 0, 3, optimizer)
    train_steps(resumed, model_b, ctx_b, 0, 3, optimizer_b)
    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n

    other = SVDOrthogonal(make_config(**{**config, "projection_point": "both"}))
    other.setup(make_ctx(tiny("gpt2")[0], kind, "gpt2", ctx.stream))
    with pytest.raises(ConfigError, match=rf"strategy\.projection_point=({point})"):
        other.load_state_dict(saved["strategy"])


def test_gradient_point_keeps_less_state_and_the_plan_counts_it():
    from accelerate import Accelerator
    from types import SimpleNamespace

    from cl_runner.config.validate import validate
    from cl_runner.memory_plan import build_plan, model_facts
    from cl_runner.models.build import build_model
    from cl_runner.strategies.base import StrategyContext
    from tests.helpers import compose

    held = {}
    for point in ("both", "gradient"):
        cfg = validate(compose(["logger=none", "model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                                "strategy.first_task=constrained", f"strategy.projection_point={point}"]))
        plan = build_plan(cfg, world_size=1, sharding="none", facts=model_facts(cfg.model))
        strategy = SVDOrthogonal(cfg.strategy)
        strategy.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=build_model(cfg.model).model,
                                       stream=None, model_kind="causal", model_family="llama", seed=0,
                                       trainer=cfg.trainer, loss_fn=None, collate=None))
        strategy.before_task(0, SimpleNamespace(name="t0"))
        held[point] = strategy.extra_state_bytes()
        assert held[point] == plan.row("strategy state").per_rank_bytes, point
    assert held["gradient"] == strategy._basis_bytes() < held["both"]  # bases only, no anchors


# --------------------------------------------------------------------- phases
def _marked(strategy):
    """Wrap the PHASES methods in phase(...), as scripts/profile_strategy.py does."""
    from cl_runner.strategies.svd_orthogonal.strategy import PHASES

    for method, name in PHASES.items():
        original = getattr(strategy, method)

        def marked(*args, _original=original, _name=name, **kwargs):
            with phases.phase(_name):
                return _original(*args, **kwargs)
        setattr(strategy, method, marked)
    return strategy


def test_phases_name_where_the_time_goes():
    strategy, model, ctx = build("llama", measure_drift=True)  # adaptive ranks: the importance pass runs
    with phases.recording() as table:
        run_task(_marked(strategy), model, ctx, 0, steps=2)
    seen = table.as_dict()
    for name in ("importance", "svd", "pack", "measure_drift"):
        assert seen[f"svd_orthogonal/{name}"]["calls"] == 1, name
    for name in ("project_gradient", "project_update"):
        assert seen[f"svd_orthogonal/{name}"]["calls"] == 2, name
    strategy, model, ctx = build("llama", projection_point="update", **RATIO)
    with phases.recording() as table:
        run_task(_marked(strategy), model, ctx, 0, steps=2)
    assert "svd_orthogonal/project_gradient" not in table.as_dict()
    assert table.as_dict()["svd_orthogonal/project_update"]["calls"] == 2


@pytest.mark.parametrize("point", ["update", "gradient"])
def test_points_on_the_fsdp_sharded_path(point):
    """ShardedSubspaces in a one-process gloo group: update keeps Uᵀ ΔW V = 0 without
    touching the gradient, gradient lets AdamW's update drift out of the allowed set."""
    import torch.distributed as dist

    from cl_runner.distributed.sharding import shard_model
    from tests.helpers import compose

    trainer = compose(["model=tiny_llama", "trainer.sharding=fsdp"]).trainer
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, kind = tiny("llama")
        model = shard_model(model, trainer)
        strategy = SVDOrthogonal(make_config(projection_point=point, **RATIO))
        ctx = make_ctx(model, kind, "llama", make_stream(1))
        strategy.setup(ctx)
        assert strategy.sharded is not None
        calls = {"grads": 0, "remember": 0}
        for name, key in (("project_grads_", "grads"), ("remember_weights", "remember")):
            original = getattr(strategy.sharded, name)

            def counted(original=original, key=key):
                calls[key] += 1
                original()
            setattr(strategy.sharded, name, counted)
        start = {tg.name: tg.param.detach().full_tensor().clone() for tg in strategy.targets}
        run_task(strategy, model, ctx, 0, steps=3)
        assert calls == ({"grads": 0, "remember": 3} if point == "update" else {"grads": 3, "remember": 0})
        for tg in strategy.targets:
            u, v = top_k(start[tg.name], 24)
            delta = (tg.param.detach().full_tensor() - start[tg.name]).double()
            leak = float((u.T @ delta @ v).norm() / delta.norm())
            assert (leak < 1e-5) if point == "update" else (leak > 1e-3), (tg.name, leak)
    finally:
        dist.destroy_process_group()


def test_projection_clock_waits_for_the_device_only_when_read(monkeypatch):
    """On CUDA the clock records an event pair per call and reads them when settled (or in
    bulk on a long task), never synchronising inside the step."""
    from cl_runner.strategies.svd_orthogonal import strategy as module

    class FakeEvent:
        waits = 0

        def __init__(self, enable_timing: bool) -> None:
            self.at = None

        def record(self) -> None:
            self.at = FakeEvent.now

        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            FakeEvent.waits += 1

        def elapsed_time(self, end) -> float:  # milliseconds
            return end.at - self.at

    FakeEvent.now = 0.0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)

    def work():
        FakeEvent.now += 250.0

    clock = module._ProjectionClock(1.0)
    for _ in range(3):
        clock.time(work, torch.device("cuda"))
    assert FakeEvent.waits == 0 and clock.seconds == 1.0
    assert clock.settle() == pytest.approx(1.75) and FakeEvent.waits == 3
    for _ in range(1024):  # a long task folds the finished pairs in without waiting
        clock.time(work, torch.device("cuda"))
    assert clock._pending == [] and clock.seconds == pytest.approx(1.75 + 256.0) and FakeEvent.waits == 3
    cpu = module._ProjectionClock()
    cpu.time(lambda: None, torch.device("cpu"))
    assert 0.0 <= cpu.settle() < 1.0
