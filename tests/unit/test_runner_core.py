"""Runner core pieces on hand-checkable cases: tokenizer, label space, batches, synthetic
tasks, run folders, the batch plan, checkpoint naming."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cl_runner.models.batching import IGNORE, Collator, compute_loss
from cl_runner.checkpoints.files import Progress, checkpoint_name, latest_checkpoint
from cl_runner.models.label_space import LabelSpace
from cl_runner.streams.synthetic import load_synthetic, synthetic_task
from cl_runner.streams.task import Example, Task, TaskStream
from cl_runner.models.tokenizers import ByteTokenizer
from cl_runner.reporting.tracking import RunFolderError, new_run_folder


def task(name, labels=None, answers=("a",)):
    examples = [Example(prompt=f"p{i}", answer=a, task=name) for i, a in enumerate(answers)]
    return Task(name=name, train=examples, test=examples, labels=labels)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    for text in ["R:12345=", "Grüezi mitenand", "立场检测"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_token_id, tok.pad_token_id]) == "ab"


def test_empty_test_split_is_an_error():
    with pytest.raises(ValueError, match="task 'x'.*test split is empty"):
        Task(name="x", train=[], test=[])


def test_label_space_shared_by_label_string():
    stream = TaskStream("s", [task("qqp", ["False", "True"]), task("boolqa", ["True", "False"]),
                              task("agnews", ["World", "Sports"])])
    space = LabelSpace(stream, "label_string")
    assert len(space) == 4  # False, True, World, Sports
    assert space.class_id("qqp", "True") == space.class_id("boolqa", "True")
    assert space.task_class_ids("boolqa") == [1, 0]
    assert space.label_of(space.class_id("agnews", "Sports")) == "Sports"
    with pytest.raises(ValueError, match="label 'Maybe' is not one of"):
        space.class_id("qqp", "Maybe")


def test_label_space_per_task_keeps_tasks_apart():
    stream = TaskStream("s", [task("qqp", ["False", "True"]), task("boolqa", ["True", "False"])])
    space = LabelSpace(stream, "per_task")
    assert len(space) == 4
    assert space.class_id("qqp", "True") != space.class_id("boolqa", "True")


def test_label_space_needs_labels():
    with pytest.raises(ValueError, match="needs one"):
        LabelSpace(TaskStream("s", [task("gen")]))


def test_causal_batch_puts_loss_on_answer_and_eos_only():
    tok = ByteTokenizer()
    batch = Collator("causal", tok, 64)([Example("R:12=", "21", "reverse"), Example("R:1=", "1", "reverse")])
    row = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    # bos + 5 prompt bytes are masked; "21" + eos are the targets.
    assert row[:6] == [tok.bos_token_id] + list(b"R:12=")
    assert labels[:6] == [IGNORE] * 6
    assert labels[6:9] == [ord("2"), ord("1"), tok.eos_token_id]
    # The shorter row is right-padded, pads masked in attention and loss.
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 2
    assert batch["labels"][1].tolist()[-2:] == [IGNORE, IGNORE]


def test_long_prompt_is_cut_from_the_left_keeping_the_answer():
    tok = ByteTokenizer()
    batch = Collator("causal", tok, 8)([Example("0123456789", "ab", "t")])
    assert batch["input_ids"].shape[1] == 8
    assert batch["labels"][0].tolist()[-3:] == [ord("a"), ord("b"), tok.eos_token_id]


def test_generation_prompts_are_left_padded():
    tok = ByteTokenizer()
    inputs = Collator("causal", tok, 64).prompts([Example("abc", "", "t"), Example("a", "", "t")], room=4)
    assert inputs["input_ids"][1].tolist()[:2] == [tok.pad_token_id] * 2
    assert inputs["attention_mask"][1].tolist() == [0, 0, 1, 1]


def test_classifier_loss_only_sees_the_tasks_labels():
    """A head with 4 classes; the task allows classes {0, 1}. Logits for classes 2 and 3
    are huge but masked, so the loss equals CE over the two allowed classes."""
    stream = TaskStream("s", [task("a", ["x", "y"], answers=("y",)), task("b", ["u", "v"])])
    space = LabelSpace(stream)

    class Head(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=torch.tensor([[1.0, 2.0, 50.0, 50.0]]))

    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([1]),
             "label_mask": torch.tensor([[True, True, False, False]])}
    expected = -torch.log_softmax(torch.tensor([1.0, 2.0]), 0)[1]
    assert torch.allclose(compute_loss(Head(), batch), expected)
    assert space.task_class_ids("b") == [2, 3]


def test_synthetic_tasks_are_deterministic_and_disjoint():
    a = synthetic_task("reverse", 5, 50, 20, seed=1)
    b = synthetic_task("reverse", 5, 50, 20, seed=1)
    assert a.train == b.train and a.test == b.test
    assert {e.prompt for e in a.train}.isdisjoint({e.prompt for e in a.test})
    ex = a.train[0]
    digits = ex.prompt[2:-1]
    assert ex.prompt == f"R:{digits}=" and ex.answer == digits[::-1]
    inc = synthetic_task("increment", 3, 5, 5, 0).train[0]
    assert inc.answer == "".join(str((int(c) + 1) % 10) for c in inc.prompt[2:-1])
    assert synthetic_task("shift_letters", 3, 5, 5, 0).train[0].prompt.startswith("i:")
    assert [t.name for t in load_synthetic([], 5, 10, 10, 0)] == ["increment", "decrement", "complement"]
    dec, mirror = synthetic_task("decrement", 3, 5, 5, 0).train[0], synthetic_task("complement", 3, 5, 5, 0).train[0]
    assert dec.prompt.startswith("D:") and dec.answer == "".join(str((int(c) - 1) % 10) for c in dec.prompt[2:-1])
    assert mirror.prompt.startswith("M:") and mirror.answer == "".join(str(9 - int(c)) for c in mirror.prompt[2:-1])


def test_synthetic_rejects_impossible_sizes_and_names():
    with pytest.raises(ValueError, match="distinct inputs"):
        synthetic_task("copy", 2, 100, 50, 0)
    with pytest.raises(ValueError, match="unknown synthetic task 'fly'"):
        synthetic_task("fly", 5, 10, 10, 0)


def test_run_folders_are_unique_and_output_dir_is_protected(tmp_path):
    a = new_run_folder(tmp_path, "exp", "label", None)
    b = new_run_folder(tmp_path, "exp", "label", None)
    assert a != b and a.parent == b.parent == tmp_path / "exp"
    out = tmp_path / "mine"
    new_run_folder(tmp_path, "exp", "x", str(out))
    (out / "config.yaml").write_text("x: 1")
    with pytest.raises(RunFolderError, match="resume="):
        new_run_folder(tmp_path, "exp", "x", str(out))


def test_checkpoint_names_sort_in_stream_order(tmp_path):
    names = [checkpoint_name(Progress(task=0, step=5)), checkpoint_name(Progress(task=0, task_done=True)),
             checkpoint_name(Progress(task=1, step=10)), checkpoint_name(Progress(task=1, step=100))]
    for n in reversed(names):
        (tmp_path / n).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == names[-1]
    (tmp_path / checkpoint_name(Progress(task=1, task_done=True))).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "task001_done.pt"


def test_batch_plan_counts_epochs_and_accumulation():
    from cl_runner.training.loop import plan_task
    from cl_runner.strategies.seq_ft import SeqFTConfig, SequentialFineTuning
    from cl_runner.strategies.stack import StrategyStack

    trainer = SimpleNamespace(batch_size=4, grad_accum=2, epochs=1.5, steps_per_task=None)
    strategy = StrategyStack([SequentialFineTuning(SeqFTConfig())])
    t = task("t", answers=[str(i) for i in range(20)])
    plan = plan_task(0, t, strategy, trainer, world=1, seed=0)
    # 1.5 epochs of 20 examples = 30 examples -> 8 micro-batches of 4 -> 4 optimizer steps.
    assert plan.steps == 4 and len(plan.batches) == 8 and all(len(b) == 4 for b in plan.batches)
    # Each epoch visits every example once before repeating.
    seen = [e.answer for b in plan.batches for e in b]
    assert sorted(seen[:20]) == sorted(str(i) for i in range(20))
    assert plan_task(0, t, strategy, trainer, world=1, seed=0).batches == plan.batches  # deterministic


def test_summary_ends_with_what_the_run_cost():
    from cl_runner.reporting.summary import format_summary

    R = [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]
    metrics = {"ACC": 0.75, "BWT": -0.5, "wall_time_s": 75.0, "train_time_s": 60.0,
               "task_time_s": [{"train": 30.0, "eval": 2.0}, {"train": 30.0, "eval": 3.5}],
               "train_tokens_per_s": 12345.6, "peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "cpu_max_rss",
               "strategy_extra_bytes": 5 * 2**20}
    text = format_summary(R, ["a", "b"], metrics)
    assert text.splitlines()[-1] == ("cost: 1m15s (train 1m00s, eval 5.5s)  12,346 train tokens/s  "
                                     "peak memory 3.00 GiB (RSS)  strategy state 5.0 MiB")
    assert "ACC 0.750  BWT -0.500  FWT -" in text  # the numbers read as in cl-report
    # seq_ft keeps no state: no "strategy state" part
    assert "strategy state" not in format_summary(R, ["a", "b"], {**metrics, "strategy_extra_bytes": 0})
