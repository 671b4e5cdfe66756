"""LR re-warming add-on: the curves at given steps, per-task resets, the infinite
schedule's constant phase and its anneal before evaluation (the anneal's steps themselves,
through the loop: tests/unit/test_anneal.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.lr_schedule import (LRSchedule, LRScheduleConfig, anneal_multiplier, infinite_first_task,
                                              rewarm_cosine)
from cl_runner.streams.task import Example, Task, TaskStream


def make_task(name: str, n: int = 10) -> Task:
    train = [Example(f"{name}{i}", "x", name) for i in range(n)]
    return Task(name, train, train[:2])


def make_ctx(model: nn.Module | None = None, anneal=None, tasks: int = 3) -> StrategyContext:
    return StrategyContext(
        accelerator=Accelerator(cpu=True), model=model or nn.Linear(1, 1), stream=TaskStream("s", [make_task(c) for c in "abc"[:tasks]]),
        model_kind="classifier", model_family="test", seed=0,
        trainer=SimpleNamespace(lr=1e-2, batch_size=4, max_grad_norm=None),
        loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}, anneal=anneal)


def make(**options) -> LRSchedule:
    return LRSchedule(OmegaConf.structured(LRScheduleConfig(enabled=True, **options)))


# ---------------------------------------------------------------- rewarm_cosine
def test_rewarm_cosine_at_given_steps():
    # 201 steps, warmup_frac 0.05: W = round(10.05) = 10 warmup steps, cosine over steps 10..200.
    curve = lambda s: rewarm_cosine(s, 201, warmup_frac=0.05, min_ratio=0.1)  # noqa: E731
    assert curve(0) == pytest.approx(0.1)  # 1 / 10
    assert curve(4) == pytest.approx(0.5)
    assert curve(9) == pytest.approx(1.0)  # warmup end
    assert curve(10) == pytest.approx(1.0)  # cosine start
    assert curve(105) == pytest.approx(0.55)  # midpoint: 0.1 + 0.9 * 0.5
    assert curve(200) == pytest.approx(0.1)  # last step = min_ratio
    assert curve(250) == pytest.approx(0.1)  # clamped past the end


def test_rewarm_cosine_without_warmup_starts_at_peak():
    assert rewarm_cosine(0, 11, warmup_frac=0.0, min_ratio=0.0) == pytest.approx(1.0)
    assert rewarm_cosine(5, 11, warmup_frac=0.0, min_ratio=0.0) == pytest.approx(0.5)
    assert rewarm_cosine(10, 11, warmup_frac=0.0, min_ratio=0.0) == pytest.approx(0.0)


def test_rewarm_cosine_restarts_every_task():
    s = make(curve="rewarm_cosine", warmup_frac=0.1, min_ratio=0.1)
    s.setup(make_ctx())
    first, second = s.lr_lambda(0, 100), s.lr_lambda(1, 50)
    assert first(0) == pytest.approx(0.1) and second(0) == pytest.approx(0.2)  # 1/10 and 1/5: warmed up again
    assert first(99) == pytest.approx(0.1) and second(49) == pytest.approx(0.1)  # decayed again


def test_constant():
    s = make(curve="constant")
    s.setup(make_ctx())
    assert {s.lr_lambda(t, 10)(k) for t in range(3) for k in range(10)} == {1.0}


# ---------------------------------------------------------------- infinite
def test_infinite_first_task_cosine_cooldown():
    # 100 steps: warmup W = 10, cooldown ends at C = 50; const 0.5.
    curve = lambda s: infinite_first_task(s, 100, 0.1, 0.5, 0.5, "cosine")  # noqa: E731
    assert curve(9) == pytest.approx(1.0)
    assert curve(10) == pytest.approx(1.0)
    assert curve(30) == pytest.approx(0.75)  # cooldown midpoint: 0.5 + 0.5 * 0.5
    assert curve(50) == pytest.approx(0.5) and curve(99) == pytest.approx(0.5)


def test_infinite_first_task_inv_sqrt_cooldown():
    curve = lambda s: infinite_first_task(s, 100, 0.1, 0.5, 0.5, "inv_sqrt", timescale=8.0)  # noqa: E731
    # x = 0.5 at step 30: h(0.5) = 1/sqrt(5) - 1, h(1) = 1/3 - 1.
    expected = 1.0 + (0.5 - 1.0) * (1 / math.sqrt(5) - 1) / (1 / 3 - 1)
    assert curve(10) == pytest.approx(1.0)
    assert curve(30) == pytest.approx(expected)
    assert curve(50) == pytest.approx(0.5)
    values = [curve(k) for k in range(10, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone cooldown
    assert expected < 0.75  # inverse sqrt falls faster early than the cosine


def test_infinite_is_constant_after_the_first_task():
    s = make(curve="infinite", warmup_frac=0.1, cooldown_frac=0.5, const_ratio=0.4)
    s.setup(make_ctx())
    first = s.lr_lambda(0, 100)
    assert first(0) == pytest.approx(0.1) and first(99) == pytest.approx(0.4)
    for t in (1, 2):
        curve = s.lr_lambda(t, 30)
        assert {curve(k) for k in range(30)} == {0.4}  # no re-warming


def test_infinite_first_task_survives_resume():
    s = make(curve="infinite", warmup_frac=0.1)
    s.setup(make_ctx())
    s.lr_lambda(0, 100)
    resumed = make(curve="infinite", warmup_frac=0.1)
    resumed.setup(make_ctx())
    resumed.load_state_dict(s.state_dict())
    assert resumed.lr_lambda(0, 100)(0) == pytest.approx(0.1)  # still the first task's warmup
    assert resumed.lr_lambda(1, 100)(0) == pytest.approx(0.5)


def test_anneal_multiplier_decays_exponentially_to_min():
    # 4 steps from 0.5 to 0.05: factor (0.1) ** (1/4) per step.
    values = [anneal_multiplier(k, 4, const_ratio=0.5, min_ratio=0.05) for k in range(4)]
    assert values == pytest.approx([0.5 * 0.1 ** (k / 4) for k in (1, 2, 3, 4)])
    assert values[-1] == pytest.approx(0.05)


class Recorder:
    """Stands in for the loop's anneal: records the batches, lr factors and whether the
    optimizer copy is kept; moves the weights."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self.calls = []

    def __call__(self, t, batches, factor_at, keep_optimizer=False):
        self.calls.append(([len(b) for b in batches], [factor_at(k) for k in range(len(batches))], keep_optimizer))
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)
        return [0.0] * len(batches)


