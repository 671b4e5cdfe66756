"""EWC on a 2-parameter model worked out by hand: Fisher (both granularities), penalty,
online accumulation, separate mode, sampled Fisher, state round-trip."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.ewc import EWCConfig, ElasticWeightConsolidation, sample_labels
from cl_runner.streams.task import Example, Task, TaskStream


class Line(nn.Module):
    """y = w x + b with w = 1, b = 0; loss = mean (w x + b - y)^2."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x + self.b


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([float(e.prompt) for e in examples]), "y": torch.tensor([float(e.answer) for e in examples])}


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


# Residuals r = x - y at w = 1, b = 0: 1, 1, -1, 0. Per example, dL/dw = 2 r x and
# dL/db = 2 r: (2, 2), (4, 2), (-2, -2), (0, 0).
POINTS = [Example("1", "0"), Example("2", "1"), Example("1", "2"), Example("3", "3")]


def stream(*train: list[Example]) -> TaskStream:
    return TaskStream("s", [Task(f"t{i}", list(ex), list(ex)) for i, ex in enumerate(train)])


def make(model: nn.Module, tasks: TaskStream, kind: str = "classifier", loss_fn=mse, collate_fn=collate,
         **options) -> ElasticWeightConsolidation:
    strategy = ElasticWeightConsolidation(OmegaConf.structured(EWCConfig(**options)))
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=model, stream=tasks, model_kind=kind, model_family="test",
        seed=0, trainer=SimpleNamespace(lr=1e-3), loss_fn=loss_fn, collate=collate_fn))
    return strategy


def values(d: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(v) for n, v in d.items()}


def set_params(model: Line, w: float, b: float) -> None:
    with torch.no_grad():
        model.w.fill_(w)
        model.b.fill_(b)


def test_empirical_fisher_per_sample_by_hand():
    s = make(Line(), stream(POINTS, POINTS), granularity="sample")
    # F_w = (4 + 16 + 4 + 0) / 4 = 6, F_b = (4 + 4 + 4 + 0) / 4 = 3
    assert values(s.fisher_diagonal(0, POINTS)) == pytest.approx({"w": 6.0, "b": 3.0})


def test_empirical_fisher_per_batch_by_hand():
    s = make(Line(), stream(POINTS, POINTS), granularity="batch", fisher_batch_size=2)
    # Batch gradients are means: [1, 2] -> (3, 2); [3, 4] -> (-1, -1).
    # F_w = (9 + 1) / 2 = 5, F_b = (4 + 1) / 2 = 2.5
    assert values(s.fisher_diagonal(0, POINTS)) == pytest.approx({"w": 5.0, "b": 2.5})


def test_fisher_samples_caps_the_pass_with_a_seeded_subset():
    s = make(Line(), stream(POINTS, POINTS), fisher_samples=2)
    chosen = s.fisher_examples_for(0, POINTS)
    assert len(chosen) == 2 and chosen == make(Line(), stream(POINTS, POINTS), fisher_samples=2).fisher_examples_for(0, POINTS)
    assert [POINTS.index(e) for e in chosen] == sorted(POINTS.index(e) for e in chosen)  # dataset order


def test_fisher_pass_restores_train_mode_and_leaves_zero_grads():
    model = Line()
    model.train()
    s = make(model, stream(POINTS, POINTS))
    s.fisher_diagonal(0, POINTS)
    assert model.training
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in model.parameters())


def test_only_trainable_parameters_get_a_fisher():
    model = Line()
    model.b.requires_grad_(False)
    s = make(model, stream(POINTS, POINTS), granularity="sample")
    assert values(s.fisher_diagonal(0, POINTS)) == pytest.approx({"w": 6.0})


