"""Replay add-on: buffer filling, the replay share of every batch in both
compute_equivalent modes, uniformity over past tasks, determinism, state round-trip,
TRACE's separate pass."""
from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.replay import Replay, ReplayConfig, replay_slots
from cl_runner.streams.task import Example, Task, TaskStream
from tests.helpers import REPO, compose


def make_task(name: str, n: int) -> Task:
    train = [Example(f"{name}{i}", "x", name) for i in range(n)]
    return Task(name, train, train[:2])


STREAM = TaskStream("s", [make_task("a", 40), make_task("b", 60), make_task("c", 500)])


def make(seed: int = 0, batch_size: int = 20, grad_accum: int = 1, **options) -> Replay:
    strategy = Replay(OmegaConf.structured(ReplayConfig(enabled=True, **options)))
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=torch.nn.Linear(1, 1), stream=STREAM, model_kind="causal",
        model_family="test", seed=seed, trainer=SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum, lr=1e-3),
        loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}))
    return strategy


def after_two_tasks(**options) -> Replay:
    s = make(**options)
    s.after_task(0, STREAM[0])
    s.after_task(1, STREAM[1])
    return s


def new_batches(n: int, size: int) -> list[list[Example]]:
    """What the loop hands over for task c: n batches of `size` in stream order."""
    stream = itertools.cycle(STREAM[2].train)
    return [[next(stream) for _ in range(size)] for _ in range(n)]


def replayed(batch: list[Example]) -> int:
    return sum(e.task != "c" for e in batch)


# ---------------------------------------------------------------- buffer
def test_buffer_per_task_share_and_first():
    s = after_two_tasks(per_task=10)
    assert [len(s.buffer[0]), len(s.buffer[1])] == [10, 10]
    assert len(set(s.buffer[1])) == 10 and s.buffer[1] != STREAM[1].train[:10]  # a random sample...
    assert s.buffer[1] == after_two_tasks(per_task=10).buffer[1]  # ...seeded
    s = after_two_tasks(per_task=None, share=0.1, selection="first")
    assert s.buffer[0] == STREAM[0].train[:4] and s.buffer[1] == STREAM[1].train[:6]  # TRACE: first 10%
    s = after_two_tasks(per_task=None, share=None)
    assert len(s.buffer[1]) == 60  # both null: everything


# ---------------------------------------------------------------- mixing
def test_compute_equivalent_exact_replay_count_per_batch():
    # ratio 0.25 of B = 20: exactly 5 replay slots and 15 new examples in every batch.
    s = after_two_tasks(ratio=0.25)
    incoming = new_batches(12, 20)
    out = list(s.compose_batches(2, iter(incoming)))
    assert len(out) == 12 and all(len(b) == 20 for b in out)
    assert [replayed(b) for b in out] == [5] * 12
    # The new examples keep their stream order: the pushed-out ones start the next batch.
    new = [e for b in out for e in sorted((e for e in b if e.task == "c"), key=lambda e: int(e.prompt[1:]))]
    assert new == [e for b in incoming for e in b][: 12 * 15]
    assert s.report()["replayed_examples"] == {"c": 60}


def test_added_replay_keeps_every_new_example():
    # ratio 0.2 with B = 16: k / (16 + k) = 0.2 gives k = 4, batches of 20.
    s = after_two_tasks(ratio=0.2, compute_equivalent=False)
    incoming = new_batches(10, 16)
    out = list(s.compose_batches(2, iter(incoming)))
    assert [len(b) for b in out] == [20] * 10 and [replayed(b) for b in out] == [4] * 10
    for before, after in zip(incoming, out):
        assert sorted(e.prompt for e in after if e.task == "c") == sorted(e.prompt for e in before)


def test_fractional_share_is_kept_over_batches():
    # 0.05 of 16 = 0.8 per batch: 4 of every 5 batches carry one replay example.
    assert [replay_slots(0.05, 16 * i, 16) for i in range(5)] == [1, 1, 0, 1, 1]
    s = after_two_tasks(ratio=0.05, batch_size=16)
    out = list(s.compose_batches(2, iter(new_batches(100, 16))))
    assert sum(replayed(b) for b in out) == 80


def test_replay_is_uniform_over_past_tasks():
    s = after_two_tasks(ratio=0.25, per_task=30)
    out = list(s.compose_batches(2, iter(new_batches(25, 20))))
    counts = Counter(e.task for b in out for e in b if e.task != "c")
    assert counts["a"] + counts["b"] == 125 and abs(counts["a"] - counts["b"]) <= 1
    # Within a task, every buffered example is used once before any is used again.
    used_a = Counter(e.prompt for b in out for e in b if e.task == "a")
    assert max(used_a.values()) - min(used_a.values()) <= 1


