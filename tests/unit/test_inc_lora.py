"""IncLoRA on a tiny PEFT model: one LoRA per task, earlier ones frozen bit for bit while a
later task trains, no penalty, and the state round trip."""
from __future__ import annotations

import types

import pytest
import torch

from cl_runner.strategies.inc_lora import IncLoRAConfig, IncrementalLoRA
from tests.unit.test_olora import tiny_llama_with_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def inc_lora_on(model, num_tasks):
    strategy = IncrementalLoRA(IncLoRAConfig())
    names = strategy.adapter_names(num_tasks)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    stream = types.SimpleNamespace(names=[f"t{k}" for k in range(num_tasks)])
    strategy.setup(types.SimpleNamespace(accelerator=accelerator, model=model, stream=stream, log=lambda values: None,
                                         unwrapped_model=model))
    return strategy, names


def adapter_weights(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def train_steps(model, steps=3):
    """AdamW with weight decay over whatever is trainable now, on a next-token loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


def test_one_adapter_per_task_and_earlier_ones_stay_bit_identical():
    names = ["task_1", "task_2", "task_3"]
    model = tiny_llama_with_adapters(names)
    strategy, created = inc_lora_on(model, 3)
    assert created == names and sorted(model.peft_config) == names  # one LoRA per task
    assert strategy.penalty(model, {}) is None

    train_steps(model)  # task 1 trains task_1 only
    first = adapter_weights(model, "task_1")
    strategy.after_task(0, None)
    strategy.before_task(1, None)
    assert list(model.base_model.active_adapters) == names[:2]  # task_1 stays in the forward
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_2." in n for n in trainable), sorted(trainable)
    before_second = adapter_weights(model, "task_2")
    train_steps(model)
    assert strategy.penalty(model, {}) is None
    for n, w in adapter_weights(model, "task_1").items():
        assert torch.equal(w, first[n]), n  # frozen: bit-identical through task 2, weight decay included
    moved = [n for n, w in adapter_weights(model, "task_2").items() if not torch.equal(w, before_second[n])]
    assert moved, "the new task's LoRA trains"
    strategy.after_task(1, None)
    assert set(strategy.residuals[1]) == {0}  # overlap of task 2's A with task 1's, measured not penalised


def test_state_round_trip_and_config_check():
    names = ["task_1", "task_2"]
    model = tiny_llama_with_adapters(names)
    strategy, _ = inc_lora_on(model, 2)
    strategy.before_task(1, None)
    strategy.after_task(1, None)
    fresh = tiny_llama_with_adapters(names)
    other, _ = inc_lora_on(fresh, 2)
    other.load_state_dict(strategy.state_dict())
    assert other.current == 1 and list(fresh.base_model.active_adapters) == names
    assert other.residuals == strategy.residuals
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lambda_1" not in strategy.report() and strategy.report()["adapters"][1]["adapter"] == "task_2"

    cfg = types.SimpleNamespace(model={"adapter": "none"})
    with pytest.raises(ValueError, match="strategy=inc_lora.*model.adapter=lora"):
        IncrementalLoRA(IncLoRAConfig()).check_run_config(cfg)


def test_registration():
    from cl_runner.strategies import registry

    reg = registry.get("inc_lora")
    assert reg.cls is IncrementalLoRA and reg.adapters is None and reg.sharding
    assert reg.example == ("model.adapter=lora", "model.lora.dropout=0")
