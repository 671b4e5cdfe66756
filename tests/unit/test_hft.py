"""hft: frozen parameters do not move over a task (weight decay on), about half of every
block is frozen (exact counts for LLaMA), masks are new per task and fixed per seed,
row/element granularity keep their masked entries, resume re-applies the mask."""
from __future__ import annotations

import io
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cl_runner.models.batching import compute_loss
from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.hft import HalfFineTuning, HFTConfig, block_units
from cl_runner.streams.task import Example, Task, TaskStream

REPO = Path(__file__).resolve().parents[2]
VOCAB = 50


def tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), "causal"
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)), "causal"
    if family == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB,
            dropout_rate=0.0, decoder_start_token_id=0)), "seq2seq"
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=VOCAB, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)), "classifier"
    raise KeyError(family)


def collate_for(kind: str):
    def ids(text: str) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    def collate(examples):
        if kind == "causal":
            rows = [ids(e.prompt) + ids(e.answer) + [2] for e in examples]
            labels = [[-100] * len(ids(e.prompt)) + ids(e.answer) + [2] for e in examples]
            return {"input_ids": pad(rows, 0), "attention_mask": pad([[1] * len(r) for r in rows], 0),
                    "labels": pad(labels, -100)}
        if kind == "seq2seq":
            rows = [ids(e.prompt) + [2] for e in examples]
            return {"input_ids": pad(rows, 0), "attention_mask": pad([[1] * len(r) for r in rows], 0),
                    "labels": pad([ids(e.answer) + [2] for e in examples], -100)}
        rows = [ids(e.prompt) for e in examples]
        return {"input_ids": pad(rows, 0), "attention_mask": pad([[1] * len(r) for r in rows], 0),
                "labels": torch.tensor([int(e.answer) for e in examples]),
                "label_mask": torch.ones(len(examples), 3, dtype=torch.bool)}

    return collate


def make_stream(n_tasks: int = 3) -> TaskStream:
    tasks = []
    for t in range(n_tasks):
        train = [Example(f"p{t}{i} xy{i * (t + 2)}", str((i + t) % 3)) for i in range(8)]
        tasks.append(Task(name=f"task{t}", train=train, test=train[:2]))
    return TaskStream("toy", tasks)


def build(family: str, seed: int = 0, logs: list | None = None, n_tasks: int = 3, **overrides):
    from accelerate import Accelerator

    model, kind = tiny(family)
    cfg = OmegaConf.merge(OmegaConf.structured(HFTConfig), overrides)
    strategy = HalfFineTuning(cfg)
    ctx = StrategyContext(accelerator=Accelerator(cpu=True), model=model,
                          stream=make_stream(n_tasks), model_kind=kind, model_family=family,
                          seed=seed, trainer=None, loss_fn=compute_loss, collate=collate_for(kind),
                          log=(logs.append if logs is not None else (lambda values: None)))
    strategy.setup(ctx)
    return strategy, model, ctx


def optimizer_for(model, weight_decay: float = 0.1):
    # The loop builds AdamW from the parameters that require grad.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=weight_decay)


def train(strategy, model, ctx, t: int, steps: int, optimizer) -> None:
    data = ctx.stream[t].train
    model.train()
    for step in range(steps):
        batch = ctx.collate((data + data)[(step * 3) % len(data):][:3])
        ctx.loss_fn(model, batch).backward()
        strategy.after_backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        strategy.before_optimizer_step()
        optimizer.step()
        strategy.after_optimizer_step()
        optimizer.zero_grad(set_to_none=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def frozen_names(strategy, t: int) -> list[str]:
    return strategy.report()["tasks"][t]["frozen_modules"]


# --------------------------------------------------------------------- module granularity
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_frozen_parameters_are_bit_identical_over_a_task(family):
    strategy, model, ctx = build(family)
    optimizer = None
    for t in range(2):
        before = snapshot(model)
        strategy.before_task(t, ctx.stream[t])
        frozen = set(strategy.frozen_parameters())
        assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
        optimizer = optimizer_for(model)
        train(strategy, model, ctx, t, 4, optimizer)
        strategy.after_task(t, ctx.stream[t])
        after = snapshot(model)
        for name in before:
            same = torch.equal(before[name], after[name])
            if name in frozen:
                assert same, f"frozen {name} moved in task {t}"
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        # everything else trains: embeddings / head always, the other half of each block
        assert moved and moved.isdisjoint(frozen)
        embed = [n for n in before if "embed" in n or "wte" in n or "shared" in n]
        assert any(n in moved for n in embed), embed
        assert all(p.requires_grad for p in model.parameters())  # unfrozen after the task


def test_llama_exact_counts():
    # Tiny LLaMA, 2 blocks, each: q/k/v/o 32x32 (1024 each), gate/up 64x32 and down 32x64
    # (2048 each), 2 RMSNorm weights of 32 -> 4096 + 6144 + 64 = 10304 per block.
    strategy, model, ctx = build("llama")
    strategy.before_task(0, ctx.stream[0])
    names = frozen_names(strategy, 0)
    per_block = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(2)]
    attn = [sum("self_attn" in n for n in b) for b in per_block]
    mlp = sorted(sum(".mlp." in n for n in b) for b in per_block)
    norm = [sum("layernorm" in n for n in b) for b in per_block]
    assert attn == [2, 2] and mlp == [1, 2] and norm == [1, 1]
    assert len(names) == 9  # of 18 modules
    info = strategy.report()["tasks"][0]
    # 2 * 2 * 1024 (attention) + (2 + 1) * 2048 (MLP) + 2 * 32 (norms) = 10304 of 20608
    assert info["frozen_params"] == 10304 and info["categorised_params"] == 20608
    assert info["frozen_fraction"] == 0.5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert total - trainable == 10304
    assert len(optimizer_for(model).param_groups[0]["params"]) == \
        len(list(model.parameters())) - 9
    strategy.after_task(0, ctx.stream[0])


