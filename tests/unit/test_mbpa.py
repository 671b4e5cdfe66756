"""MbPA++ on hand cases: neighbour selection, the replay schedule, the memory write,
local adaptation leaving the model bit-identical, the stack passing the hook on, the cost
line, state round-trip, option errors and the memory estimate."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.mbpa import MbPA, MbPAConfig, sample_indices
from cl_runner.strategies.parts.local_adaptation import (
    adapt_locally,
    l2_pull,
    nearest_neighbours,
    replay_steps_after,
    restore,
)
from cl_runner.strategies.stack import StrategyStack
from cl_runner.streams.task import Example, Task, TaskStream

pytestmark = pytest.mark.usefixtures("one_thread")


# -- neighbours ---------------------------------------------------------------------------
def test_neighbours_are_the_k_nearest_by_euclidean_distance():
    keys = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    # squared distances from (0, 1): 1, 18, 2, 1, 181
    assert nearest_neighbours(keys, torch.tensor([0.0, 1.0]), 3) == [0, 3, 2]
    assert nearest_neighbours(keys, torch.tensor([9.0, 9.0]), 1) == [4]
    assert nearest_neighbours(keys, torch.tensor([0.0, 1.0]), 10) == [0, 3, 2, 1, 4]  # K > memory: all of it


def test_neighbour_ties_go_to_the_earlier_memory():
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # all at distance 1 from 0
    assert nearest_neighbours(keys, torch.zeros(2), 2) == [0, 1]
    assert nearest_neighbours(keys.flip(0), torch.zeros(2), 2) == [0, 1]


def test_euclidean_not_dot_product():
    # TRACE ranks by dot product, which prefers the long key; the paper's distance the close one.
    keys = torch.tensor([[10.0, 0.0], [1.0, 0.0]])
    assert nearest_neighbours(keys, torch.tensor([1.0, 0.0]), 1) == [1]
    assert nearest_neighbours(keys, torch.tensor([1.0, 0.0]), 1, "dot") == [0]  # distance: dot, as TRACE
    assert nearest_neighbours(torch.tensor([[1.0], [2.0], [2.0]]), torch.tensor([1.0]), 2, "dot") == [1, 2]


def test_a_group_of_queries_shares_the_neighbours_of_its_mean():
    keys = torch.tensor([[0.0], [2.0], [5.0], [-4.0]])
    # queries -1 and 3: mean 1; summed squared distances 10, 10, 52, 34 -> memories 0 and 1
    assert nearest_neighbours(keys, torch.tensor([[-1.0], [3.0]]), 2) == [0, 1]


# -- replay schedule ----------------------------------------------------------------------
def test_replay_steps_follow_the_count_of_new_examples():
    # 16 examples a step, a replay every 32: after steps 2, 4, 6; 16 examples = one step
    assert [replay_steps_after(s, 16, 32, 16) for s in range(1, 7)] == [0, 1, 0, 1, 0, 1]
    # the paper's 100 every 10,000 at batch 32: step 313 passes 10,000; 100 -> 4 steps of 32
    assert [s for s in range(1, 700) if replay_steps_after(s, 32, 10000, 100)] == [313, 625]
    assert replay_steps_after(313, 32, 10000, 100) == 4
    # a step of 64 passes two multiples of 32: both replays, 2 x 16 = one step of 64
    assert replay_steps_after(1, 64, 32, 16) == 1 and replay_steps_after(1, 64, 32, 100) == 4
    assert replay_steps_after(5, 16, 0, 100) == 0 and replay_steps_after(2, 16, 32, 0) == 0


def test_sample_indices_draw_without_replacement_while_they_last():
    import random

    assert sorted(sample_indices(5, 5, random.Random(0))) == [0, 1, 2, 3, 4]
    drawn = sample_indices(3, 7, random.Random(0))
    assert len(drawn) == 7 and sorted(drawn[:3]) == [0, 1, 2] and sorted(drawn[3:6]) == [0, 1, 2]


# -- a strategy on a hand-made model --------------------------------------------------------
class Keyed(nn.Module):
    """Hidden state = w times the prompt's number, so the mean-pooled key of the model as built
    is half that number; the loss pulls w + b toward the batch's mean answer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5]))
        self.b = nn.Parameter(torch.tensor([0.25]))

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **_):
        hidden = input_ids.float().unsqueeze(-1) * self.w
        return SimpleNamespace(hidden_states=(hidden, hidden))


