"""LFPT5: the generation format and what parses back, the pseudo-example quota and mixing
ratio, the loss terms against their formulas (generation objective; the KL on the new
task's own examples only, zero while the prompt is as the task started), and the state
round trip."""
from __future__ import annotations

import types

import pytest
import torch

from cl_runner.models.batching import Collator, compute_loss
from cl_runner.models.tokenizers import ByteTokenizer
from cl_runner.strategies import lfpt5 as lfpt5_module
from cl_runner.strategies.lfpt5 import LFPT5, LFPT5Config
from cl_runner.strategies.parts.generative_replay import (
    generation_example,
    parse_generated,
    pseudo_quota,
    task_marker,
)
from cl_runner.streams.task import Example, Task, TaskStream

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generation_example_puts_the_example_after_its_task_marker():
    ex = Example(prompt="great film", answer="positive", task="sst2")
    assert generation_example(ex, "sst2") == Example(prompt="__gen__ sst2", answer="great film __ans__ positive",
                                                     task="sst2")


def test_a_long_prompt_is_cut_so_the_label_survives():
    tok = ByteTokenizer()
    ex = Example(prompt="x" * 100, answer="positive", task="sst2")
    made = generation_example(ex, "sst2", tok, max_length=40)
    # bos + marker (12 bytes) + prompt + " __ans__ positive" (17) + eos fit 40 tokens: 9 prompt bytes
    assert made.answer == "x" * 9 + " __ans__ positive"
    assert 1 + len(tok.encode(made.prompt)) + len(tok.encode(made.answer)) + 1 == 40


@pytest.mark.parametrize("text,labels,expected", [
    ("a fine movie __ans__ positive", ["positive", "negative"], ("a fine movie", "positive")),
    ("__gen__ sst2 a fine movie __ans__ negative", ["positive", "negative"], ("a fine movie", "negative")),
    ("a fine movie __ans__ neutral", ["positive", "negative"], None),  # not a label of the task
    ("a __ans__ b __ans__ positive", ["positive"], None),  # two answer markers
    ("no marker at all", ["positive"], None),
    (" __ans__ positive", ["positive"], None),  # no input
    ("sum 2 3 __ans__ 5", None, ("sum 2 3", "5")),  # free generation: any answer
])
def test_parse_generated_keeps_only_well_formed_samples_with_a_known_label(text, labels, expected):
    parsed = parse_generated(text, "sst2", labels)
    assert (None if parsed is None else (parsed.prompt, parsed.answer)) == expected
    if parsed is not None:
        assert parsed.task == "sst2"


@pytest.mark.parametrize("new,ratio,earlier,expected", [
    (100, 0.2, 1, [20]), (100, 0.2, 3, [7, 7, 6]), (10, 0.25, 2, [2, 1]), (50, 0.0, 2, [0, 0]), (5, 0.2, 0, [])])
def test_pseudo_quota_is_ratio_of_the_new_task_split_over_the_earlier_tasks(new, ratio, earlier, expected):
    assert pseudo_quota(new, ratio, earlier) == expected


def make_stream():
    def task(name, labels):
        train = [Example(prompt=f"{name} input {i}", answer=labels[i % 2], task=name) for i in range(10)]
        return Task(name=name, train=train, test=train[:2], labels=labels)
    return TaskStream("hand", [task("a", ["yes", "no"]), task("b", ["up", "down"]), task("c", ["x", "y"])])


def fake_ctx(stream, model=None, collate=None):
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    return types.SimpleNamespace(accelerator=accelerator, model=model, unwrapped_model=model, stream=stream, seed=0,
                                 model_kind="causal", collate=collate, loss_fn=compute_loss, batch_examples=None)