@pytest.mark.parametrize("path", ["analytic", "autograd"])
def test_penalty_by_hand_and_its_gradient(path):
    model = Line()
    s = make(model, stream(POINTS, POINTS), granularity="batch", fisher_batch_size=2, ewc_lambda=2.0,
             penalty_gradient=path)
    assert s.penalty_value() is None and s.penalty(model, {}) is None  # nothing consolidated in task 0
    s.after_task(0, s.ctx.stream[0])  # F = (5, 2.5), theta* = (1, 0)
    set_params(model, 2.0, 1.0)
    # (2 / 2) * (5 * (2 - 1)^2 + 2.5 * (1 - 0)^2) = 7.5
    assert float(s.penalty_value()) == pytest.approx(7.5)
    penalty = s.penalty(model, {})
    if path == "autograd":
        penalty.backward()
    else:
        assert penalty is None  # no graph: the gradient is added after backward
    s.after_backward()
    # d/dtheta = lambda F (theta - theta*) = 2 * (5, 2.5) * (1, 1)
    assert (float(model.w.grad), float(model.b.grad)) == pytest.approx((10.0, 5.0))


def test_analytic_gradient_adds_to_the_loss_gradient_and_carries_the_loss_scale(monkeypatch):
    model = Line()
    s = make(model, stream(POINTS, POINTS), granularity="batch", fisher_batch_size=2, ewc_lambda=2.0)
    s.after_task(0, s.ctx.stream[0])
    set_params(model, 2.0, 1.0)
    model.w.grad, model.b.grad = torch.tensor(1.0), None  # b untouched by the loss: gets the penalty's alone
    s.after_backward()
    assert (float(model.w.grad), float(model.b.grad)) == pytest.approx((11.0, 5.0))
    # fp16: the accumulated gradients carry the loss scale until clipping / the step unscale them.
    scaler = SimpleNamespace(get_scale=lambda: 1024.0, is_enabled=lambda: True)
    monkeypatch.setattr(s.ctx.accelerator, "scaler", scaler, raising=False)
    model.w.grad.zero_(), model.b.grad.zero_()
    s.after_backward()
    assert (float(model.w.grad), float(model.b.grad)) == pytest.approx((10240.0, 5120.0))


def test_bf16_weights_get_the_analytic_gradient_in_their_dtype():
    model = Line().to(torch.bfloat16)
    s = make(model, stream(POINTS, POINTS), granularity="batch", fisher_batch_size=2, ewc_lambda=2.0)
    s.after_task(0, s.ctx.stream[0])
    assert all(f.dtype == torch.float32 for f in s.fishers[0].values())
    set_params(model, 2.0, 1.0)
    s.after_backward()
    assert model.w.grad.dtype == torch.bfloat16
    assert (float(model.w.grad), float(model.b.grad)) == pytest.approx((10.0, 5.0))


def test_online_accumulates_with_gamma_and_moves_the_anchor():
    model = Line()
    second = [Example("1", "0")]  # r = 1: per-example gradient (2, 2) at theta = (1, 0)
    s = make(model, stream(POINTS, second, POINTS), granularity="sample", gamma=0.5)
    s.after_task(0, s.ctx.stream[0])  # F = (6, 3)
    set_params(model, 1.0, 0.0)
    s.after_task(1, s.ctx.stream[1])  # F_new = (4, 4): F = 0.5 * (6, 3) + (4, 4) = (7, 5.5)
    assert len(s.fishers) == 1 and values(s.fishers[0]) == pytest.approx({"w": 7.0, "b": 5.5})
    set_params(model, 3.0, -1.0)
    s.after_task(2, s.ctx.stream[2])  # the last task: nothing trains after it, no Fisher pass
    assert values(s.fishers[0]) == pytest.approx({"w": 7.0, "b": 5.5})
    assert values(s.anchors[0]) == pytest.approx({"w": 1.0, "b": 0.0})
    assert s.extra_state_bytes() == 4 * 4  # F and theta*, two fp32 scalars each


def test_online_anchor_is_the_weights_after_the_last_task():
    model = Line()
    s = make(model, stream(POINTS, POINTS, POINTS), granularity="sample")
    s.after_task(0, s.ctx.stream[0])
    set_params(model, 2.0, 1.0)
    s.after_task(1, s.ctx.stream[1])
    assert values(s.anchors[0]) == pytest.approx({"w": 2.0, "b": 1.0})