class Collate:
    """Examples whose prompt and answer are numbers, as tensors."""

    def __call__(self, examples):
        return {"input_ids": torch.tensor([[float(e.prompt)] for e in examples]),
                "target": torch.tensor([float(e.answer) for e in examples]),
                "attention_mask": torch.ones(len(examples), 1)}

    def prompts(self, examples, room):
        return {"input_ids": torch.tensor([[int(e.prompt)] for e in examples]),
                "attention_mask": torch.ones(len(examples), 1, dtype=torch.long)}


def loss_fn(model, batch):
    return ((model.w * 1.0 + model.b - batch["target"]) ** 2).mean()


def ex(prompt: int, answer: float = 0.0, task: str = "a") -> Example:
    return Example(str(prompt), str(answer), task)


def make(model: nn.Module, batch_size: int = 2, accum: int = 1, **options) -> MbPA:
    stream = TaskStream("s", [Task("a", [ex(i) for i in range(8)], [ex(0)]), Task("b", [], [ex(0)])])
    s = MbPA(OmegaConf.structured(MbPAConfig(**options)))
    s.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=stream, model_kind="causal",
                            model_family="test", seed=0, trainer=SimpleNamespace(batch_size=batch_size,
                                                                                 grad_accum=accum),
                            loss_fn=loss_fn, collate=Collate()))
    return s


def plan(s: MbPA, t: int, batches: list[list[Example]], steps: int) -> list[list[Example]]:
    total = s.num_train_steps(t, steps)
    out = list(s.compose_batches(t, iter(batches)))
    assert len(out) == total * s.ctx.trainer.grad_accum
    return out


def test_every_example_is_written_once_with_replay_after_every_second_step():
    s = make(Keyed(), replay_every_examples=4, replay_examples=2)
    batches = [[ex(1), ex(2)], [ex(3), ex(1)], [ex(4), ex(5)], [ex(6), ex(7)]]
    out = plan(s, 0, batches, 4)
    # 4 new steps, a replay step (2 examples) after steps 2 and 4
    assert out[0:2] == batches[0:2] and out[3:5] == batches[2:4] and len(out) == 6
    assert [e.prompt for e in s.memory] == ["1", "2", "3", "4", "5", "6", "7"]  # "1" twice, kept once
    assert all(e.prompt in {"1", "2", "3"} for e in out[2])  # replay draws only what came before it
    assert s.replayed[0] == 4 and s.written_by == [0] * 7


def test_write_prob_and_the_cap_keep_part_of_the_stream():
    s = make(Keyed(), replay_examples=0, write_prob=0.5)
    plan(s, 0, [[ex(i), ex(i + 100)] for i in range(50)], 50)
    assert 30 <= len(s.memory) <= 70  # about half of 100, seeded
    again = make(Keyed(), replay_examples=0, write_prob=0.5)
    plan(again, 0, [[ex(i), ex(i + 100)] for i in range(50)], 50)
    assert again.memory == s.memory  # the same seed writes the same examples
    capped = make(Keyed(), replay_examples=0, max_per_task=3)
    plan(capped, 0, [[ex(i), ex(i + 100)] for i in range(4)], 4)
    assert [e.prompt for e in capped.memory] == ["0", "100", "1"]


def test_no_replay_before_anything_is_stored_and_a_replanned_task_writes_the_same():
    s = make(Keyed(), replay_every_examples=2, replay_examples=2)
    assert s.num_train_steps(0, 3) == 6
    plan(s, 0, [[ex(1), ex(2)], [ex(3), ex(4)], [ex(5), ex(6)]], 3)
    s.after_task(0, s.ctx.stream[0])
    first = list(s.memory)
    # a resumed task 0 plans again: its entries are written again, not added twice
    plan(s, 0, [[ex(1), ex(2)], [ex(3), ex(4)], [ex(5), ex(6)]], 3)
    assert s.memory == first
    # task 1 replays from its first step: the memory holds task 0's examples already
    assert s.num_train_steps(1, 1) == 2
    out = plan(s, 1, [[ex(7, task="b"), ex(8, task="b")]], 1)
    assert len(out) == 2 and len(out[1]) == 2 and s.written_by == [0] * 6 + [1] * 2


def test_keys_are_the_frozen_encoders_mean_pooled_states():
    model = Keyed()
    s = make(model, replay_examples=0)
    plan(s, 0, [[ex(3), ex(7)]], 1)
    with torch.no_grad():
        model.w.fill_(100.0)  # training moves the model, not the key encoder
    s.after_task(0, s.ctx.stream[0])
    assert s.keys.tolist() == [[1.5], [3.5]]


