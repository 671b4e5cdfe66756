"""per_task_ft on a 2-parameter model: reset to theta_0, task vectors, each task scored with
its own model, unseen tasks, disk store, state round-trip, and the stack passing the hook on."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.per_task_ft import PerTaskFineTuning, PerTaskFTConfig
from cl_runner.strategies.stack import StrategyStack
from cl_runner.streams.task import Example, Task, TaskStream

pytestmark = pytest.mark.usefixtures("one_thread")


class Line(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))  # theta_0 = (w 1, b 0)
        self.b = nn.Parameter(torch.tensor(0.0))


TASKS = TaskStream("s", [Task(f"t{i}", [Example("1", "1")], [Example("1", "1")]) for i in range(3)])


def make(model: nn.Module, run_dir=None, **options) -> PerTaskFineTuning:
    s = PerTaskFineTuning(OmegaConf.structured(PerTaskFTConfig(**options)))
    s.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=TASKS, model_kind="causal",
                            model_family="test", seed=0, trainer=SimpleNamespace(), loss_fn=None, collate=None,
                            run_dir=run_dir))
    return s


def train_to(model: Line, w: float, b: float) -> None:
    with torch.no_grad():
        model.w.fill_(w)
        model.b.fill_(b)


def weights(model: Line) -> tuple[float, float]:
    return model.w.item(), model.b.item()


def row(s: Strategy, model: Line, t: int) -> list[tuple[float, float]]:
    """The weights each task is scored with after task t, as the loop asks for them."""
    seen = []
    with s.evaluation_weights(t):
        for k in range(len(TASKS)):
            with s.evaluation_weights_for(t, k):
                seen.append(weights(model))
    return seen


def run_two_tasks(s: PerTaskFineTuning, model: Line) -> list[list[tuple[float, float]]]:
    rows = []
    s.before_task(0, TASKS[0])
    train_to(model, 2.0, 0.0)  # tau_0 = (1, 0)
    s.after_task(0, TASKS[0])
    rows.append(row(s, model, 0))
    assert weights(model) == (2.0, 0.0)  # theta_0 after the row: what a checkpoint saves
    s.before_task(1, TASKS[1])
    assert weights(model) == (1.0, 0.0)  # task 2 starts from theta_0, not from task 1's model
    train_to(model, 5.0, 3.0)  # tau_1 = (4, 3)
    s.after_task(1, TASKS[1])
    rows.append(row(s, model, 1))
    assert weights(model) == (5.0, 3.0)
    return rows


def test_each_task_is_scored_with_its_own_model_and_unseen_tasks_with_theta0():
    model = Line()
    s = make(model)
    rows = run_two_tasks(s, model)
    assert rows[0] == [(2.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    assert rows[1] == [(2.0, 0.0), (5.0, 3.0), (1.0, 0.0)]  # task 1 keeps its model: BWT 0
    assert torch.equal(s.task_vectors[1]["w"], torch.tensor(4.0))
    assert s.norms == {0: pytest.approx(1.0), 1: pytest.approx(5.0)}  # ||(1, 0)||, ||(4, 3)||


def test_latest_scores_unseen_tasks_with_the_task_just_learned():
    model = Line()
    rows = run_two_tasks(make(model, unseen_tasks="latest"), model)
    assert rows[0] == [(2.0, 0.0), (2.0, 0.0), (2.0, 0.0)]
    assert rows[1] == [(2.0, 0.0), (5.0, 3.0), (5.0, 3.0)]


def test_disk_store_writes_one_file_per_task_and_reads_it_back(tmp_path):
    model = Line()
    s = make(model, run_dir=tmp_path, store="disk")
    rows = run_two_tasks(s, model)
    assert rows[1] == [(2.0, 0.0), (5.0, 3.0), (1.0, 0.0)]
    assert sorted(p.name for p in (tmp_path / "task_vectors").iterdir()) == ["task_1.pt", "task_2.pt"]
    assert s.task_vectors == {0: "task_1.pt", 1: "task_2.pt"}  # the state keeps names only


def test_disk_store_needs_a_run_folder():
    with pytest.raises(ValueError, match="strategy.store=disk"):
        make(Line(), store="disk")


def test_state_round_trip_gives_the_same_rows_and_a_fresh_theta0():
    model = Line()
    s = make(model)
    s.before_task(0, TASKS[0])
    train_to(model, 2.0, 0.0)
    s.after_task(0, TASKS[0])
    state = s.state_dict()
    # A resumed run builds the model again (seeded: here another start) and loads the state.
    other_model = Line()
    train_to(other_model, 9.0, 9.0)
    other = make(other_model)
    other.load_state_dict(state)
    other.before_task(1, TASKS[1])
    assert weights(other_model) == (1.0, 0.0)  # the saved theta_0, not the built weights
    train_to(other_model, 5.0, 3.0)
    other.after_task(1, TASKS[1])
    assert row(other, other_model, 1) == [(2.0, 0.0), (5.0, 3.0), (1.0, 0.0)]


def test_only_trainable_parameters_are_tracked():
    model = Line()
    model.b.requires_grad_(False)  # a frozen base weight (model.adapter=lora)
    s = make(model)
    assert list(s.theta0) == ["w"]


def test_the_stack_passes_the_per_task_context_on():
    model = Line()
    s = make(model)
    stack = StrategyStack([s])
    s.before_task(0, TASKS[0])
    train_to(model, 2.0, 0.0)
    s.after_task(0, TASKS[0])
    assert row(stack, model, 0) == [(2.0, 0.0), (1.0, 0.0), (1.0, 0.0)]


@pytest.mark.parametrize("key, value", [("unseen_tasks", "random"), ("store", "gpu")])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        PerTaskFineTuning(OmegaConf.structured(PerTaskFTConfig(**{key: value})))