def test_first_task_and_zero_ratio_pass_batches_through():
    s = make(ratio=0.25)
    incoming = new_batches(3, 20)
    assert list(s.compose_batches(0, iter(incoming))) == incoming
    s = after_two_tasks(ratio=0.0)
    assert list(s.compose_batches(2, iter(incoming))) == incoming


def test_batches_are_deterministic_and_seeded():
    one = list(after_two_tasks(ratio=0.25).compose_batches(2, iter(new_batches(5, 20))))
    two = list(after_two_tasks(ratio=0.25).compose_batches(2, iter(new_batches(5, 20))))
    other = list(after_two_tasks(ratio=0.25, seed=1).compose_batches(2, iter(new_batches(5, 20))))
    assert one == two and one != other


def test_state_round_trip_rebuilds_the_same_batches():
    s = after_two_tasks(ratio=0.25)
    state = s.state_dict()
    assert set(state["buffer"]) == {0, 1} and state["buffer"][0][0] == [s.buffer[0][0].prompt, "x", "a"]
    resumed = make(ratio=0.25)  # a resumed run: no after_task calls, the buffer from the checkpoint
    resumed.load_state_dict(state)
    assert resumed.buffer == s.buffer
    assert list(resumed.compose_batches(2, iter(new_batches(6, 20)))) == list(s.compose_batches(2, iter(new_batches(6, 20))))
    assert resumed.extra_state_bytes() == sum(len(e.prompt) + 1 for v in s.buffer.values() for e in v)


# ---------------------------------------------------------------- TRACE's separate pass
def test_separate_pass_after_the_task_steps():
    s = after_two_tasks(mode="separate_pass", per_task=None, share=0.1, selection="first",
                        batch_size=4, grad_accum=2)
    # Buffer: 4 + 6 = 10 examples; one pass = ceil(10 / (4 * 2)) = 2 extra optimizer steps.
    assert s.num_train_steps(2, 5) == 7
    incoming = new_batches(7 * 2, 4)
    out = list(s.compose_batches(2, iter(incoming)))
    assert len(out) == 14
    assert out[:10] == incoming[:10]  # the task's own 5 steps x 2 micro-batches, untouched
    tail = [e for b in out[10:] for e in b]
    assert all(e.task in ("a", "b") for e in tail) and len(tail) == 16
    assert set(tail[:10]) == set(s.buffer[0] + s.buffer[1])  # a full shuffled pass first
    assert s.num_train_steps(0, 5) == 5  # nothing to replay before task 1


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("options,match", [
    ({"ratio": 1.0}, r"replay\.ratio.*\[0, 1\)"),
    ({"mode": "interleave"}, r"replay\.mode.*mix, separate_pass"),
    ({"selection": "last"}, r"replay\.selection.*random, first"),
    ({"per_task": 10, "share": 0.1}, r"replay\.per_task=10 and replay\.share=0\.1 are both set"),
    ({"per_task": 0}, r"replay\.per_task"),
    ({"per_task": None, "share": 1.5}, r"replay\.share"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        Replay(OmegaConf.structured(ReplayConfig(enabled=True, **options)))


def test_extra_data_needs_a_generative_model():
    s = Replay(OmegaConf.structured(ReplayConfig(enabled=True, extra_data_dir="/data/TRACE")))
    ctx = StrategyContext(accelerator=Accelerator(cpu=True), model=torch.nn.Linear(1, 1), stream=STREAM,
                          model_kind="classifier", model_family="test", seed=0, trainer=SimpleNamespace(),
                          loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {})
    with pytest.raises(ValueError, match=r"replay\.extra_data_dir"):
        s.setup(ctx)


def test_rewarm_replay_preset_turns_both_addons_on():
    cfg = compose(["strategy=rewarm_replay"])
    assert cfg.strategy.name == "seq_ft" and cfg.strategy.carry_optimizer is False
    assert cfg.lr_schedule.enabled and cfg.lr_schedule.curve == "rewarm_cosine"
    assert cfg.replay.enabled and cfg.replay.ratio == 0.05
    assert compose(["strategy=rewarm_replay", "replay.ratio=0.25"]).replay.ratio == 0.25


def test_separate_pass_with_trace_general_data_from_the_first_task():
    # TRACE replays its general instruction data (Lima) after every task, the first included.
    s = make(mode="separate_pass", per_task=None, share=0.1, selection="first", batch_size=2,
             extra_data_dir=str(REPO / "tests" / "fixtures" / "trace_mini"))
    extra = s.extra_examples()
    assert extra and all(e.task == "Lima" for e in extra)
    steps = s.num_train_steps(0, 3)
    assert steps == 3 + -(-len(extra) // 2)
    out = list(s.compose_batches(0, iter(new_batches(steps, 2))))
    assert {e.task for b in out[3:] for e in b} == {"Lima"}