def test_local_adaptation_steps_by_hand_and_the_weights_come_back_bit_identical():
    model = Keyed()
    params = [model.w, model.b]
    before = [p.detach().clone() for p in params]
    batch = {"target": torch.tensor([2.0, 4.0])}  # mean target 3
    # loss = mean((w + b - y)^2): d/dw = d/db = 2 (w + b - 3) = -4.5 at w + b = 0.75; no pull at step 1
    stored = adapt_locally(model, params, loss_fn, batch, steps=1, lr=0.1, l2=1.0)
    assert model.w.item() == pytest.approx(0.95) and model.b.item() == pytest.approx(0.70)
    assert model.w.grad is None  # torch.autograd.grad: no .grad touched
    # step 2: task gradient 2 (1.65 - 3) = -2.7, pull 2 (theta - stored) = 0.9 on each
    adapt_locally(model, params, loss_fn, batch, steps=1, lr=0.1, l2=0.0)
    restore(params, stored)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert l2_pull(params, [b + 1 for b in before]).item() == pytest.approx(2.0)


def test_second_step_includes_the_pull_toward_the_stored_weights():
    model = Keyed()
    params = [model.w, model.b]
    batch = {"target": torch.tensor([2.0, 4.0])}
    adapt_locally(model, params, loss_fn, batch, steps=2, lr=0.1, l2=1.0)
    # step 2 at (0.95, 0.70): task -2.7 each; pull 2 * (0.45, 0.45) = 0.9 -> update -0.1 * (-1.8)
    assert model.w.item() == pytest.approx(1.13) and model.b.item() == pytest.approx(0.88)