def test_pseudo_examples_are_mixed_in_at_the_ratio(monkeypatch):
    """Before task 3 (10 new examples, ratio 0.6): 6 pseudo examples, 3 of each earlier task,
    from samples of its own marker; a sample with another task's label or none is dropped."""
    asked = []

    def fake_generate(model, collate, prompts, max_new_tokens, **kw):
        asked.append((prompts[0], len(prompts), kw["sample"], kw["top_k"]))
        name = prompts[0].split()[-1]
        label = {"a": "yes", "b": "down"}[name]
        # every other sample is unusable
        return [f"made {name} {i} __ans__ {label}" if i % 2 == 0 else "garbage" for i in range(len(prompts))]

    monkeypatch.setattr(lfpt5_module, "generate_texts", fake_generate)
    stream = make_stream()
    strategy = LFPT5(LFPT5Config(pseudo_ratio=0.6, generation_rounds=2))
    strategy.ctx = fake_ctx(stream, model=torch.nn.Linear(1, 1),
                            collate=types.SimpleNamespace(tok=ByteTokenizer(), max_length=64))
    strategy.before_task(2, stream[2])
    mixed = strategy.train_examples(2, stream[2], stream[2].train)
    pseudo = mixed[10:]
    assert mixed[:10] == stream[2].train
    assert len(pseudo) == 6 and len(pseudo) / 10 == pytest.approx(0.6)
    assert [ex.task for ex in pseudo] == ["a"] * 3 + ["b"] * 3
    assert {ex.answer for ex in pseudo if ex.task == "a"} == {"yes"}
    assert asked[0] == (task_marker("a"), 6, True, 64)  # twice the quota, sampled top-k 64
    assert strategy.counts[2] == {"a": {"asked": 3, "sampled": 6, "kept": 3}, "b": {"asked": 3, "sampled": 6, "kept": 3}}
    # the first samples as generated, parsed or not, for the report
    assert strategy.report()["generated_samples"]["c"]["a"] == ["made a 0 __ans__ yes", "garbage", "made a 2 __ans__ yes"]
    # the first task has nothing to replay
    strategy.before_task(0, stream[0])
    assert strategy.train_examples(0, stream[0], stream[0].train) == stream[0].train


def test_stored_inputs_are_answered_by_the_model_greedily(monkeypatch):
    calls = []

    def fake_generate(model, collate, prompts, max_new_tokens, **kw):
        calls.append(kw["sample"])
        return ["model says" for _ in prompts]

    monkeypatch.setattr(lfpt5_module, "generate_texts", fake_generate)
    stream = make_stream()
    strategy = LFPT5(LFPT5Config(pseudo_inputs="stored", pseudo_ratio=0.5))
    strategy.ctx = fake_ctx(stream, model=torch.nn.Linear(1, 1),
                            collate=types.SimpleNamespace(tok=ByteTokenizer(), max_length=64))
    strategy.before_task(1, stream[1])
    pseudo = strategy.pseudo[1]
    assert len(pseudo) == 5 and calls == [False]
    assert {ex.prompt for ex in pseudo} <= {ex.prompt for ex in stream[0].train}  # real inputs of task a
    assert {ex.answer for ex in pseudo} == {"model says"} and {ex.task for ex in pseudo} == {"a"}


def prompted_llama():
    from omegaconf import OmegaConf

    from cl_runner.config.schema import ModelConfig
    from cl_runner.models.build import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="tiny_llama", architecture="llama", tokenizer="byte", max_length=32,
                                           architecture_config=dict(hidden_size=16, intermediate_size=32,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    num_key_value_heads=2, max_position_embeddings=40)))
    cfg.prompt.length = 2
    return build_model(cfg).model


def loss_terms(strategy, model, collate, examples):
    batch = collate(examples)
    strategy.ctx.batch_examples = examples
    loss = compute_loss(model, batch)
    return loss, strategy.penalty(model, batch)


