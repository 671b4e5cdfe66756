"""The infinite schedule's anneal (lr_schedule) goes through the loop's training step path:
svd_orthogonal's projection, HFT's masks and EWC's penalty act on its steps, replay mixes
its buffer in, and it continues a copy of the task's optimizer (moments included) without
touching the training optimizer or the training counters. A real ContinualLoop on a tiny
GPT-2 and the synthetic stream; the loop's own order: train, after_task, evaluation_weights."""
from __future__ import annotations

import pytest
import torch

from cl_runner.config.validate import validate
from cl_runner.strategies import build_strategy
from cl_runner.training.loop import ContinualLoop
from cl_runner.training.run import build_run
from tests.helpers import compose
from tests.unit.test_svd_orthogonal import logical, top_k

ANNEAL_STEPS = 3
TRAIN_STEPS = 3
BASE = ["logger=none", "trainer.progress_bar=false", "model=tiny_gpt2", "task_stream.train_size=24",
        "task_stream.test_size=4", "task_stream.order=[increment,decrement]", f"trainer.steps_per_task={TRAIN_STEPS}",
        "trainer.batch_size=4", "trainer.weight_decay=0.1", "trainer.lr=0.01",
        "lr_schedule.enabled=true", "lr_schedule.curve=infinite", f"lr_schedule.anneal_steps={ANNEAL_STEPS}",
        "lr_schedule.min_ratio=0.5", "lr_schedule.const_ratio=1.0"]


def make_loop(tmp_path, *overrides: str) -> ContinualLoop:
    """A loop on a run built as cl-run builds it, its folder under tmp_path."""
    cfg = validate(compose(BASE + list(overrides) + [f"output_dir={tmp_path / 'run'}"]))
    return ContinualLoop(build_run(cfg, build_strategy(cfg)))


def weights(loop: ContinualLoop) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loop.accelerator.unwrap_model(loop.model).named_parameters()}


def anneal_and_look(loop: ContinualLoop, t: int) -> dict[str, torch.Tensor]:
    """after_task then the evaluation context, as the loop runs them: the weights evaluated."""
    task = loop.stream[t]
    loop.strategy.after_task(t, task)
    with loop.strategy.evaluation_weights(t):
        return weights(loop)


def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------ svd_orthogonal
def test_annealed_svd_orthogonal_run_keeps_the_preserved_block(tmp_path):
    loop = make_loop(tmp_path, "strategy=svd_orthogonal", "strategy.first_task=constrained",
                     "strategy.rank.mode=ratio")
    svd = loop.strategy.base
    start = {tg.name: logical(tg, tg.param.detach().clone()) for tg in svd.targets}
    loop._train_task(0, loop.stream[0])
    trained = weights(loop)
    annealed = anneal_and_look(loop, 0)
    assert moved(trained, annealed)  # the anneal trained
    report = svd.report()
    params = dict(loop.accelerator.unwrap_model(loop.model).named_parameters())
    for tg in svd.targets:
        k_left, k_right = report["k_per_target"][tg.name][0]
        if tg.transposed:
            k_left, k_right = k_right, k_left
        u, v = top_k(start[tg.name], k_left)[0], top_k(start[tg.name], k_right)[1]
        name = next(n for n, p in params.items() if p is tg.param)
        delta = (logical(tg, annealed[name]) - start[tg.name]).double()
        scale = float(delta.abs().max())
        assert scale > 1e-5, tg.name
        assert float((u.T @ delta @ v).abs().max()) < 1e-4 * scale + 1e-6, tg.name
    assert not moved(trained, weights(loop))  # resume_from=trained: the trained weights are back