def test_separate_mode_keeps_one_pair_per_task():
    model = Line()
    second = [Example("1", "0")]
    s = make(model, stream(POINTS, second, POINTS), granularity="sample", mode="separate", ewc_lambda=1.0)
    s.after_task(0, s.ctx.stream[0])  # F_0 = (6, 3), theta*_0 = (1, 0)
    set_params(model, 2.0, 0.0)  # r = 2 x - 0 = 2 for x=1: gradient (4, 4) -> F_1 = (16, 16), theta*_1 = (2, 0)
    s.after_task(1, s.ctx.stream[1])
    assert [values(f) for f in s.fishers] == [pytest.approx({"w": 6.0, "b": 3.0}), pytest.approx({"w": 16.0, "b": 16.0})]
    set_params(model, 3.0, 1.0)
    # 0.5 * [6 * (3-1)^2 + 3 * 1^2] + 0.5 * [16 * (3-2)^2 + 16 * 1^2] = 0.5 * 27 + 0.5 * 32
    assert float(s.penalty_value()) == pytest.approx(29.5)
    assert s.extra_state_bytes() == 8 * 4


def test_normalize_fisher_divides_by_its_mean():
    s = make(Line(), stream(POINTS, POINTS), granularity="sample", normalize_fisher=True)
    s.after_task(0, s.ctx.stream[0])  # (6, 3) / 4.5
    assert values(s.fishers[0]) == pytest.approx({"w": 6 / 4.5, "b": 3 / 4.5})
    assert s.report()["fisher_mean_per_task"] == pytest.approx([4.5])  # the raw scale, for choosing lambda


def test_state_round_trip():
    model = Line()
    s = make(model, stream(POINTS, POINTS), granularity="sample")
    s.after_task(0, s.ctx.stream[0])
    resumed = make(model, stream(POINTS, POINTS), granularity="sample")
    resumed.load_state_dict(s.state_dict())
    set_params(model, 2.0, 2.0)
    assert float(resumed.penalty_value()) == pytest.approx(float(s.penalty_value()))


# ---------------------------------------------------------------- sampled Fisher
class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(x))


def class_collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    x = torch.tensor([[float(v) for v in e.prompt.split()] for e in examples])
    labels = torch.tensor([int(e.answer) for e in examples])
    mask = torch.tensor([[True, True, False]] * len(examples))  # class 2 is not this task's
    return {"x": x, "labels": labels, "label_mask": mask}


def class_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["x"]).logits.masked_fill(~batch["label_mask"], float("-inf"))
    return F.cross_entropy(logits, batch["labels"])


CLASS_POINTS = [Example(f"{i % 3} {i % 5 - 2}", str(i % 2)) for i in range(32)]


def test_sampled_labels_stay_in_the_allowed_classes():
    batch = class_collate(CLASS_POINTS)
    g = torch.Generator().manual_seed(0)
    sampled = sample_labels(TinyClassifier(), batch, "classifier", g)
    assert set(sampled["labels"].tolist()) <= {0, 1} and sampled["labels"].shape == batch["labels"].shape
    assert torch.equal(sampled["x"], batch["x"])


def test_sampled_labels_causal_follow_the_shift():
    class Bigram(nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            # Position i puts all mass on token (input_ids[i] + 1) % 5.
            logits = torch.full((*input_ids.shape, 5), -1e9)
            logits.scatter_(-1, ((input_ids + 1) % 5).unsqueeze(-1), 0.0)
            return SimpleNamespace(logits=logits)

    batch = {"input_ids": torch.tensor([[0, 1, 3, 0]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 3, 0]])}
    sampled = sample_labels(Bigram(), batch, "causal")
    # label 2 comes from logits at position 1 (token 1 -> 2), label 3 from position 2 (3 -> 4)
    assert sampled["labels"].tolist() == [[-100, -100, 2, 4]]