def test_gpt2_half_is_one_of_two_per_category():
    strategy, _, ctx = build("gpt2")
    strategy.before_task(0, ctx.stream[0])
    names = frozen_names(strategy, 0)
    for i in range(2):
        block = [n[len(f"transformer.h.{i}."):] for n in names if n.startswith(f"transformer.h.{i}.")]
        assert sum(n.startswith("attn.") for n in block) == 1
        assert sum(n.startswith("mlp.") for n in block) == 1
        assert sum(n in ("ln_1", "ln_2") for n in block) == 1


def test_t5_and_bert_categories():
    strategy, _, ctx = build("t5")
    strategy.before_task(0, ctx.stream[0])
    names = frozen_names(strategy, 0)
    for stack in ("encoder", "decoder"):
        for i in range(2):
            block = [n for n in names if n.startswith(f"{stack}.block.{i}.")]
            assert sum(".SelfAttention." in n for n in block) == 2
            assert sum(".EncDecAttention." in n for n in block) == (2 if stack == "decoder" else 0)
            assert sum(".DenseReluDense." in n for n in block) == 1  # wi, wo: 1 of 2
        norms = [sum(n.endswith("layer_norm") and n.startswith(f"{stack}.block.{i}.")
                     for n in names) for i in range(2)]
        # encoder: 1 of 2 per block; decoder: 3 norms -> 2 in one block, 1 in the other
        assert sorted(norms) == ([1, 1] if stack == "encoder" else [1, 2])
    assert not any("relative_attention_bias" in n for n in names)

    strategy, _, ctx = build("bert")
    strategy.before_task(0, ctx.stream[0])
    names = frozen_names(strategy, 0)
    for i in range(2):
        block = [n.split(f"layer.{i}.", 1)[1] for n in names if f"encoder.layer.{i}." in n]
        assert sum(n.startswith("attention.") and "LayerNorm" not in n for n in block) == 2
        assert sum(n in ("intermediate.dense", "output.dense") for n in block) == 1
        assert sum(n.endswith("LayerNorm") for n in block) == 1


def test_unknown_family_structural_rule_matches_llama_categories():
    model, _ = tiny("llama")
    known = block_units(model, "llama", HFTConfig().modules)
    fallback = block_units(model, "my_new_arch", HFTConfig().modules)
    names = lambda units: {c: sorted(u.name for u in us) for c, us in units["model.layers"][0].items()}
    assert names(known) == names(fallback)


def test_masks_differ_across_tasks_and_are_deterministic_per_seed():
    def masks(seed: int) -> list[list[str]]:
        strategy, _, ctx = build("llama", seed=seed, n_tasks=4)
        out = []
        for t in range(4):
            strategy.before_task(t, ctx.stream[t])
            out.append(sorted(frozen_names(strategy, t)))
            strategy.after_task(t, ctx.stream[t])
        return out

    a, b, other = masks(0), masks(0), masks(1)
    assert a == b
    assert len({tuple(m) for m in a}) > 1  # a new draw each task
    assert a != other