# ------------------------------------------------------------------ hft
@pytest.mark.parametrize("granularity", ["module", "row"])
def test_annealed_hft_run_leaves_the_frozen_half_bit_identical(tmp_path, granularity):
    loop = make_loop(tmp_path, "strategy=hft", f"strategy.granularity={granularity}")
    hft = loop.strategy.base
    start = weights(loop)
    loop._train_task(0, loop.stream[0])
    named = dict(loop.accelerator.unwrap_model(loop.model).named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    if granularity == "module":
        frozen = [(n, None, 0) for n in hft.frozen_parameters()]
    else:
        frozen = [(name_of[id(m.param)], m.index, m.dim) for m in hft._masks]
    assert frozen
    trained = weights(loop)
    annealed = anneal_and_look(loop, 0)
    assert moved(trained, annealed)
    for name, index, dim in frozen:
        if index is None:
            assert torch.equal(annealed[name], start[name]), name
        else:
            assert torch.equal(annealed[name].index_select(dim, index), start[name].index_select(dim, index)), name


# ------------------------------------------------------------------ ewc
@pytest.mark.parametrize("path", ["analytic", "autograd"])
def test_ewc_penalty_acts_on_the_anneal(tmp_path, monkeypatch, path):
    loop = make_loop(tmp_path, "strategy=ewc", "strategy.ewc_lambda=1000", f"strategy.penalty_gradient={path}")
    ewc = loop.strategy.base
    loop._train_task(0, loop.stream[0])
    anneal_and_look(loop, 0)  # task 0's Fisher and anchor
    loop._train_task(1, loop.stream[1])
    seen = []
    if path == "autograd":  # the penalty is a loss term with a graph
        original = ewc.penalty

        def recording(model, batch):
            value = original(model, batch)
            seen.append(value is not None and value.requires_grad and float(value.detach()) > 0)
            return value

        monkeypatch.setattr(ewc, "penalty", recording)
    else:  # its gradient is added to .grad after backward: the gradients must change
        original = ewc.add_penalty_gradient

        def recording():
            params = [p for p in loop.model.parameters() if p.grad is not None]
            before = [p.grad.clone() for p in params]
            original()
            seen.append(any(not torch.equal(b, p.grad) for b, p in zip(before, params)))

        monkeypatch.setattr(ewc, "add_penalty_gradient", recording)
    anneal_and_look(loop, 1)
    assert len(seen) >= ANNEAL_STEPS
    assert all(seen)


def test_trace_online_fisher_leaves_the_anneal_out(tmp_path):
    loop = make_loop(tmp_path, "strategy=ewc", "strategy.fisher=trace_online")
    ewc, schedule = loop.strategy.base, loop.strategy.members[1]
    loop._train_task(0, loop.stream[0])
    summed = {n: s.clone() for n, s in ewc.grad_sq_sum.items()}
    schedule.after_task(0, loop.stream[0])  # the anneal alone, before EWC's merge
    assert schedule.anneal_steps_done == ANNEAL_STEPS
    assert ewc.grad_steps == TRAIN_STEPS
    assert all(torch.equal(summed[n], s) for n, s in ewc.grad_sq_sum.items())


# ------------------------------------------------------------------ replay
def test_replay_examples_appear_in_the_anneal_batches(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, "replay.enabled=true", "replay.ratio=0.5")
    loop._train_task(0, loop.stream[0])
    anneal_and_look(loop, 0)
    loop._train_task(1, loop.stream[1])
    tasks = []
    collate = loop.collate

    def recording(examples, *args, **kwargs):
        tasks.extend(e.task for e in examples)
        return collate(examples, *args, **kwargs)

    monkeypatch.setattr(loop, "collate", recording)
    anneal_and_look(loop, 1)
    first, second = loop.stream[0].name, loop.stream[1].name
    assert tasks.count(first) == pytest.approx(len(tasks) / 2, abs=1)  # ratio 0.5 of each batch
    assert second in tasks
    assert loop.strategy.report()["replay"]["anneal_replayed_examples"][second] == tasks.count(first)


# ------------------------------------------------------------------ optimizer and counters
def adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


@pytest.mark.parametrize("resume_from", ["trained", "annealed"])
def test_anneal_continues_a_copy_of_the_task_optimizer(tmp_path, monkeypatch, resume_from):
    loop = make_loop(tmp_path, f"lr_schedule.resume_from={resume_from}")
    loop._train_task(0, loop.stream[0])
    training = loop.optimizer
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in training.state.items()}
    counters = (loop.progress.global_step, loop.progress.step, loop.progress.train_tokens,
                [list(c) for c in loop.progress.loss_curves])
    first_step_counts = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        first_step_counts.append(adam_steps(self))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    anneal_and_look(loop, 0)
    assert len(first_step_counts) == ANNEAL_STEPS
    assert first_step_counts[0] == {TRAIN_STEPS}  # the moments continue from the task's
    assert (loop.progress.global_step, loop.progress.step, loop.progress.train_tokens,
            loop.progress.loss_curves) == counters  # the anneal is not training
    if resume_from == "trained":
        assert loop.optimizer is training
        for p, s in training.state.items():
            assert all(torch.equal(v, before[id(p)][k]) for k, v in s.items())
    else:  # the anneal's optimizer goes on with the annealed weights
        assert adam_steps(loop.optimizer) == {TRAIN_STEPS + ANNEAL_STEPS}
        assert all(torch.equal(v, before[id(p)][k]) for p, s in training.state.items() for k, v in s.items())
