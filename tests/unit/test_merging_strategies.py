"""The merging strategies' life cycle on a toy model, by hand: every task starts from
theta_0, the model after a task holds theta_0 + merged, the state round-trips, the classifier
head rule, and bad options fail early naming the key."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.config.validate import validate
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.continual_task_arithmetic import ContinualTaskArithmetic, ContinualTaskArithmeticConfig
from cl_runner.strategies.continual_ties import ContinualTies, ContinualTiesConfig
from cl_runner.strategies.opcm import OPCMConfig, OrthogonalProjectionMerging, linear_weight_names
from cl_runner.streams.task import Example, Task, TaskStream
from tests.helpers import compose


class Toy(nn.Module):
    """A 2x2 linear layer with a bias, a norm, and (classifier) a 1x2 head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)
        self.classifier = nn.Linear(2, 1, bias=False)


def toy() -> Toy:
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


TASK = Task("a", [Example("p", "a", "a")], [Example("p", "a", "a")])


def make(cls, config, model: nn.Module, kind: str = "causal"):
    strategy = cls(OmegaConf.structured(config))
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=model, stream=TaskStream("s", [TASK, TASK, TASK]),
        model_kind=kind, model_family="test", seed=0, trainer=SimpleNamespace(lr=1e-3),
        loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}))
    return strategy


