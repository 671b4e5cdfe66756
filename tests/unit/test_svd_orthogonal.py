"""svd_orthogonal: rank rules on hand numbers, targets per family, the projection
invariants over a whole task through the strategy hooks, checkpoints, accumulate."""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cl_runner.models.batching import compute_loss
from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.svd_orthogonal import SVDOrthogonal, SVDOrthogonalConfig, SVDRankConfig
from cl_runner.strategies.svd_orthogonal.rank import adaptive_ranks, ratio_ranks, scheduled_fraction
from cl_runner.strategies.svd_orthogonal.targets import find_targets
from cl_runner.streams.task import Example, Task, TaskStream

REPO = Path(__file__).resolve().parents[2]
VOCAB = 50


# --------------------------------------------------------------------- tiny models
def tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg), "causal"
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return tf.LlamaForCausalLM(cfg), "causal"
    if family == "t5":
        cfg = tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                          vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(cfg), "seq2seq"
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=VOCAB, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(cfg), "classifier"
    raise KeyError(family)


def make_collate(kind: str):
    def ids(text: str) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        if kind == "causal":
            rows = [ids(e.prompt) + ids(e.answer) + [2] for e in examples]
            labels = [[-100] * len(ids(e.prompt)) + ids(e.answer) + [2] for e in examples]
            mask = [[1] * len(r) for r in rows]
            return {"input_ids": pad(rows, 0), "attention_mask": pad(mask, 0),
                    "labels": pad(labels, -100)}
        if kind == "seq2seq":
            rows = [ids(e.prompt) + [2] for e in examples]
            mask = [[1] * len(r) for r in rows]
            return {"input_ids": pad(rows, 0), "attention_mask": pad(mask, 0),
                    "labels": pad([ids(e.answer) + [2] for e in examples], -100)}
        rows = [ids(e.prompt) for e in examples]
        mask = [[1] * len(r) for r in rows]
        labels = torch.tensor([int(e.answer) for e in examples])
        return {"input_ids": pad(rows, 0), "attention_mask": pad(mask, 0), "labels": labels,
                "label_mask": torch.ones(len(examples), 3, dtype=torch.bool)}

    return collate


def make_stream(n_tasks: int = 2, n_train: int = 12) -> TaskStream:
    tasks = []
    for t in range(n_tasks):
        train = [Example(f"q{t}{i} abc{i * (t + 3)}", str((i + t) % 3)) for i in range(n_train)]
        tasks.append(Task(name=f"task{t}", train=train, test=train[:2]))
    return TaskStream("toy", tasks)


def make_ctx(model, kind: str, family: str, stream: TaskStream, logs: list | None = None):
    from accelerate import Accelerator

    return StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=stream,
                           model_kind=kind, model_family=family, seed=0, trainer=None,
                           loss_fn=compute_loss, collate=make_collate(kind),
                           log=(logs.append if logs is not None else (lambda values: None)))


def make_config(**overrides) -> SVDOrthogonalConfig:
    # These tests check the projection from the first task on, so they ask for
    # first_task=constrained unless they say otherwise (the default, full, leaves task 0
    # unconstrained: see the first_task tests).
    overrides = {"first_task": "constrained", **overrides}
    node = OmegaConf.merge(OmegaConf.structured(SVDOrthogonalConfig), overrides)
    return node  # an OmegaConf node validated against the dataclass, as the runner passes


def build(family: str, logs: list | None = None, n_tasks: int = 2, **overrides):
    model, kind = tiny(family)
    stream = make_stream(n_tasks)
    strategy = SVDOrthogonal(make_config(**overrides))
    ctx = make_ctx(model, kind, family, stream, logs)
    strategy.setup(ctx)
    return strategy, model, ctx


