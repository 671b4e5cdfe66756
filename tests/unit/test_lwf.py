"""LwF's distillation term on logits a person can check, and the strategy on a toy LM.

Hand values, T = 2: teacher logits [2 ln 3, 0] -> softmax(z / 2) = [3/4, 1/4]; student
logits [0, 0] -> [1/2, 1/2].
    KL(p_old || p_new) = 3/4 ln(3/2) + 1/4 ln(1/2)        (direction: standard)
    KL(p_new || p_old) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)  (direction: trace)
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.lwf import (LearningWithoutForgetting, LwFConfig, distillation_kl, distilled_rows,
                                      lwf_term)
from cl_runner.streams.task import Example, Task, TaskStream

pytestmark = pytest.mark.usefixtures("one_thread")

LN3 = math.log(3.0)
STANDARD = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
TRACE = 0.5 * math.log(4.0 / 3.0)


def test_kl_by_hand_in_both_directions():
    teacher = torch.tensor([[2 * LN3, 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    assert distillation_kl(student, teacher, 2.0, "standard").item() == pytest.approx(STANDARD)
    assert distillation_kl(student, teacher, 2.0, "trace").item() == pytest.approx(TRACE)
    assert STANDARD != pytest.approx(TRACE)  # the two directions really differ here


def test_temperature_scales_the_logits_before_the_softmax():
    teacher = torch.tensor([[2 * LN3, 0.0]])  # T = 1: softmax = [9/10, 1/10]
    student = torch.tensor([[0.0, 0.0]])
    assert distillation_kl(student, teacher, 1.0, "standard").item() == pytest.approx(
        0.9 * math.log(1.8) + 0.1 * math.log(0.2))


def test_classes_outside_the_task_are_left_out():
    # 3 classes, the third is another task's: p_old = [2/3, 1/3, 0], p_new = [1/2, 1/2, 0]
    teacher = torch.tensor([[2 * math.log(2.0), 0.0, 50.0]])
    student = torch.tensor([[0.0, 0.0, -7.0]])
    allowed = torch.tensor([[True, True, False]])
    got = distillation_kl(student, teacher, 2.0, "standard", allowed).item()
    assert got == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3))
    got = distillation_kl(student, teacher, 2.0, "trace", allowed).item()
    assert got == pytest.approx(0.5 * math.log(0.75) + 0.5 * math.log(1.5))


def config(**options) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(LwFConfig()), **options})


def causal_batch() -> dict[str, torch.Tensor]:
    # Positions 0..3; the answer tokens are 2 and 3, so the logits at 1 and 2 predict them.
    return {"input_ids": torch.tensor([[1, 0, 1, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1]]),
            "labels": torch.tensor([[-100, -100, 1, 0]])}


def test_causal_answer_rows_are_the_shifted_labelled_positions():
    logits = torch.arange(8.0).reshape(1, 4, 2)
    rows, allowed = distilled_rows(logits, causal_batch(), "causal", "answer")
    assert allowed is None
    assert rows.tolist() == [[2.0, 3.0], [4.0, 5.0]]  # positions 1 and 2
    rows, _ = distilled_rows(logits, causal_batch(), "causal", "all")
    assert rows.shape == (4, 2)


def test_non_answer_positions_do_not_count_and_the_scale_is_weight_t_squared():
    teacher = torch.zeros(1, 4, 2)
    student = torch.zeros(1, 4, 2)
    teacher[0, 0] = teacher[0, 3] = torch.tensor([9.0, -9.0])  # prompt / last: never distilled
    batch = causal_batch()
    assert lwf_term(student, teacher, batch, "causal", config()).item() == 0.0
    teacher[0, 1] = torch.tensor([2 * LN3, 0.0])  # one answer row differs, one agrees
    got = lwf_term(student, teacher, batch, "causal", config(weight=0.5)).item()
    assert got == pytest.approx(0.5 * 4 * STANDARD / 2)  # weight * T^2 * mean over the 2 rows
    got = lwf_term(student, teacher, batch, "causal", config(t_squared=False, direction="trace")).item()
    assert got == pytest.approx(TRACE / 2)
    got = lwf_term(student, teacher, batch, "causal",
                   config(t_squared=False, direction="trace", reduction="per_example")).item()
    assert got == pytest.approx(TRACE)  # summed over rows, / 1 example (TRACE's batchmean)


def test_seq2seq_rows_are_the_labelled_decoder_positions():
    logits = torch.arange(6.0).reshape(1, 3, 2)
    rows, _ = distilled_rows(logits, {"labels": torch.tensor([[4, 1, -100]])}, "seq2seq", "answer")
    assert rows.tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_classifier_rows_use_the_task_classes():
    teacher = torch.tensor([[2 * LN3, 0.0, 3.0], [0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    batch = {"labels": torch.tensor([0, 1]), "label_mask": mask}
    got = lwf_term(student, teacher, batch, "classifier", config(t_squared=False)).item()
    assert got == pytest.approx(STANDARD / 2)  # the second example agrees on its 2 classes


# -- the strategy on a toy LM: logits = a table row per input token ------------------------

class TableLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(2, 2)
        nn.init.zeros_(self.table.weight)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.table(input_ids))


def make(model: nn.Module, **options) -> LearningWithoutForgetting:
    strategy = LearningWithoutForgetting(OmegaConf.structured(LwFConfig(**options)))
    tasks = TaskStream("s", [Task(f"t{i}", [Example("a", "b")], [Example("a", "b")]) for i in range(3)])
    strategy.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=tasks, model_kind="causal",
                                   model_family="test", seed=0, trainer=SimpleNamespace(), loss_fn=None,
                                   collate=None))
    return strategy


def test_no_term_on_the_first_task_then_the_previous_model_is_the_teacher():
    model = TableLM()
    s = make(model)
    s.before_task(0, None)
    model(**causal_batch())
    assert s.penalty(model, causal_batch()) is None
    with torch.no_grad():
        model.table.weight[1] = torch.tensor([2 * LN3, 0.0])  # task 1 taught token 1 -> [3/4, 1/4]
    s.before_task(1, None)
    with torch.no_grad():
        model.table.weight[1] = 0.0  # task 2 moved it back to uniform
    batch = causal_batch()
    model(**batch)  # the loss's forward, captured by the hook
    term = s.penalty(model, batch)
    # Answer rows: position 1 (token 0: both uniform) and 2 (token 1: teacher [3/4, 1/4]).
    assert term.item() == pytest.approx(4 * STANDARD / 2)
    term.backward()  # the student's table gets the gradient; the teacher copy does not move
    assert model.table.weight.grad is not None and model.table.weight.grad[1].abs().sum() > 0
    assert s.teacher["table.weight"][1].tolist() == pytest.approx([2 * LN3, 0.0])


def test_student_logits_are_recomputed_without_a_captured_forward():
    model = TableLM()
    s = make(model, direction="trace", t_squared=False)
    with torch.no_grad():
        model.table.weight[1] = torch.tensor([2 * LN3, 0.0])
    s.before_task(1, None)
    with torch.no_grad():
        model.table.weight[1] = 0.0
    assert s.penalty(model, causal_batch()).item() == pytest.approx(TRACE / 2)


def test_state_dict_round_trip_restores_the_teacher():
    model = TableLM()
    s = make(model)
    with torch.no_grad():
        model.table.weight[1] = torch.tensor([2 * LN3, 0.0])
    s.before_task(1, None)
    state = s.state_dict()
    other = make(TableLM())
    other.load_state_dict(state)
    assert torch.equal(other.teacher["table.weight"], s.teacher["table.weight"])
    other.load_state_dict(make(TableLM()).state_dict())  # saved before task 2: no teacher
    assert other.teacher is None


@pytest.mark.parametrize("key, value", [("direction", "reverse"), ("reduction", "sum"), ("positions", "prompt"),
                                        ("weight", -1.0), ("temperature", 0.0)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        LearningWithoutForgetting(OmegaConf.structured(LwFConfig(**{key: value})))