def test_sampled_fisher_runs_and_differs_from_empirical():
    tasks = stream(CLASS_POINTS, CLASS_POINTS)
    empirical = make(TinyClassifier(), tasks, loss_fn=class_loss, collate_fn=class_collate, fisher="empirical")
    sampled = make(TinyClassifier(), tasks, loss_fn=class_loss, collate_fn=class_collate, fisher="sampled")
    f_emp, f_samp = empirical.fisher_diagonal(0, CLASS_POINTS), sampled.fisher_diagonal(0, CLASS_POINTS)
    assert set(f_samp) == {"linear.weight", "linear.bias"}
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in f_samp.values())
    assert not torch.allclose(f_emp["linear.weight"], f_samp["linear.weight"])
    again = make(TinyClassifier(), tasks, loss_fn=class_loss, collate_fn=class_collate, fisher="sampled")
    assert torch.equal(again.fisher_diagonal(0, CLASS_POINTS)["linear.weight"], f_samp["linear.weight"])  # seeded
    # The class the task does not use gets no Fisher in the head's row 2.
    assert float(f_samp["linear.weight"][2].abs().sum()) == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("mode", "offline", r"strategy\.mode.*'offline'.*online, separate"),
    ("fisher", "true", r"strategy\.fisher.*empirical, sampled, trace_online"),
    ("granularity", "token", r"strategy\.granularity.*batch, sample"),
    ("gamma", 1.5, r"strategy\.gamma"),
    ("ewc_lambda", -1.0, r"strategy\.ewc_lambda"),
    ("fisher_samples", 0, r"strategy\.fisher_samples"),
    ("penalty_gradient", "graph", r"strategy\.penalty_gradient"),
])
def test_bad_options(key, value, match):
    with pytest.raises(ValueError, match=match):
        ElasticWeightConsolidation(OmegaConf.structured(EWCConfig(**{key: value})))


