"""LiNeS: coefficients per block by hand, the rescaled weights, eval-only restore, and the
factor each task's update ends with over a stream (once by default, compounding with
reference=pretrained)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.lines import LayerScaling, LinesConfig, lines_coefficients
from cl_runner.models.parts import BlockPosition, parameter_blocks
from cl_runner.streams.task import Example, Task, TaskStream


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)


class FourBlocks(nn.Module):
    """embed -> 4 blocks -> head, one scalar weight each."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 1, bias=False)
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.head = nn.Linear(1, 1, bias=False)


def set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def weights(model: nn.Module) -> dict[str, float]:
    return {n: round(float(p.detach()), 6) for n, p in model.named_parameters()}


def make(model: nn.Module, **options) -> LayerScaling:
    strategy = LayerScaling(OmegaConf.structured(LinesConfig(enabled=True, **options)))
    task = Task("a", [Example("p", "a", "a")], [Example("p", "a", "a")])
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=model, stream=TaskStream("s", [task, task]),
        model_kind="classifier", model_family="test", seed=0, trainer=SimpleNamespace(lr=1e-3),
        loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}))
    return strategy


def test_coefficients_four_blocks_alpha():
    # alpha 0.1, beta 0.9: blocks get 0.1 + 0.9 * l / 3 = 0.1, 0.4, 0.7, 1.0; outside: alpha.
    coeffs = lines_coefficients(parameter_blocks(FourBlocks()), alpha=0.1, beta=0.9, head_scale="alpha")
    assert coeffs == pytest.approx({
        "embed.weight": 0.1, "blocks.0.lin.weight": 0.1, "blocks.1.lin.weight": 0.4,
        "blocks.2.lin.weight": 0.7, "blocks.3.lin.weight": 1.0, "head.weight": 0.1})


def test_coefficients_outside_alpha_plus_beta():
    coeffs = lines_coefficients(parameter_blocks(FourBlocks()), alpha=0.1, beta=0.9, head_scale="alpha_plus_beta")
    assert coeffs["embed.weight"] == pytest.approx(1.0) and coeffs["head.weight"] == pytest.approx(1.0)
    assert coeffs["blocks.1.lin.weight"] == pytest.approx(0.4)


def test_coefficients_two_stacks_each_span_the_range():
    # T5-style: encoder of 2 blocks and decoder of 3; the rule applies within each stack.
    positions = {"enc.0.w": BlockPosition("enc", 0, 2), "enc.1.w": BlockPosition("enc", 1, 2),
                 "dec.0.w": BlockPosition("dec", 0, 3), "dec.1.w": BlockPosition("dec", 1, 3),
                 "dec.2.w": BlockPosition("dec", 2, 3), "shared.w": None}
    coeffs = lines_coefficients(positions, alpha=0.2, beta=0.8)
    assert coeffs == pytest.approx({"enc.0.w": 0.2, "enc.1.w": 1.0, "dec.0.w": 0.2, "dec.1.w": 0.6,
                                    "dec.2.w": 1.0, "shared.w": 0.2})


def test_beta_defaults_to_one_minus_alpha():
    s = make(FourBlocks(), alpha=0.25)
    assert s.beta == pytest.approx(0.75)
    assert s.coefficients["blocks.3.lin.weight"] == pytest.approx(1.0)


def test_train_state_rescales_task_vector_by_hand():
    model = FourBlocks()
    set_all(model, 2.0)  # theta_0 = 2 everywhere
    s = make(model, alpha=0.1, beta=0.9, reference="pretrained")
    set_all(model, 4.0)  # after training: tau = 2 everywhere
    s.after_task(0, None)
    # theta = 2 + lambda * 2
    assert weights(model) == pytest.approx({
        "embed.weight": 2.2, "blocks.0.lin.weight": 2.2, "blocks.1.lin.weight": 2.8,
        "blocks.2.lin.weight": 3.4, "blocks.3.lin.weight": 4.0, "head.weight": 2.2})
    assert s.extra_state_bytes() == 6 * 4  # theta_ref: six fp32 scalars


def test_previous_task_reference_scales_only_the_last_update():
    model = FourBlocks()
    set_all(model, 0.0)
    s = make(model, alpha=0.5, reference="previous_task")
    s.before_task(0, None)
    set_all(model, 2.0)
    s.after_task(0, None)  # theta = 0 + lambda * 2
    after_first = weights(model)
    s.before_task(1, None)  # theta_ref = the scaled weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    s.after_task(1, None)  # theta = theta_ref + lambda * 1
    coeffs = s.coefficients
    for name, value in weights(model).items():
        assert value == pytest.approx(after_first[name] + coeffs[name])
    assert after_first["blocks.0.lin.weight"] == pytest.approx(1.0)  # 0.5 * 2