def test_prediction_sees_adapted_weights_and_the_model_is_left_bit_identical():
    model = Keyed()
    s = make(model, replay_examples=0, neighbours=2, local_steps=3, local_lr=0.1)
    plan(s, 0, [[ex(1, 10.0), ex(2, 10.0)], [ex(50, -10.0), ex(51, -10.0)]], 2)
    s.after_task(0, s.ctx.stream[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def predict(chunk):
        seen.append((len(chunk), model.w.item()))
        return [f"p{e.prompt}" for e in chunk]

    out = s.predict_examples(0, 0, s.ctx.stream[0], [ex(0), ex(49)], predict)
    assert out == ["p0", "p49"]
    # query 0's neighbours answer 10 (w rises), query 49's answer -10 (w falls)
    assert seen[0][0] == 1 and seen[0][1] > 0.5 and seen[1][1] < 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert s.adaptations == 2 and s.test_time_seconds() > 0
    shared = []
    s.config.share_neighbours = 2
    s.predict_examples(0, 0, s.ctx.stream[0], [ex(0), ex(1)], lambda c: shared.append(len(c)) or ["x"] * len(c))
    assert shared == [2]


def test_without_memory_or_steps_the_plain_prediction_is_used():
    s = make(Keyed(), local_steps=0)
    assert s.predict_examples(0, 0, s.ctx.stream[0], [ex(1)], lambda c: ["plain"]) == ["plain"]
    s = make(Keyed())
    assert s.predict_examples(0, None, s.ctx.stream[0], [ex(1)], lambda c: ["plain"]) == ["plain"]


def test_the_stack_passes_prediction_through_every_member():
    class Tag(Strategy):
        def __init__(self, tag: str) -> None:
            super().__init__(None)
            self.name = tag

        def predict_examples(self, t, k, task, examples, predict):
            return [f"{self.name}({p})" for p in predict(examples)]

        def test_time_seconds(self) -> float:
            return 1.5

    stack = StrategyStack([Tag("base"), Tag("addon")])
    assert stack.predict_examples(0, 0, None, [ex(1)], lambda c: ["x"]) == ["base(addon(x))"]
    assert stack.test_time_seconds() == 3.0


def test_state_round_trip():
    s = make(Keyed(), replay_every_examples=2, replay_examples=2)
    plan(s, 0, [[ex(1), ex(2)], [ex(3), ex(4)]], 2)
    s.after_task(0, s.ctx.stream[0])
    s.adaptation_seconds = 2.5
    other = make(Keyed())
    other.load_state_dict(s.state_dict())
    assert other.memory == s.memory and other.written_by == s.written_by and torch.equal(other.keys, s.keys)
    assert other.replayed == s.replayed and other.test_time_seconds() == 2.5
    assert other.extra_state_bytes() == s.extra_state_bytes() == 4 * (1 + 3) + 4 * 4


@pytest.mark.parametrize("key,value", [("write_prob", 0.0), ("write_prob", 1.5), ("neighbours", -1),
                                       ("local_lr", 0.0), ("local_l2", -1.0), ("share_neighbours", 0),
                                       ("max_per_task", 0), ("replay_examples", -1), ("distance", "cosine")])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        MbPA(OmegaConf.structured(MbPAConfig(**{key: value})))


def test_cost_line_shows_the_test_time_part_of_eval():
    from cl_runner.reporting.summary import format_cost

    metrics = {"wall_time_s": 75.0, "train_time_s": 60.0, "eval_time_s": 6.0, "test_time_s": 4.0}
    assert format_cost(metrics) == "cost: 1m15s (train 1m00s, eval 6.0s, of which test-time adaptation 4.0s)"
    assert "test-time" not in format_cost({**metrics, "test_time_s": 0.0})


def test_memory_estimate_counts_the_key_encoder_and_the_stored_examples():
    from cl_runner.strategies.memory import ModelFacts, PlanInputs

    facts = ModelFacts(name="m", kind="causal", family="llama", source="", params=1000, matmul_params=900,
                       hidden=8, blocks=2, vocab=10, largest_unit=500, model=None)
    cfg = OmegaConf.create({"task_stream": {"train_size": 100}, "model": {"max_length": 16}})
    est = MbPA(OmegaConf.structured(MbPAConfig(write_prob=0.5))).memory_estimate(
        PlanInputs(cfg=cfg, facts=facts, n_tasks=3, param_bytes=2, trainable=1000))
    assert est.state_bytes == 1000 * 2  # the frozen copy
    assert est.host_bytes == 3 * 50 * (8 * 4 + 16 * 4)  # 50 examples a task: key + text bound
    assert est.transient_bytes == 2 * 1000 * 2  # a copy of the trainable weights and their gradients
    capped = MbPA(OmegaConf.structured(MbPAConfig(max_per_task=10))).memory_estimate(
        PlanInputs(cfg=cfg, facts=facts, n_tasks=3, param_bytes=2, trainable=1000))
    assert capped.host_bytes == 3 * 10 * (8 * 4 + 16 * 4)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_t5"])
def test_on_a_real_tiny_model_adaptation_changes_the_weights_and_evaluation_gives_them_back(model_name):
    from cl_runner.config.validate import validate
    from cl_runner.evaluation.predict import predict
    from cl_runner.models.batching import Collator, compute_loss
    from cl_runner.models.build import build_model
    from tests.helpers import compose

    cfg = validate(compose([f"model={model_name}"]))
    torch.manual_seed(0)
    bundle = build_model(cfg.model, None, None)
    model, kind = bundle.model, cfg.model.kind
    collate = Collator(kind, bundle.tokenizer, 64)
    train = [Example(f"I:{i:05d}=", f"{i + 1:05d}", "increment") for i in range(12)]
    stream = TaskStream("s", [Task("increment", train, train[:3])])
    s = MbPA(OmegaConf.structured(MbPAConfig(neighbours=4, local_steps=2, local_lr=0.5, replay_examples=0)))
    s.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=stream, model_kind=kind,
                            model_family="test", seed=0, trainer=SimpleNamespace(batch_size=4, grad_accum=1),
                            loss_fn=compute_loss, collate=collate))
    plan(s, 0, [train[i:i + 4] for i in range(0, 12, 4)], 3)
    s.after_task(0, stream[0])
    assert s.keys.shape == (12, model.config.d_model if kind == "seq2seq" else model.config.hidden_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = []
    decoding = SimpleNamespace(max_new_tokens=3, decoding="greedy", temperature=None, top_p=None)

    def plain(chunk):
        moved.append(any(not torch.equal(p, before[n]) for n, p in model.named_parameters()))
        return predict(model, collate, stream[0], chunk, decoding, batch_size=4)

    out = s.predict_examples(0, 0, stream[0], stream[0].test, plain)
    assert len(out) == 3 and moved == [True, True, True]  # each prediction saw adapted weights
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the stored model, bit for bit
    assert all(p.grad is None for p in model.parameters())


def test_cl_report_shows_and_writes_the_test_time(tmp_path):
    import json

    from cl_runner.reporting.report import csv_text, group_runs, load_run, table_row

    metrics = {"strategy": "mbpa", "task_stream": "s", "model": "m", "ACC": 0.5, "wall_time_s": 75.0,
               "test_time_s": 40.0, "tasks": ["a"]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    run = load_run(tmp_path / "metrics.json")
    assert run.test_time_s == 40.0 and table_row(run)[10] == "1m15s (test-time 40.0s)"
    header, row = csv_text(group_runs([run])).splitlines()
    assert dict(zip(header.split(","), row.split(",")))["test_time_s"] == "40.0"


def test_a_failing_step_gives_the_weights_back():
    model = Keyed()
    params = [model.w, model.b]
    before = [p.detach().clone() for p in params]
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return loss_fn(m, batch)

    with pytest.raises(RuntimeError):
        adapt_locally(model, params, failing, {"target": torch.tensor([3.0])}, steps=3, lr=0.1, l2=0.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