# ---------------------------------------------------------------- TRACE's online Fisher
def trace_step(s: ElasticWeightConsolidation, model: nn.Module, examples: list[Example],
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step the way the loop runs it: backward of loss + penalty, then
    after_backward; returns the gradients the hook saw."""
    batch = collate(examples)
    penalty = s.penalty(model, batch)
    objective = mse(model, batch) if penalty is None else mse(model, batch) + penalty
    objective.backward()
    s.after_backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=False)
    return grads


def no_fisher_pass(*args, **kwargs):
    raise AssertionError("trace_online must not run a Fisher pass")


@pytest.mark.parametrize("path", ["analytic", "autograd"])
def test_trace_online_fisher_by_hand(monkeypatch, path):
    model = Line()
    s = make(model, stream(POINTS, POINTS, POINTS), fisher="trace_online", ewc_lambda=2.0, penalty_gradient=path)
    monkeypatch.setattr(s, "fisher_diagonal", no_fisher_pass)
    # Task 0 (no penalty): batch gradients (3, 2) and (-1, -1): F = ((9, 4) + (1, 1)) / 2.
    trace_step(s, model, POINTS[:2])
    trace_step(s, model, POINTS[2:])
    s.after_task(0, s.ctx.stream[0])
    assert values(s.fishers[0]) == pytest.approx({"w": 5.0, "b": 2.5})
    assert values(s.anchors[0]) == pytest.approx({"w": 1.0, "b": 0.0})
    assert s.grad_steps == 0 and not s.grad_sq_sum
    # Task 1 at theta = (2, 1), one step on x = 1, y = 0: loss gradient 2 * 3 * (1, 1) = (6, 6),
    # penalty gradient lambda F (theta - theta*) = 2 * (5, 2.5) = (10, 5): full objective (16, 11).
    # TRACE's merge: F = (F_prev + sum g^2) / steps = ((5, 2.5) + (256, 121)) / 1.
    set_params(model, 2.0, 1.0)
    grads = trace_step(s, model, [Example("1", "0")])
    assert values(grads) == pytest.approx({"w": 16.0, "b": 11.0})
    s.after_task(1, s.ctx.stream[1])
    assert values(s.fishers[0]) == pytest.approx({"w": 261.0, "b": 123.5})
    assert values(s.anchors[0]) == pytest.approx({"w": 2.0, "b": 1.0})
    assert s.report()["fisher_mean_per_task"] == pytest.approx([3.75, 188.5])  # the tasks' own S / n


def test_trace_online_is_the_mean_of_squared_full_objective_gradients(monkeypatch):
    model = Line()
    s = make(model, stream(POINTS, POINTS, POINTS), fisher="trace_online", ewc_lambda=3.0)
    monkeypatch.setattr(s, "fisher_diagonal", no_fisher_pass)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = [trace_step(s, model, POINTS[i:i + 2], optimizer) for i in range(3)]
    s.after_task(0, s.ctx.stream[0])
    first = {n: torch.stack([g[n] ** 2 for g in seen]).mean() for n in ("w", "b")}
    assert values(s.fishers[0]) == pytest.approx(values(first))
    seen = [trace_step(s, model, POINTS[i:i + 2], optimizer) for i in (2, 0)]
    assert float(s.penalty_value()) > 0  # the penalty is in play
    s.after_task(1, s.ctx.stream[1])
    expected = {n: (first[n] + sum(g[n] ** 2 for g in seen)) / 2 for n in ("w", "b")}
    assert values(s.fishers[0]) == pytest.approx(values(expected))
    assert values(s.anchors[0]) == pytest.approx({n: float(p.detach()) for n, p in model.named_parameters()})


def test_trace_online_state_round_trip_mid_task_continues_the_accumulation():
    import copy

    batches = [POINTS[:2], POINTS[1:3], POINTS[2:], POINTS[:1]]

    def run(resume_after: int | None) -> dict[str, float]:
        torch.manual_seed(0)
        model = Line()
        s = make(model, stream(POINTS, POINTS, POINTS), fisher="trace_online", ewc_lambda=1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        trace_step(s, model, POINTS[:2], optimizer)
        s.after_task(0, s.ctx.stream[0])
        for i, examples in enumerate(batches):
            if i == resume_after:
                state = copy.deepcopy(s.state_dict())
                assert state["grad_steps"] == i and set(state["grad_sq_sum"]) == {"w", "b"}
                s = make(model, stream(POINTS, POINTS, POINTS), fisher="trace_online", ewc_lambda=1.0)
                s.load_state_dict(state)
            trace_step(s, model, examples, optimizer)
        s.after_task(1, s.ctx.stream[1])
        return values(s.fishers[0])

    straight = run(None)
    assert run(2) == straight  # bit for bit


def test_trace_online_clamps_like_trace_and_skips_the_last_task(monkeypatch):
    model = Line()
    s = make(model, stream(POINTS, POINTS), fisher="trace_online")
    monkeypatch.setattr(s, "fisher_diagonal", no_fisher_pass)
    s.ctx.trainer = SimpleNamespace(lr=1e-3, max_grad_norm=2.5)
    trace_step(s, model, POINTS[:2])  # gradient (3, 2) -> entries clamped to +-2.5
    assert values(s.grad_sq_sum) == pytest.approx({"w": 6.25, "b": 4.0})
    assert s.extra_state_bytes() == 2 * 4
    s.after_task(1, s.ctx.stream[1])  # the last task: no Fisher kept, the sum dropped
    assert not s.fishers and not s.grad_sq_sum and s.grad_steps == 0


def test_trace_online_config():
    s = ElasticWeightConsolidation(OmegaConf.structured(EWCConfig(fisher="trace_online")))
    assert s.config.fisher == "trace_online"
    for key, value in (("mode", "separate"), ("gamma", 0.5), ("normalize_fisher", True)):
        with pytest.raises(ValueError, match=rf"strategy\.{key}.*trace_online"):
            ElasticWeightConsolidation(OmegaConf.structured(EWCConfig(fisher="trace_online", **{key: value})))