def test_eval_only_scales_inside_and_restores_training_weights():
    model = FourBlocks()
    set_all(model, 0.0)
    s = make(model, alpha=0.1, beta=0.9, reference="pretrained", apply_to="eval_only")
    set_all(model, 1.0)
    s.after_task(0, None)  # eval_only: the training weights are not touched
    assert set(weights(model).values()) == {1.0}
    with s.evaluation_weights(0):
        assert weights(model)["blocks.1.lin.weight"] == pytest.approx(0.4)
        assert weights(model)["head.weight"] == pytest.approx(0.1)
    assert set(weights(model).values()) == {1.0}


def test_previous_task_reference_round_trips_state():
    model = FourBlocks()
    set_all(model, 3.0)
    s = make(model, reference="previous_task")
    s.before_task(0, None)
    state = s.state_dict()
    fresh = make(model, reference="previous_task")  # a resumed run mid-task: before_task not called
    fresh.load_state_dict(state)
    set_all(model, 5.0)
    fresh.after_task(0, None)
    assert weights(model)["head.weight"] == pytest.approx(3.0 + 0.5 * 2.0)


def test_reference_on_cpu_option():
    s = make(FourBlocks(), reference="pretrained", reference_on_cpu=True)
    assert all(r.device.type == "cpu" and r.dtype == torch.float32 for r in s.reference.values())


def run_stream(model: nn.Module, s: LayerScaling, updates: list[float]) -> None:
    """Three (or more) tasks through the hooks; task k adds updates[k] to every weight."""
    for t, delta in enumerate(updates):
        s.before_task(t, None)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(delta)
        s.after_task(t, None)


# alpha 0.5, beta 0.5: blocks 0.5, 2/3, 5/6, 1.0; embed and head 0.5
ALPHA_HALF = {"embed.weight": 0.5, "blocks.0.lin.weight": 0.5, "blocks.1.lin.weight": 2 / 3,
              "blocks.2.lin.weight": 5 / 6, "blocks.3.lin.weight": 1.0, "head.weight": 0.5}


def test_default_reference_is_previous_task():
    assert LinesConfig().reference == "previous_task" and LinesConfig().apply_to == "train_state"
    from tests.helpers import compose

    node = compose(["lines.enabled=true"]).lines
    assert node["reference"] == "previous_task" and node["apply_to"] == "train_state"


@pytest.mark.parametrize("reference", ["previous_task", "pretrained"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_factor_each_task_update_ends_with(reference, k):
    """Only task k (of three) moves the weights, by 1: what is left of it after the stream
    is its final factor. previous_task (default): lambda once; pretrained: lambda^(3-k)."""
    model = FourBlocks()
    set_all(model, 0.0)
    s = make(model, alpha=0.5, reference=reference)
    assert s.coefficients == pytest.approx(ALPHA_HALF)
    run_stream(model, s, [1.0 if t == k else 0.0 for t in range(3)])
    power = 1 if reference == "previous_task" else 3 - k
    assert weights(model) == pytest.approx({n: lam ** power for n, lam in ALPHA_HALF.items()}, abs=1e-6)
    assert s.applied == [0, 1, 2]


def test_three_task_stream_by_hand():
    """theta_0 = 0, tasks add 1, 10, 100. First block (lambda 0.5):
    previous_task: 0.5 * (1 + 10 + 100) = 55.5;
    pretrained: 0.5^3 * 1 + 0.5^2 * 10 + 0.5 * 100 = 52.625 (task 1 scaled by 0.5^3)."""
    once, compounding = FourBlocks(), FourBlocks()
    set_all(once, 0.0)
    set_all(compounding, 0.0)
    run_stream(once, make(once, alpha=0.5), [1.0, 10.0, 100.0])
    run_stream(compounding, make(compounding, alpha=0.5, reference="pretrained"), [1.0, 10.0, 100.0])
    assert weights(once)["blocks.0.lin.weight"] == pytest.approx(55.5)
    assert weights(compounding)["blocks.0.lin.weight"] == pytest.approx(52.625)
    assert weights(once)["blocks.3.lin.weight"] == pytest.approx(111.0)  # deepest block: lambda 1
    assert weights(compounding)["blocks.3.lin.weight"] == pytest.approx(111.0)
    for name, lam in ALPHA_HALF.items():
        assert weights(once)[name] == pytest.approx(lam * 111.0, abs=1e-4)
        assert weights(compounding)[name] == pytest.approx(lam ** 3 + 10 * lam ** 2 + 100 * lam, abs=1e-4)


def test_compounding_option_logs_a_warning(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="cl_runner.strategies.lines"):
        make(FourBlocks(), reference="pretrained")
    assert "compounds" in caplog.text and "previous_task" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cl_runner.strategies.lines"):
        make(FourBlocks())
        make(FourBlocks(), reference="pretrained", apply_to="eval_only")
    assert "compounds" not in caplog.text


@pytest.mark.parametrize("key,value", [("head_scale", "beta"), ("reference", "init"), ("apply_to", "always")])
def test_bad_options_name_key_and_choices(key, value):
    with pytest.raises(ValueError, match=rf"lines\.{key}.*{value}.*choose one of"):
        LayerScaling(OmegaConf.structured(LinesConfig(enabled=True, **{key: value})))