@pytest.mark.parametrize("resume_from", ["trained", "annealed"])
def test_infinite_anneals_a_copy_before_evaluation(resume_from):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    recorder = Recorder(model)
    s = make(curve="infinite", anneal_steps=3, const_ratio=0.5, min_ratio=0.1, resume_from=resume_from)
    s.setup(make_ctx(model, recorder))
    s.after_task(0, s.ctx.stream[0])  # the anneal; the base's after_task sees these weights
    assert float(model.weight.detach()) == (2.0 if resume_from == "trained" else 3.0)
    with s.evaluation_weights(0):
        assert float(model.weight.detach()) == 3.0  # evaluated: the annealed weights
    assert float(model.weight.detach()) == (2.0 if resume_from == "trained" else 3.0)
    sizes, factors, keep = recorder.calls[0]
    assert sizes == [4, 4, 4]  # the global batch (trainer.batch_size x 1 process) per anneal step
    assert factors == pytest.approx([anneal_multiplier(k, 3, 0.5, 0.1) for k in range(3)])
    assert keep == (resume_from == "annealed")  # the anneal's optimizer copy goes on with its weights
    s.after_task(1, s.ctx.stream[1])
    with s.evaluation_weights(1):
        pass
    assert s.report()["anneal_steps"] == 6 and s.report()["anneal_examples"] == 24
    assert s.state_dict()["anneal_steps_done"] == 6


def test_anneal_batches_are_seeded():
    s = make(curve="infinite", anneal_steps=5)
    s.setup(make_ctx())
    again = make(curve="infinite", anneal_steps=5)
    again.setup(make_ctx())
    assert s.anneal_batches(1) == again.anneal_batches(1)
    assert {e.task for b in s.anneal_batches(1) for e in b} == {"b"}


def test_anneal_steps_take_grad_accum_micro_batches_of_the_global_batch():
    recorder = Recorder(nn.Linear(1, 1))
    s = make(curve="infinite", anneal_steps=2)
    ctx = make_ctx(recorder.model, recorder)
    ctx.trainer.grad_accum = 3
    s.setup(ctx)
    s.after_task(0, ctx.stream[0])
    sizes, _, _ = recorder.calls[0]
    assert sizes == [4] * 6  # 2 optimizer steps x 3 micro-batches, as a training step takes


def test_rewarm_does_not_anneal():
    recorder = Recorder()
    s = make(curve="rewarm_cosine")
    s.setup(make_ctx(anneal=recorder))
    s.after_task(0, s.ctx.stream[0])
    with s.evaluation_weights(0):
        pass
    assert recorder.calls == [] and "anneal_steps" not in s.report()


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("key,value,match", [
    ("curve", "step", r"lr_schedule\.curve.*'step'.*rewarm_cosine, constant, infinite"),
    ("cooldown", "linear", r"lr_schedule\.cooldown.*cosine, inv_sqrt"),
    ("resume_from", "best", r"lr_schedule\.resume_from.*trained, annealed"),
    ("warmup_frac", 1.5, r"lr_schedule\.warmup_frac.*\[0\.0, 1\.0\]"),
    ("min_ratio", 0.0, r"lr_schedule\.min_ratio"),
    ("anneal_steps", -1, r"lr_schedule\.anneal_steps"),
])
def test_bad_options(key, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{key: value})
