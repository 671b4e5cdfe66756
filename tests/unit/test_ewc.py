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


def test_penalty_by_hand_and_its_gradient():
    model = Line()
    s = make(model, stream(POINTS, POINTS), granularity="batch", fisher_batch_size=2, ewc_lambda=2.0)
    assert s.penalty(model, {}) is None  # nothing consolidated while training task 0
    s.after_task(0, s.ctx.stream[0])  # F = (5, 2.5), theta* = (1, 0)
    set_params(model, 2.0, 1.0)
    penalty = s.penalty(model, {})
    # (2 / 2) * (5 * (2 - 1)^2 + 2.5 * (1 - 0)^2) = 7.5
    assert float(penalty.detach()) == pytest.approx(7.5)
    penalty.backward()
    # d/dtheta = lambda F (theta - theta*) = 2 * (5, 2.5) * (1, 1)
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
    assert float(s.penalty(model, {}).detach()) == pytest.approx(29.5)
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
    assert float(resumed.penalty(model, {}).detach()) == pytest.approx(float(s.penalty(model, {}).detach()))


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
    ("fisher", "true", r"strategy\.fisher.*empirical, sampled"),
    ("granularity", "token", r"strategy\.granularity.*batch, sample"),
    ("gamma", 1.5, r"strategy\.gamma"),
    ("ewc_lambda", -1.0, r"strategy\.ewc_lambda"),
    ("fisher_samples", 0, r"strategy\.fisher_samples"),
])
def test_bad_options(key, value, match):
    with pytest.raises(ValueError, match=match):
        ElasticWeightConsolidation(OmegaConf.structured(EWCConfig(**{key: value})))
