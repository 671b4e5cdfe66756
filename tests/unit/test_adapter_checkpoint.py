"""Adapter checkpoints (cl_runner/checkpoints/adapter.py): which entries are the base, the
fingerprint on hand numbers, trimming, the fall-back to a full state when the base moved,
and the checks made on resume."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_runner.checkpoints.adapter import FrozenBase, base_entries, fingerprint, load_model_state
from cl_runner.checkpoints.files import CheckpointError


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


def lora_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(TinyClassifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["body"]))


def test_the_base_is_everything_but_the_lora_factors_and_the_head():
    model = lora_model()
    assert base_entries(model) == ["base_model.model.body.base_layer.weight", "base_model.model.body.base_layer.bias"]


def test_fingerprint_is_the_sum_and_l2_norm_of_each_entry():
    state = {"a": torch.tensor([[3.0, -4.0]]), "b": torch.tensor([1, 2, 2])}  # integers are counted too
    assert fingerprint(state, ["a", "b"]) == [[-1.0, 5.0], [5.0, 3.0]]


def test_trim_keeps_the_adapters_and_head_and_records_the_base():
    model = lora_model()
    base = FrozenBase(model)
    kept, scope = base.trim(model.state_dict())
    assert sorted(kept) == ["base_model.model.body.lora_A.default.weight", "base_model.model.body.lora_B.default.weight",
                            "base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert scope == {"kind": "adapter", "base_keys": 2, "fingerprint": base.prints}


def test_a_base_that_moved_is_saved_whole(capsys):
    model = lora_model()
    base = FrozenBase(model)
    with torch.no_grad():
        model.base_model.model.body.base_layer.bias[0] += 0.5
    kept, scope = base.trim(model.state_dict())
    assert scope == {"kind": "full"} and kept.keys() == model.state_dict().keys()
    assert "body.base_layer.bias changed" in capsys.readouterr().out


def test_resume_loads_the_adapters_onto_the_same_base():
    trained = lora_model()
    with torch.no_grad():
        trained.base_model.model.body.lora_B.default.weight.fill_(0.25)
        trained.base_model.model.classifier.weight.fill_(2.0)
    kept, scope = FrozenBase(trained).trim(trained.state_dict())

    fresh = lora_model()  # built as the run did: same seed, same base
    load_model_state(fresh, {"model": kept, "model_scope": scope}, FrozenBase(fresh), "ckpt.pt")
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_resume_onto_another_base_or_without_adapters_is_refused():
    trained = lora_model(seed=0)
    kept, scope = FrozenBase(trained).trim(trained.state_dict())
    other = lora_model(seed=1)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt holds adapters trained on another base model: weight "
                                              r"base_model\.model\.body\.base_layer\.weight differs"):
        load_model_state(other, {"model": kept, "model_scope": scope}, FrozenBase(other), "ckpt.pt")
    with pytest.raises(CheckpointError, match="holds LoRA adapters only, but this run's model has none"):
        load_model_state(TinyClassifier(), {"model": kept, "model_scope": scope}, None, "ckpt.pt")


def test_checkpoints_without_a_scope_hold_the_whole_model():
    model = TinyClassifier()
    saved = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    load_model_state(model, {"model": saved}, None, "old.pt")
    assert all(torch.equal(v, torch.ones_like(v)) for v in model.state_dict().values())