def train(model: nn.Module, values: dict[str, list]) -> None:
    """Stands in for training: the named parameters take these values (others stay)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.tensor(v, dtype=torch.float32).reshape(params[n].shape))


def value(model: nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].detach().clone()


def run_task(strategy, model, t, values):
    strategy.before_task(t, TASK)
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters()), "task did not start from theta_0"
    train(model, values)
    strategy.after_task(t, TASK)


def test_linear_weights_are_nn_linear_weights():
    assert linear_weight_names(Toy()) == ["body.weight", "classifier.weight"]


def test_opcm_two_tasks_by_hand():
    model = toy()
    s = make(OrthogonalProjectionMerging, OPCMConfig(alpha=0.5), model)
    run_task(s, model, 0, {"body.weight": [[3, 0], [0, 0]]})
    assert torch.equal(value(model, "body.weight"), torch.tensor([[3.0, 0], [0, 0]]))  # lambda_1 = 1: task 1 as is
    run_task(s, model, 1, {"body.weight": [[1, 4], [0, 0]], "body.bias": [1, 1]})
    mean = (3 + math.sqrt(19)) / 2
    lam = math.sqrt(27) / mean  # S = {w: [[3, 4], [0, 0]], b: [1, 1]} (see test_merging_math)
    assert s.lam == pytest.approx(lam, rel=1e-6)
    assert torch.allclose(value(model, "body.weight"), torch.tensor([[3.0, 4], [0, 0]]) / lam, atol=1e-6)
    assert torch.allclose(value(model, "body.bias"), torch.tensor([1.0, 1]) / lam, atol=1e-6)
    merge = s.report()["merges"][1]
    assert merge["lambda"] == pytest.approx(lam, rel=1e-6)
    assert merge["layers"]["body.weight"]["projected_fraction"] == pytest.approx(1 / 17, rel=1e-5)
    assert s.extra_state_bytes() == 2 * 4 * sum(p.numel() for p in model.parameters())


def test_task_arithmetic_is_a_scaled_running_sum():
    model = toy()
    s = make(ContinualTaskArithmetic, ContinualTaskArithmeticConfig(scaling_factor=0.3), model)
    run_task(s, model, 0, {"body.weight": [[1, 2], [3, 4]]})
    run_task(s, model, 1, {"body.weight": [[1, 0], [0, -4]], "norm.weight": [2, 2]})
    assert torch.allclose(value(model, "body.weight"), 0.3 * torch.tensor([[2.0, 2], [3, 0]]))
    assert torch.allclose(value(model, "norm.weight"), torch.tensor([0.6, 0.6]))


def test_ties_first_task_untrimmed_then_merged_with_the_running_update():
    model = toy()
    s = make(ContinualTies, ContinualTiesConfig(scaling_factor=0.5, threshold=100), model)
    run_task(s, model, 0, {"body.weight": [[2, -2], [0, 0]]})
    assert torch.allclose(value(model, "body.weight"), torch.tensor([[1.0, -1], [0, 0]]))  # 0.5 tau_1
    run_task(s, model, 1, {"body.weight": [[4, 4], [0, 1]]})
    # M = [[1, -1], [0, 0]], tau = [[4, 4], [0, 1]] (keep all): signs +, + (4 - 1 > 0), 0 -> majority +, +;
    # agreeing sum [[5, 4], [0, 1]]; M <- M + 0.5 * that.
    assert torch.allclose(value(model, "body.weight"), torch.tensor([[3.5, 1.0], [0, 0.5]]))


def test_classifier_head_keeps_each_task_update_outside_the_merge():
    model = toy()
    s = make(ContinualTaskArithmetic, ContinualTaskArithmeticConfig(scaling_factor=0.3), model, kind="classifier")
    assert s.head_names == ["classifier.weight"]
    run_task(s, model, 0, {"body.weight": [[1, 0], [0, 0]], "classifier.weight": [[1, 0]]})
    run_task(s, model, 1, {"body.weight": [[0, 0], [0, 1]], "classifier.weight": [[0, 2]]})
    assert torch.allclose(value(model, "classifier.weight"), torch.tensor([[1.0, 2.0]]))  # unscaled sum
    assert torch.allclose(value(model, "body.weight"), torch.tensor([[0.3, 0], [0, 0.3]]))
    merged = make(ContinualTaskArithmetic, ContinualTaskArithmeticConfig(classifier_head="merge"), toy(),
                  kind="classifier")
    assert merged.head_names == []


def test_opcm_never_projects_the_head_under_the_sum_rule():
    s = make(OrthogonalProjectionMerging, OPCMConfig(), toy(), kind="classifier")
    assert s.matrices == ["body.weight"]


@pytest.mark.parametrize("cls, config", [
    (OrthogonalProjectionMerging, OPCMConfig()),
    (ContinualTaskArithmetic, ContinualTaskArithmeticConfig()),
    (ContinualTies, ContinualTiesConfig()),
])
def test_state_round_trips_and_continues_identically(cls, config):
    model_a = toy()
    a = make(cls, config, model_a)
    run_task(a, model_a, 0, {"body.weight": [[1, 2], [3, 4]], "body.bias": [1, -1]})
    run_task(a, model_a, 1, {"body.weight": [[0, 1], [-1, 2]], "norm.bias": [0.5, 0]})
    model_b = toy()
    b = make(cls, config, model_b)
    b.load_state_dict(a.state_dict())
    train(model_b, {n: v.tolist() for n, v in model_a.state_dict().items()})
    for s, m in ((a, model_a), (b, model_b)):
        run_task(s, m, 2, {"body.weight": [[2, -1], [0, 1]], "norm.weight": [1, 3]})
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert a.report() == b.report()


@pytest.mark.parametrize("cls, config, key", [
    (OrthogonalProjectionMerging, OPCMConfig(alpha=1.0), "strategy.alpha"),
    (OrthogonalProjectionMerging, OPCMConfig(alpha=-0.1), "strategy.alpha"),
    (ContinualTaskArithmetic, ContinualTaskArithmeticConfig(scaling_factor=0.0), "strategy.scaling_factor"),
    (ContinualTaskArithmetic, ContinualTaskArithmeticConfig(scaling_factor=1.5), "strategy.scaling_factor"),
    (ContinualTies, ContinualTiesConfig(threshold=0.2), "strategy.threshold"),
    (ContinualTies, ContinualTiesConfig(threshold=120), "strategy.threshold"),
    (ContinualTies, ContinualTiesConfig(merge_func="median"), "strategy.merge_func"),
    (ContinualTies, ContinualTiesConfig(classifier_head="drop"), "strategy.classifier_head"),
])
def test_bad_options_name_the_key(cls, config, key):
    with pytest.raises(ValueError, match=rf"^bad value for '{key}'") as err:
        cls(OmegaConf.structured(config))
    assert "\n" not in str(err.value)


def test_head_modules_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="strategy.head_modules"):
        make(OrthogonalProjectionMerging, OPCMConfig(head_modules=["head"]), toy(), kind="classifier")


@pytest.mark.parametrize("name", ["opcm", "continual_task_arithmetic", "continual_ties"])
def test_fsdp_is_refused_when_the_stack_is_built(name):
    with pytest.raises(ValueError, match=rf"strategy={name} cannot run with trainer.sharding=fsdp: its merge.*set trainer.sharding=none"):
        build_strategy(validate(compose([f"strategy={name}", "trainer.sharding=fsdp"])))


def test_gpt2_conv1d_weights_are_projected_and_a_tied_lm_head_is_not_a_matrix():
    from cl_runner.models.build import build_model

    model = build_model(validate(compose(["model=tiny_gpt2"])).model).model
    names = linear_weight_names(model)
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.weight" in names
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names  # tied: listed once, an embedding
