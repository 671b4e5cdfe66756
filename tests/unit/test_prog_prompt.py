"""Progressive Prompts: the concatenation order [P_t; ...; P_1], the residual MLP and its
folding, and that the earlier prompts (and the backbone) stay bit-identical while a later
task trains, weight decay included; the state round trip."""
from __future__ import annotations

import types

import pytest
import torch

from cl_runner.strategies.parts.prompt_sources import ProgressivePrompts, ResidualMLP
from cl_runner.strategies.prog_prompt import ProgPromptConfig, ProgressivePrompting

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_prompts(tasks=3, length=2, width=2):
    return torch.stack([torch.full((length, width), float(t + 1)) for t in range(tasks)])


def test_newest_prompt_first_then_the_earlier_ones():
    source = ProgressivePrompts(hand_prompts())
    embeds = torch.zeros(2, 5, 2)
    source.current = 0
    assert source(embeds, None)[0, :, 0].tolist() == [1, 1]
    source.current, source.finished = 2, 2
    out = source(embeds, None)
    assert out.shape == (2, 6, 2)
    assert out[1, :, 0].tolist() == [3, 3, 2, 2, 1, 1]  # [P_3; P_2; P_1]


def test_residual_mlp_adds_to_its_input_and_folds_into_the_prompt():
    source = ProgressivePrompts(hand_prompts(2), reparameterize="mlp1", bottleneck=4)
    raw = source.prompts[0].detach().clone()
    through = source.mlp(raw).detach()
    assert torch.allclose(through, raw + source.mlp.net(raw))  # x + f(x)
    assert torch.allclose(source.task_prompt(0), through)  # while task 1 trains
    source.fold(0)
    assert torch.allclose(source.prompts[0], through) and source.finished == 1
    source.mlp.reset(torch.Generator().manual_seed(3))  # a new MLP for task 2
    assert torch.allclose(source.task_prompt(0), through)  # folded: the MLP no longer applies


def test_mlp2_shape_and_reset_is_reproducible():
    a, b = ResidualMLP(4, 8, "mlp2"), ResidualMLP(4, 8, "mlp2")
    assert [tuple(m.weight.shape) for m in a.net if hasattr(m, "weight")] == [(8, 4), (4, 8), (4, 4)]
    a.reset(torch.Generator().manual_seed(5))
    b.reset(torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def prompted_llama(strategy, tasks):
    from omegaconf import OmegaConf

    from cl_runner.config.schema import ModelConfig
    from cl_runner.models.build import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="tiny_llama", architecture="llama", tokenizer="byte", max_length=16,
                                           architecture_config=dict(hidden_size=16, intermediate_size=32,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    num_key_value_heads=2, max_position_embeddings=32)))
    cfg.prompt.length = 2
    model = build_model(cfg, prompt_source=lambda maker: strategy.prompt_source(maker, tasks)).model
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    strategy.setup(types.SimpleNamespace(accelerator=accelerator, model=model, unwrapped_model=model, seed=0,
                                         stream=types.SimpleNamespace(names=[f"t{k}" for k in range(tasks)])))
    return model


def train_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


@pytest.mark.parametrize("reparameterize", ["none", "mlp2"])
def test_earlier_prompts_and_backbone_stay_bit_identical_while_a_later_task_trains(reparameterize):
    strategy = ProgressivePrompting(ProgPromptConfig(reparameterize=reparameterize))
    model = prompted_llama(strategy, 3)
    backbone = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    prompts = model.source.prompts
    assert prompts[0].shape == (2, 16)
    assert model.source.max_virtual_tokens == 6  # three tasks' prompts at most
    strategy.before_task(0, None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"source.prompts.0"} | ({n for n, _ in model.named_parameters() if n.startswith("source.mlp.")} if reparameterize != "none"
                                else set())
    start = prompts[0].detach().clone()
    train_steps(model)
    strategy.after_task(0, None)
    first = prompts[0].detach().clone()
    assert not torch.equal(first, start)  # task 1 trained (and folded) its prompt
    strategy.before_task(1, None)
    second_start = prompts[1].detach().clone()
    train_steps(model)
    strategy.after_task(1, None)
    assert torch.equal(prompts[0], first)  # frozen: bit-identical through task 2, weight decay included
    assert not torch.equal(prompts[1], second_start)
    assert all(torch.equal(p, backbone[n]) for n, p in model.backbone.named_parameters())
    assert not prompts[0].requires_grad and not prompts[1].requires_grad
    assert strategy.extra_state_bytes() == 2 * 2 * 16 * 4


def test_state_round_trip_restores_which_prompt_trains():
    strategy = ProgressivePrompting(ProgPromptConfig())
    model = prompted_llama(strategy, 3)
    strategy.before_task(0, None)
    strategy.after_task(0, None)
    strategy.before_task(1, None)
    state = strategy.state_dict()
    assert state == {"current": 1, "finished": 1}
    other = ProgressivePrompting(ProgPromptConfig())
    prompted_llama(other, 3)
    other.load_state_dict(state)
    assert other.source.current == 1 and other.source.finished == 1
    assert [p.requires_grad for p in other.source.prompts] == [False, True, False]
    assert [p.requires_grad for p in model.source.prompts] == [False, True, False]


@pytest.mark.parametrize("options,key", [({"reparameterize": "lstm"}, "strategy.reparameterize"),
                                         ({"bottleneck": 0}, "strategy.bottleneck"),
                                         ({"init_scale": 0.0}, "strategy.init_scale")])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ValueError, match=key):
        ProgressivePrompting(ProgPromptConfig(**options))