def new_optimizer(model, weight_decay: float = 0.1, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_steps(strategy, model, ctx, t: int, steps: int, optimizer, accum: int = 2,
                clip: float | None = 1.0) -> None:
    """The loop's hook order for `steps` optimizer steps of task t."""
    train = ctx.stream[t].train
    model.train()
    for step in range(steps):
        for i in range(accum):
            lo = ((step * accum + i) * 3) % len(train)
            batch = ctx.collate((train + train)[lo:lo + 3])
            (ctx.loss_fn(model, batch) / accum).backward()
        strategy.after_backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        strategy.before_optimizer_step()
        optimizer.step()
        strategy.after_optimizer_step()
        optimizer.zero_grad(set_to_none=False)


def run_task(strategy, model, ctx, t: int, steps: int = 4, weight_decay: float = 0.1):
    strategy.before_task(t, ctx.stream[t])
    optimizer = new_optimizer(model, weight_decay)
    train_steps(strategy, model, ctx, t, steps, optimizer)
    strategy.after_task(t, ctx.stream[t])


def logical(target, w: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix of a target (GPT-2 Conv1D stores (in, out))."""
    return w.T if target.transposed else w


def top_k(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :k], vh[:k].T


# --------------------------------------------------------------------- rank rules
def test_adaptive_ranks_on_hand_numbers():
    # min-max: I = [0.2, 0.4, 0.6] -> [0, 0.5, 1]; r = 0.1 + I * 0.7 = [0.1, 0.45, 0.8]
    assert adaptive_ranks([0.2, 0.4, 0.6], [10, 10, 10], 0.1, 0.8) == [1, 5, 8]  # 4.5 -> 5
    # r * dim = 0.1*64 = 6.4 -> 6; 0.45*32 = 14.4 -> 14; 0.8*16 = 12.8 -> 13
    assert adaptive_ranks([0.2, 0.4, 0.6], [64, 32, 16], 0.1, 0.8) == [6, 14, 13]
    # mixed sign: the least important layer keeps mrr, the most important trr
    assert adaptive_ranks([-0.2, 0.6], [10, 10], 0.1, 0.8) == [1, 8]
    assert adaptive_ranks([], [], 0.1, 0.8) == []


def test_adaptive_ranks_mean_option_keeps_the_earlier_reading():
    # mean I = 0.4 -> [0.5, 1, 1.5]; r = [0.45, 0.8, 1.15] -> 11.5 clamps to 9
    assert adaptive_ranks([0.2, 0.4, 0.6], [10, 10, 10], 0.1, 0.8, "mean") == [5, 8, 9]
    # mean 0.2 -> [-1, 3]: r = -0.6 (below mrr) -> 0 ; r = 2.2 -> dim - 1 (near-frozen)
    assert adaptive_ranks([-0.2, 0.6], [10, 10], 0.1, 0.8, "mean") == [0, 9]
    assert adaptive_ranks([0.0, 0.0], [10, 10], 0.1, 0.8, "mean") == [8, 8]  # no signal: trr
    with pytest.raises(ValueError, match="normalisation"):
        adaptive_ranks([0.1], [10], 0.1, 0.8, "zscore")


def test_adaptive_fractions_stay_within_mrr_trr_on_mixed_sign_importances():
    # LLM-attention-like: small, mixed-sign cosines, one layer far above the mean
    imps = [-0.31, 0.004, -0.002, 0.9, 0.011, -0.05, 0.0, 0.27]
    dim, mrr, trr = 1000, 0.1, 0.8
    ks = adaptive_ranks(imps, [dim] * len(imps), mrr, trr)
    fractions = [k / dim for k in ks]
    assert all(mrr - 1e-9 <= f <= trr + 1e-9 for f in fractions), fractions
    assert fractions[imps.index(min(imps))] == pytest.approx(mrr)
    assert fractions[imps.index(max(imps))] == pytest.approx(trr)
    order = sorted(range(len(imps)), key=imps.__getitem__)
    assert [ks[i] for i in order] == sorted(ks)  # more important -> larger k
    assert len(set(ks)) == len(ks)  # distinct importances, distinct k at this dim
    # the mean normalisation leaves the range on the same numbers (what min-max fixes)
    mean_fractions = [k / dim for k in adaptive_ranks(imps, [dim] * len(imps), mrr, trr, "mean")]
    assert min(mean_fractions) < mrr and max(mean_fractions) > trr


def test_adaptive_ranks_degenerate_importances():
    # all equal (positive, zero or negative): no signal to rank by -> every layer at trr
    assert adaptive_ranks([0.3, 0.3], [20, 40], 0.1, 0.8) == [16, 32]
    assert adaptive_ranks([0.0, 0.0], [10, 10], 0.1, 0.8) == [8, 8]
    assert adaptive_ranks([-0.4, -0.4, -0.4], [10, 10, 10], 0.1, 0.8) == [8, 8, 8]
    assert adaptive_ranks([0.5], [10], 0.1, 0.8) == [8]  # one layer
    # non-finite values get trr; the finite ones are normalised among themselves
    nan, inf = float("nan"), float("inf")
    assert adaptive_ranks([nan, 0.2, 0.4], [10, 10, 10], 0.1, 0.8) == [8, 1, 8]
    assert adaptive_ranks([inf, -0.2, 0.6, -inf], [10] * 4, 0.1, 0.8) == [8, 1, 8, 8]
    assert adaptive_ranks([nan, 0.5], [10, 10], 0.1, 0.8) == [8, 8]  # one finite value
    assert adaptive_ranks([nan, nan], [10, 10], 0.1, 0.8) == [8, 8]
    # mrr == trr: every layer at that fraction whatever the importances
    assert adaptive_ranks([-1.0, 0.0, 1.0], [10] * 3, 0.5, 0.5) == [5, 5, 5]


def test_ratio_ranks_and_schedule():
    assert ratio_ranks([32, 64, 7, 1], 0.75) == [24, 48, 5, 0]  # 5.25 -> 5; dim 1 -> 0
    assert ratio_ranks([32], 1.0) == [31]  # clamped: one direction stays trainable
    assert ratio_ranks([10], 0.7) == [7]  # 0.7 * 10 = 7.000000000000001, not 6
    assert ratio_ranks([10], 1 - 0.3) == [7]  # 0.7 * 10 = 6.999999999999999 -> 7
    assert scheduled_fraction(0.75, 0, 0.1, 0.9) == 0.75
    assert scheduled_fraction(0.75, 1, 0.1, 0.9) == pytest.approx(0.85)
    assert scheduled_fraction(0.75, 2, 0.1, 0.9) == 0.9  # capped
    assert scheduled_fraction(0.75, 5, 0.0, 0.9) == 0.75  # step 0: off


def test_ratio_mode_k_through_the_strategy():
    strategy, model, ctx = build("llama", **{"rank": {"mode": "ratio"}})
    strategy.before_task(0, ctx.stream[0])
    ks = {name: per[0] for name, per in strategy.report()["k_per_target"].items()}
    # q/k/v/o 32x32 -> floor(32 * 0.75) = 24; gate/up (64, 32) and down (32, 64) -> 24
    assert set(map(tuple, ks.values())) == {(24, 24)}
    strategy.after_task(0, ctx.stream[0])


def test_ratio_schedule_grows_k_per_task():
    strategy, model, ctx = build("llama", **{"rank": {"mode": "ratio", "schedule_step": 0.1,
                                                      "schedule_cap": 0.9}})
    for t in range(2):
        run_task(strategy, model, ctx, t, steps=1)
    ks = strategy.report()["k_per_target"]["model.layers.0.self_attn.q_proj.weight"]
    assert [k for k, _ in ks] == [24, 27]  # floor(32 * 0.75), floor(32 * 0.85)


# --------------------------------------------------------------------- targets
TARGETS = SVDOrthogonalConfig().targets


@pytest.mark.parametrize("family,count,example", [
    ("gpt2", 8, "transformer.h.1.attn.c_attn.weight"),
    ("llama", 14, "model.layers.0.mlp.gate_proj.weight"),
    ("t5", 32, "decoder.block.1.layer.1.EncDecAttention.k.weight"),
    ("bert", 12, "bert.encoder.layer.0.output.dense.weight"),
])
def test_targets_per_family(family, count, example):
    model, _ = tiny(family)
    targets = find_targets(model, family, TARGETS)
    names = [t.name for t in targets]
    assert len(names) == count and example in names
    assert all(t.param.dim() == 2 for t in targets)
    for bad in ("wte", "wpe", "embed_tokens", "lm_head", "shared", "norm", "ln_", "LayerNorm",
                "relative_attention_bias", "pooler", "classifier", "embeddings"):
        assert not any(bad in n for n in names), bad
    assert all(t.transposed == (family == "gpt2") for t in targets)


def test_t5_counts_by_kind():
    model, _ = tiny("t5")
    names = [t.name for t in find_targets(model, "t5", TARGETS)]
    # encoder: 4 self-attention + wi, wo per block; decoder adds 4 cross-attention
    assert sum(".SelfAttention." in n for n in names) == 16
    assert sum(".EncDecAttention." in n for n in names) == 8
    assert sum(".DenseReluDense." in n for n in names) == 8


def test_unknown_family_rule_takes_every_2d_block_weight():
    model, _ = tiny("llama")
    known = {t.name for t in find_targets(model, "llama", TARGETS)}
    fallback = {t.name for t in find_targets(model, "some_new_arch", TARGETS)}
    assert fallback == known  # the 7 linears per block; norms are 1-D, embeddings outside

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Embedding(8, 16)  # an embedding inside a block is skipped
            self.proj = torch.nn.Linear(16, 24)
            self.norm = torch.nn.LayerNorm(24)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 16)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(24, 10)

    names = [t.name for t in find_targets(Net(), "net", TARGETS)]
    assert names == ["blocks.0.proj.weight", "blocks.1.proj.weight"]


def test_patterns_that_match_nothing_name_the_key():
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match=r"strategy\.targets\.llama"):
        find_targets(model, "llama", {"llama": ["no_such_module"]})


# --------------------------------------------------------------------- invariants
def _task_invariants(family: str, steps: int = 4, **overrides):
    strategy, model, ctx = build(family, **overrides)
    targets = strategy.targets
    start = {t.name: logical(t, t.param.detach().clone()) for t in targets}
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if n not in start}
    run_task(strategy, model, ctx, 0, steps=steps)
    report = strategy.report()
    results = []
    for t in targets:
        k_left, k_right = report["k_per_target"][t.name][0]
        # (out, in) view: for Conv1D the stored U/V swap, so swap the ranks back.
        if t.transposed:
            k_left, k_right = k_right, k_left
        u, v = top_k(start[t.name], k_left)[0], top_k(start[t.name], k_right)[1]
        delta = (logical(t, t.param.detach()) - start[t.name]).double()
        results.append((t.name, u, v, delta, k_left))
    moved = any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in others.items())
    return strategy, results, moved


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_sided_invariant_over_a_task(family):
    _, results, moved = _task_invariants(family, **{"rank": {"mode": "ratio"}})
    assert moved  # untargeted parameters train as in seq_ft
    for name, u, v, delta, k in results:
        scale = float(delta.abs().max())
        assert scale > 1e-4, f"{name} did not train"
        assert k > 0
        tol = 1e-4 * scale + 1e-6
        assert float((u.T @ delta @ v).abs().max()) < tol, name
        assert float((u.T @ delta).abs().max()) < tol, name
        assert float((delta @ v).abs().max()) < tol, name


def test_high_block_invariant_over_a_task():
    _, results, _ = _task_invariants("gpt2", **{"projection": "high_block",
                                                "rank": {"mode": "ratio"}})
    one_sided_leak = 0.0
    for name, u, v, delta, _ in results:
        scale = float(delta.abs().max())
        assert float((u.T @ delta @ v).abs().max()) < 1e-4 * scale + 1e-6, name
        one_sided_leak = max(one_sided_leak, float((u.T @ delta).abs().max()) / scale)
    assert one_sided_leak > 1e-2  # high_block lets U^T dW != 0 (only the block is kept)


def test_adaptive_mode_invariant_and_importance_report():
    strategy, results, _ = _task_invariants("gpt2")
    report = strategy.report()
    task0 = report["tasks"][0]
    assert "current task 'task0' (t=0)" == task0["rank_source"]
    assert task0["importance_seconds"] > 0 and task0["basis_seconds"] >= task0["svd_seconds"]
    imps = report["importance_per_target"]
    assert len(imps) == 8 and all(len(v) == 1 and -1 <= v[0] <= 1 for v in imps.values())
    # k follows the formula on the recorded importances
    names = list(imps)
    dims = [min(report["shapes"][n]) for n in names]
    want = adaptive_ranks([imps[n][0] for n in names], dims, 0.1, 0.8)
    assert [report["k_per_target"][n][0][0] for n in names] == want
    assert report["k_summary"]["min"] == min(want) and report["k_summary"]["max"] == max(want)
    assert any(k > 0 for *_, k in results)
    for name, u, v, delta, k in results:
        if k == 0:  # a random-init layer with negative importance keeps nothing
            continue
        scale = float(delta.abs().max())
        assert float((u.T @ delta).abs().max()) < 1e-4 * scale + 1e-6, name
        assert float((delta @ v).abs().max()) < 1e-4 * scale + 1e-6, name


def test_second_task_uses_previous_task_examples_and_logs():
    logs: list = []
    strategy, model, ctx = build("llama", logs=logs)
    for t in range(2):
        run_task(strategy, model, ctx, t, steps=1)
    report = strategy.report()
    assert report["tasks"][1]["rank_source"] == "previous task 'task0'"
    assert report["projection_steps"] == 2 and report["projection_seconds"] > 0
    assert 0 < report["basis_bytes"] <= report["state_bytes"] == strategy.extra_state_bytes()
    assert any("svd/k_mean" in entry for entry in logs)


def _block_leak(strategy, model, ctx, t: int, k_from_report: bool = True):
    """Run task t; per target, max |U^T dW V| / max |dW| with U, V the top-k of the weights
    at the task's start (k: the task's recorded k, or floor(32 * 0.75) = 24)."""
    targets = strategy.targets
    start = {tg.name: tg.param.detach().clone() for tg in targets}
    run_task(strategy, model, ctx, t, steps=3)
    leaks = {}
    for tg in targets:
        k = strategy.report()["k_per_target"][tg.name][t][0] if k_from_report else 24
        u, v = top_k(start[tg.name], k)
        delta = (tg.param.detach() - start[tg.name]).double()
        leaks[tg.name] = float((u.T @ delta @ v).abs().max()) / float(delta.abs().max())
    return leaks


def test_first_task_defaults_to_full():
    assert SVDOrthogonalConfig().first_task == "full"
    from tests.helpers import compose

    assert compose(["strategy=svd_orthogonal"]).strategy.first_task == "full"


@pytest.mark.parametrize("mode", ["ratio", "adaptive"])
def test_first_task_full_trains_task_one_freely_and_constrains_task_two(mode):
    strategy, model, ctx = build("llama", n_tasks=3, first_task="full", **{"rank": {"mode": mode}})
    # task 1 (t=0): no bases, no projection; its update has a component in every direction,
    # including the block of the top-24 singular directions the constrained run preserves
    free = _block_leak(strategy, model, ctx, 0, k_from_report=False)
    assert all(leak > 1e-2 for leak in free.values()), free
    report = strategy.report()
    assert report["first_task"] == "full" and report["projection_steps"] == 0
    task0 = report["tasks"][0]
    assert task0["rank_source"] == "first_task=full (unconstrained)"
    assert task0["k_max"] == 0 and task0["basis_bytes"] == 0 and task0["svd_seconds"] == 0
    assert all(per == [[0, 0]] for per in report["k_per_target"].values())
    if mode == "adaptive":  # one importance entry per task, none computed for task 1
        assert all(v == [None] for v in report["importance_per_target"].values())
    # tasks 2 and 3 are constrained: U^T dW V = 0 for the bases taken at their start
    for t in (1, 2):
        leaks = _block_leak(strategy, model, ctx, t)
        assert all(leak < 1e-4 for leak in leaks.values()), (t, leaks)
    report = strategy.report()
    assert report["projection_steps"] == 6
    assert [h["task"] for h in report["tasks"]] == [0, 1, 2]
    assert all(len(per) == 3 and per[1][0] > 0 for per in report["k_per_target"].values())
    if mode == "adaptive":
        assert report["tasks"][1]["rank_source"] == "previous task 'task0'"
        assert all(len(v) == 3 and v[0] is None and v[1] is not None
                   for v in report["importance_per_target"].values())


def test_first_task_constrained_constrains_task_one():
    strategy, model, ctx = build("llama", first_task="constrained", **{"rank": {"mode": "ratio"}})
    leaks = _block_leak(strategy, model, ctx, 0)
    assert all(leak < 1e-4 for leak in leaks.values()), leaks
    assert strategy.report()["tasks"][0]["k_max"] == 24


def test_first_task_full_checkpoint_mid_task_one_carries_no_bases():
    strategy, model, ctx = build("gpt2", first_task="full", **{"rank": {"mode": "ratio"}})
    strategy.before_task(0, ctx.stream[0])
    state = strategy.state_dict()
    assert state["task"] == -1 and state["in_task"] is False and state["sharded"] is None
    model_b, kind = tiny("gpt2")
    resumed = SVDOrthogonal(make_config(first_task="full", **{"rank": {"mode": "ratio"}}))
    resumed.setup(make_ctx(model_b, kind, "gpt2", ctx.stream))
    resumed.load_state_dict(state)
    assert resumed.extra_state_bytes() == 0 and not resumed._in_task
    assert resumed.report()["tasks"] == strategy.report()["tasks"]


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_seq2seq_and_classifier_paths(family):
    _, results, _ = _task_invariants(family, steps=2)
    for name, u, v, delta, k in results:
        scale = float(delta.abs().max())
        if scale == 0 or k == 0:  # a layer the loss does not reach / that keeps nothing
            continue
        assert float((u.T @ delta @ v).abs().max()) < 1e-4 * scale + 1e-6, name


def test_bf16_bases_keep_the_invariant_to_bf16_tolerance():
    strategy, results, _ = _task_invariants("llama", **{"basis_dtype": "bf16",
                                                        "rank": {"mode": "ratio"}})
    for name, u, v, delta, _ in results:
        scale = float(delta.abs().max())
        assert float((u.T @ delta @ v).abs().max()) < 5e-2 * scale, name
    fp32, _, _ = _task_invariants("llama", **{"rank": {"mode": "ratio"}})
    assert strategy.report()["basis_bytes"] * 2 == fp32.report()["basis_bytes"]
    assert strategy.extra_state_bytes() < fp32.extra_state_bytes()


def test_freeze_untargeted():
    strategy, model, ctx = build("gpt2", **{"freeze_untargeted": True, "rank": {"mode": "ratio"}})
    target_names = {t.name for t in strategy.targets}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.before_task(0, ctx.stream[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == target_names
    train_steps(strategy, model, ctx, 0, 2, new_optimizer(model))
    strategy.after_task(0, ctx.stream[0])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in target_names), n
        assert p.requires_grad


# --------------------------------------------------------------------- state
def test_state_dict_round_trip_resumes_mid_task_identically():
    strategy, model, ctx = build("gpt2", **{"rank": {"mode": "ratio"}})
    strategy.before_task(0, ctx.stream[0])
    optimizer = new_optimizer(model)
    train_steps(strategy, model, ctx, 0, 2, optimizer)
    # "checkpoint": model, optimizer and strategy state, through a torch.save round trip
    import io

    buffer = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "optimizer": optimizer.state_dict(),
                "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model_b, kind = tiny("gpt2")
    model_b.load_state_dict(saved["model"])
    ctx_b = make_ctx(model_b, kind, "gpt2", ctx.stream)
    resumed = SVDOrthogonal(make_config(**{"rank": {"mode": "ratio"}}))
    resumed.setup(ctx_b)
    resumed.load_state_dict(saved["strategy"])
    optimizer_b = new_optimizer(model_b)
    optimizer_b.load_state_dict(saved["optimizer"])
    assert resumed.extra_state_bytes() == strategy.extra_state_bytes()

    train_steps(strategy, model, ctx, 0, 3, optimizer)
    train_steps(resumed, model_b, ctx_b, 0, 3, optimizer_b)
    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), n
    strategy.after_task(0, ctx.stream[0])
    resumed.after_task(0, ctx.stream[0])
    assert resumed.report()["k_per_target"] == strategy.report()["k_per_target"]


def test_accumulate_keeps_the_old_subspace():
    overrides = {"bases": "accumulate", "rank": {"mode": "ratio", "unfreeze_ratio": 0.75}}
    strategy, model, ctx = build("llama", **overrides)
    targets = strategy.targets
    run_task(strategy, model, ctx, 0, steps=3)
    k0 = {n: per[0][0] for n, per in strategy.report()["k_per_target"].items()}
    old = {n: (u.clone(), v.clone()) for n, (u, v) in strategy._accumulated.items()}
    start1 = {t.name: t.param.detach().clone() for t in targets}
    run_task(strategy, model, ctx, 1, steps=3)
    report = strategy.report()
    for t in targets:
        kl, kr = report["k_per_target"][t.name][1]
        assert k0[t.name] == 8 and kl >= k0[t.name] and kr >= k0[t.name]  # floor(32 * .25)
        assert max(kl, kr) <= int(0.9 * min(t.shape))  # rank_budget cap
        u1, v1 = strategy._accumulated[t.name]
        u0, v0 = old[t.name]
        # span(U_0) inside span(U_1): the old preserved subspace is still preserved
        assert float((u0 - u1 @ (u1.T @ u0)).abs().max()) < 1e-4
        assert float((v0 - v1 @ (v1.T @ v0)).abs().max()) < 1e-4
        # and task 1 did not touch it (two-sided: neither side)
        delta = (t.param.detach() - start1[t.name]).double()
        scale = float(delta.abs().max())
        assert float((u0.double().T @ delta).abs().max()) < 1e-4 * scale + 1e-6, t.name
        assert float((delta @ v0.double()).abs().max()) < 1e-4 * scale + 1e-6, t.name


# --------------------------------------------------------------------- config
def _field_tree(obj) -> dict:
    return {f.name: (_field_tree(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name))
                     else None) for f in fields(obj)}


def _yaml_tree(node) -> dict:
    return {k: (_yaml_tree(v) if isinstance(v, dict) and k != "targets" else None)
            for k, v in node.items()}


def test_composed_defaults_are_the_dataclass_defaults():
    """The YAML lists nothing of its own: strategy=svd_orthogonal is the schema's defaults."""
    from tests.helpers import compose

    composed = OmegaConf.to_container(compose(["strategy=svd_orthogonal"]).strategy)
    assert composed == OmegaConf.to_container(OmegaConf.structured(SVDOrthogonalConfig))


@pytest.mark.parametrize("override,key", [
    ({"rank": {"mode": "fixed"}}, "strategy.rank.mode"),
    ({"projection": "left"}, "strategy.projection"),
    ({"bases": "union"}, "strategy.bases"),
    ({"basis_dtype": "fp8"}, "strategy.basis_dtype"),
    ({"svd_method": "lanczos"}, "strategy.svd_method"),
    ({"rank": {"mrr": 0.9, "trr": 0.5}}, "strategy.rank.mrr"),
    ({"rank_budget": 0.0}, "strategy.rank_budget"),
    ({"first_task": "frozen"}, "strategy.first_task"),
    ({"rank": {"normalise": "zscore"}}, "strategy.rank.normalise"),
])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SVDOrthogonal(make_config(**override))


def test_registered():
    from cl_runner.strategies import registry

    reg = registry.get("svd_orthogonal")
    assert reg.cls is SVDOrthogonal and reg.config is SVDOrthogonalConfig


def test_t5_sculpting_preset_composes_with_the_authors_settings():
    from cl_runner.strategies.base import plain_config
    from tests.helpers import compose

    cfg = compose(["experiment=t5_sculpting", "task_stream.data_dir=/data"])
    assert cfg.experiment_name == "t5_sculpting" and cfg.model.name == "t5_large"
    assert (cfg.task_stream.name, cfg.task_stream.order) == ("cl_benchmark", "order1")  # from t5_standard
    s = cfg.strategy
    assert s.name == "svd_orthogonal" and s.first_task == "full" and s.projection == "two_sided"
    # the authors' code: k = floor(max(m, n) * 0.25 t), capped, from task 2 on
    assert (s.rank.mode, s.rank.fraction_of, s.rank.unfreeze_ratio) == ("ratio", "max_dim", 1.0)
    assert (s.rank.schedule_step, s.rank.schedule_cap) == (0.25, 1.0)
    tr = cfg.trainer
    assert (tr.lr, tr.epochs, tr.batch_size, tr.weight_decay, tr.max_grad_norm) == (5.0e-5, 1, 8, 0.01, None)
    assert cfg.evaluation.max_new_tokens == 16 and cfg.model.max_length == 512
    SVDOrthogonal(s)  # the options validate
    # T5-large shapes: q (1024 x 1024) and wi (4096 x 1024) at tasks 2..4
    fractions = [scheduled_fraction(1.0 - s.rank.unfreeze_ratio, t, s.rank.schedule_step, s.rank.schedule_cap)
                 for t in (1, 2, 3)]
    assert [ratio_ranks([1024, 1024], f, [1024, 4096]) for f in fractions] == [[256, 1023], [512, 1023], [768, 1023]]
    # cross-attention is left free: on a tiny T5, self-attention and feed-forward only
    model, _ = tiny("t5")
    names = [t.name for t in find_targets(model, "t5", plain_config(s.targets))]
    assert len(names) == 24 and not any("EncDecAttention" in n for n in names)
    assert sum(".SelfAttention." in n for n in names) == 16
    assert sum(".DenseReluDense." in n for n in names) == 8


def test_ratio_ranks_of_max_dim_match_the_sculpting_code():
    """fraction_of=max_dim: k = floor(max(m, n) * f), at most min(m, n) - 1 (one direction
    stays trainable; the authors' code lets k reach min(m, n))."""
    assert ratio_ranks([4, 4, 6], 0.5) == [2, 2, 3]  # min_dim
    assert ratio_ranks([4, 4, 6], 0.5, [4, 10, 8]) == [2, 3, 4]
    assert ratio_ranks([4], 0.9, [10]) == [3]


def test_fraction_of_is_checked():
    with pytest.raises(ValueError, match="strategy.rank.fraction_of"):
        SVDOrthogonal(SVDOrthogonalConfig(rank=SVDRankConfig(fraction_of="max")))


@pytest.mark.parametrize("first_task", ["full", "constrained"])
def test_first_task_on_the_fsdp_sharded_path(first_task):
    """The same first_task rule on FSDP2-sharded targets (ShardedSubspaces), in a one-process
    gloo group: with full, task 1 computes no bases and moves the preserved block; task 2
    (and, with constrained, task 1) keeps U^T dW V = 0."""
    import torch.distributed as dist

    from cl_runner.distributed.sharding import shard_model
    from tests.helpers import compose

    trainer = compose(["model=tiny_llama", "trainer.sharding=fsdp"]).trainer
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, kind = tiny("llama")
        model = shard_model(model, trainer)
        strategy = SVDOrthogonal(make_config(first_task=first_task, **{"rank": {"mode": "ratio"}}))
        ctx = make_ctx(model, kind, "llama", make_stream(2))
        strategy.setup(ctx)
        assert strategy.sharded is not None and strategy.groups is None

        def full(tg) -> torch.Tensor:
            return tg.param.detach().full_tensor().clone()

        for t in range(2):
            start = {tg.name: full(tg) for tg in strategy.targets}
            run_task(strategy, model, ctx, t, steps=3)
            constrained = t == 1 or first_task == "constrained"
            assert (strategy.sharded.nbytes() > 0) == constrained
            for tg in strategy.targets:
                k = strategy.report()["k_per_target"][tg.name][t][0]
                assert k == (24 if constrained else 0)
                u, v = top_k(start[tg.name], 24)
                delta = (full(tg) - start[tg.name]).double()
                leak = float((u.T @ delta @ v).abs().max()) / float(delta.abs().max())
                assert (leak < 1e-4) if constrained else (leak > 1e-2), (t, tg.name, leak)
        assert strategy.report()["projection_steps"] == (3 if first_task == "full" else 6)
    finally:
        dist.destroy_process_group()