def test_penalty_is_the_generation_objective_then_the_kl_on_new_examples_only():
    stream = make_stream()
    model = prompted_llama()
    collate = Collator("causal", ByteTokenizer(), 32)
    strategy = LFPT5(LFPT5Config(lm_lambda=0.25, kd_lambda=0.2))
    strategy.setup(fake_ctx(stream, model=model, collate=collate))
    new = stream[1].train[:2]
    pseudo = [Example(prompt="a input 7", answer="no", task="a")]

    # Task 1: no teacher yet, the penalty is lm_lambda x the loss on the generation targets.
    strategy.before_task(0, stream[0])
    _, penalty = loss_terms(strategy, model, collate, new + pseudo)
    targets = [generation_example(ex, ex.task, collate.tok, 32) for ex in new + pseudo]
    assert penalty.item() == pytest.approx(0.25 * compute_loss(model, collate(targets)).item(), rel=1e-5)

    # Task 2 starts: the teacher is the prompt as it is now, so the KL is zero.
    strategy.before_task(1, stream[1])
    strategy.pseudo[1] = pseudo
    _, penalty = loss_terms(strategy, model, collate, new + pseudo)
    assert penalty.item() == pytest.approx(0.25 * compute_loss(model, collate(targets)).item(), rel=1e-5)

    # Move the prompt: the KL appears, computed on the new task's examples alone.
    with torch.no_grad():
        model.source.prompt.add_(10 * torch.randn(model.source.prompt.shape, generator=torch.Generator().manual_seed(1)))
    lm = 0.25 * compute_loss(model, collate(targets)).item()
    _, penalty = loss_terms(strategy, model, collate, new + pseudo)
    assert penalty.item() > lm
    strategy.config.lm_lambda = 0.0
    _, kl_both = loss_terms(strategy, model, collate, new + pseudo)
    _, only_new = loss_terms(strategy, model, collate, new)  # the same KL without the pseudo row
    assert penalty.item() == pytest.approx(lm + kl_both.item(), rel=1e-5)
    assert only_new.item() == pytest.approx(kl_both.item(), rel=1e-4)
    # by hand: KL(p_prev || p_cur) summed over answer tokens, per new example, x kd / (1 - kd)
    batch = collate(new)
    with torch.no_grad():
        cur = model(**batch).logits[:, 2:]
        saved = model.source.prompt.detach().clone()
        model.source.prompt.copy_(strategy.teacher["source.prompt"])
        prev = model(**batch).logits[:, 2:]
        model.source.prompt.copy_(saved)
    keep = batch["labels"][:, 1:] != -100
    p_prev = torch.log_softmax(prev[:, :-1][keep].float(), -1)
    p_cur = torch.log_softmax(cur[:, :-1][keep].float(), -1)
    kl = (p_prev.exp() * (p_prev - p_cur)).sum() / 2
    assert only_new.item() == pytest.approx(0.2 / 0.8 * kl.item(), rel=1e-4)


def test_state_round_trip_keeps_the_pseudo_examples_and_the_teacher():
    stream = make_stream()
    model = prompted_llama()
    collate = Collator("causal", ByteTokenizer(), 32)
    strategy = LFPT5(LFPT5Config(pseudo_ratio=0.0))
    strategy.setup(fake_ctx(stream, model=model, collate=collate))
    strategy.before_task(1, stream[1])
    strategy.pseudo[1] = [Example(prompt="p", answer="yes", task="a")]
    strategy.counts[1] = {"a": {"asked": 1, "sampled": 2, "kept": 1}}
    state = strategy.state_dict()
    other = LFPT5(LFPT5Config(pseudo_ratio=0.0))
    other.setup(fake_ctx(stream, model=prompted_llama(), collate=collate))
    other.load_state_dict(state)
    assert other.task == 1 and other.pseudo == strategy.pseudo and other.counts == strategy.counts
    assert torch.equal(other.teacher["source.prompt"], strategy.teacher["source.prompt"])
    assert other.report()["pseudo_examples"] == {"b": {"a": {"asked": 1, "sampled": 2, "kept": 1}}}


@pytest.mark.parametrize("options,key", [({"kd_lambda": 1.0}, "strategy.kd_lambda"),
                                         ({"lm_lambda": -1.0}, "strategy.lm_lambda"),
                                         ({"pseudo_inputs": "test"}, "strategy.pseudo_inputs"),
                                         ({"top_k": 0}, "strategy.top_k"),
                                         ({"generation_rounds": 0}, "strategy.generation_rounds")])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ValueError, match=key):
        LFPT5(LFPT5Config(**options))


def test_samples_are_as_long_as_max_length_leaves_or_max_sample_tokens(monkeypatch):
    budgets = []

    def fake_generate(model, collate, prompts, max_new_tokens, **kw):
        budgets.append(max_new_tokens)
        return ["x __ans__ yes"] * len(prompts)

    monkeypatch.setattr(lfpt5_module, "generate_texts", fake_generate)
    stream = make_stream()
    collate = types.SimpleNamespace(tok=ByteTokenizer(), max_length=64)
    for cap, expected in ((None, 64 - len("__gen__ a") - 1), (20, 20)):
        strategy = LFPT5(LFPT5Config(pseudo_ratio=0.5, max_sample_tokens=cap))
        strategy.ctx = fake_ctx(stream, model=torch.nn.Linear(1, 1), collate=collate)
        strategy.before_task(1, stream[1])
        assert budgets[-1] == expected
