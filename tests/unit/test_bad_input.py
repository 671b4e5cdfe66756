"""Bad input as a new user gives it: caught by validation before any folder or model
exists, with the key and the fix; run folders claimed atomically; prompts that do not fit
are counted for the warning."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from cl_runner.errors import ConfigError
from cl_runner.config.validate import check_lengths, position_limit, validate
from cl_runner.reporting.tracking import RunFolderError, new_run_folder
from tests.helpers import compose


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    return str(err.value)


# ------------------------------------------------------------------ checked up front
def test_a_list_of_epochs_needs_one_entry_per_task():
    three = ["task_stream.order=[copy,reverse,sort]"]
    message = config_error(three + ["trainer.epochs=[1]", "trainer.steps_per_task=null"])
    assert "'trainer.epochs'" in message and "3 task(s) (copy, reverse, sort)" in message and "one entry per task" in message
    validate(compose(three + ["trainer.epochs=[1,2,1]", "trainer.steps_per_task=null"]))
    validate(compose(three + ["trainer.epochs=[1]", "trainer.steps_per_task=5"]))  # steps_per_task replaces epochs


def test_generation_budget_past_max_length_is_refused():
    message = config_error(["evaluation.max_new_tokens=100"])
    assert "'evaluation.max_new_tokens': 100" in message and "model.max_length=64" in message and "at most 63" in message
    validate(compose(["evaluation.max_new_tokens=63"]))
    validate(compose(["model=tiny_t5", "evaluation.max_new_tokens=100"]))  # the decoder has its own length


def test_max_length_past_the_models_positions_is_refused():
    message = config_error(["model.max_length=200"])
    assert "'model.max_length': 200" in message and "64 positions" in message and "n_positions" in message


def test_the_position_limit_of_a_loaded_model_config():
    from transformers import BertConfig, GPT2Config, T5Config

    assert position_limit(GPT2Config(n_positions=64)) == (64, "n_positions")
    assert position_limit(BertConfig()) == (512, "max_position_embeddings")
    assert position_limit(T5Config()) is None
    cfg = validate(compose(["model=minilm", "task_stream=custom", "task_stream.tasks=[{name: a, path: x}]",
                            "model.max_length=1000"]))
    with pytest.raises(ConfigError, match=r"'model.max_length': 1000; the model has 512 positions \(the model's config"):
        check_lengths(cfg, position_limit(BertConfig()), "the model's config")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_new_tokens_must_be_positive_and_null_means_the_tasks_budget(value):
    message = config_error([f"evaluation.max_new_tokens={value}"])
    assert f"'evaluation.max_new_tokens': {value}" in message and "null for each task's own budget" in message


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1e-3"])
def test_learning_rate_must_be_positive_and_finite(value):
    assert "'trainer.lr'" in config_error([f"trainer.lr={value}"])


def test_custom_tasks_need_a_name_each():
    message = config_error(["task_stream=custom", "task_stream.tasks=[{name: a, path: x}, {path: y}]"])
    assert "entry 1 needs a non-empty string 'name'" in message


def test_custom_task_names_are_unique():
    message = config_error(["task_stream=custom", "task_stream.tasks=[{name: a, path: x}, {name: a, path: y}]"])
    assert "task name 'a' is used twice" in message


def test_a_task_listed_twice_in_the_order():
    assert "reverse appear(s) twice" in config_error(["task_stream.order=[reverse,copy,reverse]"])


# ------------------------------------------------------------------ run folders
def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        new_run_folder(tmp_path / "results", "exp", "label", str(target))
    assert target.read_text() == "mine"


def race(n: int, call) -> tuple[list, list]:
    """Run `call` in n threads released at the same moment: (results, errors)."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def one() -> None:
        barrier.wait()
        try:
            results.append(call())
        except RunFolderError as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("exists", [False, True])
def test_of_two_runs_racing_for_one_output_dir_exactly_one_wins(tmp_path, exists):
    for attempt in range(20):
        out = tmp_path / f"run{attempt}"
        if exists:
            out.mkdir()  # a folder the user made (it may hold their files)
        won, lost = race(4, lambda: new_run_folder(tmp_path / "results", "exp", "label", str(out)))
        assert won == [out] and len(lost) == 3, (won, lost)
        assert all("already holds a run" in str(e) for e in lost)


def test_auto_named_folders_started_at_once_get_a_name_each(tmp_path):
    won, lost = race(6, lambda: new_run_folder(tmp_path / "results", "exp", "label", None))
    assert not lost and len(set(won)) == 6 and all(Path(p).is_dir() for p in won)


# ------------------------------------------------------------------ prompts that do not fit
def test_prompts_cut_to_fit_max_length_are_counted():
    from cl_runner.models.batching import Collator
    from cl_runner.streams.task import Example
    from cl_runner.models.tokenizers import ByteTokenizer

    examples = [Example("short=", "ab"), Example("x" * 30 + "=", "ab"), Example("y" * 12, "abcdef")]
    causal = Collator("causal", ByteTokenizer(), max_length=16)
    # training: bos + prompt + answer + eos within 16 tokens
    assert causal.count_cut(examples) == 2
    assert causal.count_cut(examples, room=4) == 2  # generation: bos + prompt within 16 - 4
    assert causal.count_cut(examples, room=8) == 2
    assert causal.count_cut(examples[:1], room=10) == 1  # bos + "short=" is 7 tokens, 6 left
    batch = causal(examples)
    assert batch["input_ids"].shape[1] <= 16
    assert Collator("seq2seq", ByteTokenizer(), max_length=16).count_cut(examples) == 1


def test_the_loop_warns_once_per_task_with_the_counts(capsys):
    from cl_runner.models.batching import Collator
    from cl_runner.training.loop import ContinualLoop
    from cl_runner.streams.task import Example, Task
    from cl_runner.models.tokenizers import ByteTokenizer

    long, short = Example("z" * 40 + "=", "ab", "t"), Example("a=", "ab", "t")
    tasks = [Task("fits", [short] * 3, [short], max_new_tokens=4),
             Task("long", [long, short, long], [long, short], max_new_tokens=4)]
    fake = SimpleNamespace(stream=tasks, collate=Collator("causal", ByteTokenizer(), 16),
                           cfg=SimpleNamespace(model=SimpleNamespace(kind="causal", max_length=16),
                                               evaluation=SimpleNamespace(max_new_tokens=None)))
    ContinualLoop._warn_cut_prompts(fake)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "task 'long': 2 of 3 training prompts" in lines[0] and "1 of 2 test prompts" in lines[0]
    assert "model.max_length=16" in lines[0] and "from the left" in lines[0]