def test_log_and_report():
    logs: list = []
    strategy, _, ctx = build("llama", logs=logs)
    strategy.before_task(0, ctx.stream[0])
    assert logs[-1]["hft/frozen_modules"] == 9 and logs[-1]["hft/frozen_fraction"] == 0.5
    report = strategy.report()
    assert report["granularity"] == "module" and report["tasks"][0]["name"] == "task0"
    assert all(n.startswith("model.layers.") for n in report["tasks"][0]["frozen_modules"])


# --------------------------------------------------------------------- row / element
@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_and_element_keep_masked_entries(granularity, family):
    strategy, model, ctx = build(family, granularity=granularity)
    before = snapshot(model)
    strategy.before_task(0, ctx.stream[0])
    assert all(p.requires_grad for p in model.parameters())  # masks, not exclusion
    masks = [(m.param, m.kind, m.index, m.dim) for m in strategy._masks]
    optimizer = optimizer_for(model)
    train(strategy, model, ctx, 0, 4, optimizer)
    info = strategy.report()["tasks"][0]
    assert info["frozen_fraction"] == pytest.approx(0.5, abs=0.02)
    assert strategy.extra_state_bytes() > 0
    by_id = {id(p): n for n, p in model.named_parameters()}
    changed_free = 0
    for p, kind, index, dim in masks:
        start = before[by_id[id(p)]]
        if kind == "rows":
            keep = torch.zeros(p.shape[dim], dtype=torch.bool)
            keep[index] = True
            shape = [1] * p.dim()
            shape[dim] = -1
            frozen = keep.view(shape).expand_as(p)
        else:
            frozen = index
        assert torch.equal(p.detach()[frozen], start[frozen]), by_id[id(p)]
        changed_free += int((p.detach()[~frozen] != start[~frozen]).sum())
    assert changed_free > 0
    strategy.after_task(0, ctx.stream[0])
    assert strategy.extra_state_bytes() == 0


def test_row_granularity_freezes_conv1d_output_columns():
    strategy, model, _ = build("gpt2", granularity="row")
    strategy.before_task(0, strategy.ctx.stream[0])
    c_attn = [m for m in strategy._masks
              if m.param is model.transformer.h[0].attn.c_attn.weight][0]
    assert c_attn.dim == 1 and len(c_attn.index) == 48  # half of the 96 output features
    bias = [m for m in strategy._masks if m.param is model.transformer.h[0].attn.c_attn.bias][0]
    assert torch.equal(bias.index, c_attn.index)


# --------------------------------------------------------------------- optimizer carry, resume
def test_carry_optimizer_keeps_frozen_modules_fixed():
    strategy, model, ctx = build("llama", carry_optimizer=True)
    assert strategy.carry_optimizer
    optimizer = optimizer_for(model)  # built once, carried across tasks
    for t in range(2):
        before = snapshot(model)
        strategy.before_task(t, ctx.stream[t])
        frozen = set(strategy.frozen_parameters())
        assert all(p.requires_grad for p in model.parameters())
        train(strategy, model, ctx, t, 3, optimizer)
        strategy.after_task(t, ctx.stream[t])
        for name, p in model.named_parameters():
            if name in frozen:
                assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("granularity", ["module", "element"])
def test_resume_mid_task_reapplies_the_mask(granularity):
    strategy, model, ctx = build("llama", granularity=granularity)
    strategy.before_task(1, ctx.stream[1])
    optimizer = optimizer_for(model)
    train(strategy, model, ctx, 1, 2, optimizer)
    buffer = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed, model_b, ctx_b = build("llama", granularity=granularity)
    model_b.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["strategy"])
    assert resumed.frozen_parameters() == strategy.frozen_parameters()
    optimizer_b = optimizer_for(model_b)
    optimizer_b.load_state_dict(saved["optimizer"])  # same parameter set as before
    train(strategy, model, ctx, 1, 2, optimizer)
    train(resumed, model_b, ctx_b, 1, 2, optimizer_b)
    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), n


# --------------------------------------------------------------------- config
def _field_tree(obj) -> dict:
    return {f.name: (_field_tree(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name))
                     else None) for f in fields(obj)}


def test_composed_defaults_are_the_dataclass_defaults():
    from tests.helpers import compose

    composed = OmegaConf.to_container(compose(["strategy=hft"]).strategy)
    assert composed == OmegaConf.to_container(OmegaConf.structured(HFTConfig))


@pytest.mark.parametrize("override,key", [({"granularity": "column"}, "strategy.granularity"),
                                          ({"ratio": 1.5}, "strategy.ratio")])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HalfFineTuning(OmegaConf.merge(OmegaConf.structured(HFTConfig), override))


def test_registered():
    from cl_runner.strategies import registry

    reg = registry.get("hft")
    assert reg.cls is HalfFineTuning and reg.config is HFTConfig
