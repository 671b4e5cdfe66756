"""O-LoRA's loss terms on matrices a person can check, and the strategy on a tiny PEFT model."""
from __future__ import annotations

import types

import pytest
import torch

from cl_runner.strategies.olora import (OLoRAConfig, OrthogonalLoRA, norm_loss, orthogonality_loss, overlap,
                                        residual)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_overlap_sums_absolute_entries_or_squares():
    a_prev = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # r_i = 2, d = 2
    a_new = torch.tensor([[1.0, -2.0]])  # r = 1: A_i A_t^T = [[1], [-2]]
    assert overlap(a_prev, a_new, "abs").item() == 3.0  # |1| + |-2| (the authors' code)
    assert overlap(a_prev, a_new, "squared").item() == 5.0  # 1 + 4 (the paper's Eq. 3)
    orthogonal = torch.tensor([[0.0, 0.0, 3.0]])
    assert overlap(torch.tensor([[1.0, 2.0, 0.0]]), orthogonal, "abs").item() == 0.0


def test_orthogonality_loss_adds_every_layer_and_every_earlier_task():
    # Two earlier tasks, two layers; each pair's A_i A_t^T is one number here.
    current = [torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])]
    task1 = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 5.0]])]  # overlaps 1 and 2
    task2 = [torch.tensor([[0.0, -3.0]]), torch.tensor([[0.0, 7.0]])]  # overlaps -3 and 0
    assert orthogonality_loss([task1, task2], current, "abs").item() == 1 + 2 + 3 + 0
    assert orthogonality_loss([task1, task2], current, "squared").item() == 1 + 4 + 9 + 0
    assert orthogonality_loss([], current, "abs").item() == 0.0  # task 1: nothing to be orthogonal to


def test_norm_loss_is_the_sum_of_frobenius_norms_not_squared():
    a = torch.tensor([[3.0, 4.0]])  # ||A||_F = 5
    b = torch.tensor([[0.0], [1.0]])  # ||B||_F = 1
    assert norm_loss([a, b]).item() == 6.0


def test_residual_is_zero_for_orthogonal_rows_and_one_for_the_same_row():
    assert residual(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])) == (0.0, 0.0)
    frob, rel = residual(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.0]]))
    assert frob == pytest.approx(25.0) and rel == pytest.approx(1.0)


@pytest.mark.parametrize("key, value, text", [("orthogonality", "l1", "abs, squared"), ("lambda_1", -1.0, ">= 0"),
                                              ("lambda_2", float("inf"), "finite")])
def test_bad_options_are_refused_by_name(key, value, text):
    with pytest.raises(ValueError, match=rf"'strategy.{key}'.*{text}"):
        OrthogonalLoRA(OLoRAConfig(**{key: value}))


# ------------------------------------------------------------------ on a tiny PEFT model
def tiny_llama_with_adapters(names):
    from omegaconf import OmegaConf

    from cl_runner.config.schema import ModelConfig
    from cl_runner.models.build import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="tiny_llama", architecture="llama", tokenizer="byte", adapter="lora",
                                           architecture_config=dict(hidden_size=16, intermediate_size=32,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    num_key_value_heads=2, max_position_embeddings=32)))
    cfg.lora.r = 2
    cfg.lora.dropout = 0.0
    return build_model(cfg, None, names).model


def olora_on(model, num_tasks, **options):
    strategy = OrthogonalLoRA(OLoRAConfig(**options))
    names = strategy.adapter_names(num_tasks)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    stream = types.SimpleNamespace(names=[f"t{k}" for k in range(num_tasks)])
    strategy.setup(types.SimpleNamespace(accelerator=accelerator, model=model, stream=stream, log=lambda values: None,
                                         unwrapped_model=model))
    return strategy, names


def test_strategy_penalty_matches_the_formula_and_trains_only_the_new_lora():
    from cl_runner.models.adapters import lora_factors

    names = [f"task_{k + 1}" for k in range(3)]
    model = tiny_llama_with_adapters(names)
    strategy, _ = olora_on(model, 3, lambda_1=0.5, lambda_2=0.25)
    assert strategy.penalty(model, {}).item() == pytest.approx(  # task 1: only the norm term
        0.25 * sum(torch.linalg.norm(p).item() for a, b in lora_factors(model, "task_1").values() for p in (a, b)),
        rel=1e-6)
    strategy.before_task(2, None)
    assert list(model.base_model.active_adapters) == names  # every LoRA so far is in the forward
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_3." in n for n in trainable), sorted(trainable)

    expected = 0.0
    new = lora_factors(model, "task_3")
    for earlier in ("task_1", "task_2"):
        for layer, (a_i, _) in lora_factors(model, earlier).items():
            expected += (a_i @ new[layer][0].T).abs().sum().item()
    expected = 0.5 * expected + 0.25 * sum(torch.linalg.norm(p).item() for a, b in new.values() for p in (a, b))
    penalty = strategy.penalty(model, {})
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".task_3." in n for n in with_grad)


def test_earlier_loras_stay_in_the_forward():
    """The model's output is the base output plus every active LoRA's update."""
    from cl_runner.models.adapters import lora_factors

    names = ["task_1", "task_2"]
    model = tiny_llama_with_adapters(names)
    strategy, _ = olora_on(model, 2)
    ids = torch.randint(0, 200, (1, 6))
    with torch.no_grad():
        base = model(input_ids=ids).logits.clone()
        for name in names:  # give both LoRAs a non-zero update
            for _, b in lora_factors(model, name).values():
                b.normal_()
        only_first = model(input_ids=ids).logits.clone()
        strategy.before_task(1, None)
        both = model(input_ids=ids).logits
    assert not torch.allclose(base, only_first) and not torch.allclose(only_first, both)


def test_state_round_trip_reactivates_the_task_in_progress():
    names = ["task_1", "task_2", "task_3"]
    model = tiny_llama_with_adapters(names)
    strategy, _ = olora_on(model, 3)
    strategy.before_task(1, None)
    strategy.after_task(1, None)
    state = strategy.state_dict()
    fresh = tiny_llama_with_adapters(names)
    other, _ = olora_on(fresh, 3)
    other.load_state_dict(state)
    assert list(fresh.base_model.active_adapters) == names[:2]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert other.residuals == strategy.residuals and 0 in other.residuals[1]
    report = strategy.report()
    assert report["adapters"][0]["ranks"] == [2] and "t0" in report["orthogonality_residual"]["t1"]
