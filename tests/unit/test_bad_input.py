"""Bad input as a new user gives it: caught by validation before any folder or model
exists, with the key and the fix; run folders claimed atomically; prompts that do not fit
are counted for the warning."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from cl_runner.config.validate import check_lengths, position_limit, validate
from cl_runner.errors import ConfigError
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
    from cl_runner.models.tokenizers import ByteTokenizer
    from cl_runner.streams.task import Example

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
    from cl_runner.models.tokenizers import ByteTokenizer
    from cl_runner.streams.task import Example, Task
    from cl_runner.training.loop import ContinualLoop

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


# ------------------------------------------------------------------ group options on the command line
def option_folders(tmp_path) -> tuple[Path, Path]:
    """A package and a working-directory configs folder: (package, local)."""
    package, local = tmp_path / "package", tmp_path / "local"
    for folder, files in ((package, ["strategy/ewc", "strategy/seq_ft", "experiment/paper"]),
                          (local, ["strategy/mine", "local/cluster"])):
        for name in files:
            (folder / f"{name}.yaml").parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.yaml").write_text("{}\n")
    return package, local


def test_an_unknown_group_option_lists_the_options_of_both_config_folders(tmp_path):
    from cl_runner.config.override_check import unknown_option_message

    package, local = option_folders(tmp_path)
    dirs = [local, package]
    assert unknown_option_message(dirs, ["strategy=foo"]) == (
        "unknown strategy 'foo': choose one of ewc, mine, seq_ft; your own options go in configs/strategy/<name>.yaml "
        "in the working directory")
    assert "(did you mean 'seq_ft'?)" in unknown_option_message(dirs, ["strategy=seq_fft"])
    assert "unknown experiment 'papr'" in unknown_option_message(dirs, ["+experiment=papr"])
    assert "unknown experiment 'x'" in unknown_option_message(dirs, ["++experiment=x"])
    assert "unknown strategy 'ewcc'" in unknown_option_message(dirs, ["-m", "strategy=seq_ft,ewcc"])
    assert "unknown local 'laptop'" in unknown_option_message(dirs, ["local@_global_=laptop"])
    assert "~experiment drops an optional group" in unknown_option_message(dirs, ["experiment=null"])
    for fine in (["strategy=mine", "local=cluster"], ["-m", "strategy=ewc,seq_ft"], ["strategy=choice(ewc,foo)"],
                 ["~experiment"], ["strategy.name=foo"], ["model=anything"], ["hydra/launcher=foo"], ["--cfg", "job"]):
        assert unknown_option_message(dirs, fine) is None, fine  # model: no such folder here, Hydra's to judge


# ------------------------------------------------------------------ epochs against grad_accum
def test_epochs_that_the_accumulated_steps_overshoot_are_warned_with_the_numbers():
    from cl_runner.training.loop import EpochPlan, check_epoch_plan

    trainer = SimpleNamespace(batch_size=16)
    plan = EpochPlan(epochs=1, examples=100, global_batch=16, accum=4)
    assert (plan.micro_batches, plan.steps, plan.passes) == (7, 2, 1.28)
    assert check_epoch_plan(plan, "t", trainer, world=1) == (
        "[cl-run] warning: task 't': trainer.epochs=1 over 100 training examples at a global batch of 16 "
        "(trainer.batch_size=16 x 1 process(es)) makes 7 micro-batches, rounded up to 2 optimizer step(s) of "
        "trainer.grad_accum=4: 8 micro-batches, 1.28 passes over the data instead of 1")
    assert check_epoch_plan(EpochPlan(1, 2000, 64, 4), "t", trainer, 1) is None  # 1.02 passes: within 10%
    assert check_epoch_plan(EpochPlan(3, 100, 16, 1), "t", trainer, 1) is None  # 19 batches = 3.04 passes


def test_epochs_that_one_accumulated_step_exceeds_are_refused():
    from cl_runner.training.loop import EpochPlan, check_epoch_plan

    plan = EpochPlan(epochs=1, examples=8, global_batch=8, accum=4)
    assert plan.unreachable and plan.steps == 1 and plan.passes == 4.0
    with pytest.raises(ConfigError, match=r"'trainer.grad_accum': 4; task 't' has 8 training examples.*"
                                          r"use trainer.grad_accum<=1"):
        check_epoch_plan(plan, "t", SimpleNamespace(batch_size=8), world=1)
    assert not EpochPlan(epochs=4, examples=8, global_batch=8, accum=4).unreachable  # 4 epochs: exactly one step


# ------------------------------------------------------------------ progress without a terminal
def test_progress_lines_every_tenth_of_the_steps_or_thirty_seconds(capsys):
    from cl_runner.training.progress import TaskProgress

    now = [0.0]
    shown = TaskProgress("task 1/2 a", steps=40, first_step=0, enabled=True, terminal=False, clock=lambda: now[0])
    for step in range(1, 41):
        now[0] += 0.5 if step != 6 else 40.0  # step 6 takes 40 s: a line for it at once
        shown.update(step, loss=1.0, tokens=100)
    shown.close()
    out, err = capsys.readouterr()
    assert err == ""  # no bar frames
    steps = [line.split("step ")[1].split()[0] for line in out.splitlines()]
    assert steps == ["4/40", "6/40", "8/40", "12/40", "16/40", "20/40", "24/40", "28/40", "32/40", "36/40"]
    assert out.splitlines()[0] == "[cl-run] task 1/2 a: step 4/40 (10%)  loss 1.0000  200 tokens/s  ETA 18.0s"


def test_progress_shows_nothing_when_switched_off_or_a_bar_on_a_terminal(capsys):
    from cl_runner.training.progress import TaskProgress

    for enabled, terminal in ((False, False), (False, True)):
        shown = TaskProgress("t", steps=10, first_step=0, enabled=enabled, terminal=terminal)
        for step in range(1, 11):
            shown.update(step, 1.0, 10)
        shown.close()
        assert capsys.readouterr() == ("", "")
    shown = TaskProgress("t", steps=10, first_step=0, enabled=True, terminal=True)
    assert not shown.lines and not shown.bar.disable


# ------------------------------------------------------------------ after an interruption
def test_the_resume_point_is_read_from_checkpoint_names(tmp_path):
    from cl_runner.checkpoints.files import resume_point

    folder = tmp_path / "checkpoints"
    assert resume_point(folder) is None
    folder.mkdir()
    (folder / "task000_done.pt").write_bytes(b"")
    assert resume_point(folder) == "checkpoints/task000_done.pt (end of task 1)"
    (folder / "task001_0000030.pt").write_bytes(b"")
    (folder / "task001_0000035.tmp").write_bytes(b"")  # a save that was cut short
    assert resume_point(folder) == "checkpoints/task001_0000030.pt (step 30 of task 2)"
    (folder / "task002_0000005.dcp").mkdir()  # a sharded checkpoint is a folder
    assert resume_point(folder) == "checkpoints/task002_0000005.dcp (step 5 of task 3)"


def test_the_cost_of_a_resumed_run_is_its_total_over_sessions():
    from cl_runner.reporting.summary import format_cost

    metrics = {"wall_time_s": 75.0, "train_time_s": 60.0, "eval_time_s": 6.0, "sessions": 2,
               "task_time_s": [{"train": 30.0, "eval": 2.0}, {"train": 30.0, "eval": 3.5}]}
    assert format_cost(metrics) == "cost: 1m15s over 2 sessions (train 1m00s, eval 6.0s)"
    assert format_cost({**metrics, "sessions": 1}) == "cost: 1m15s (train 1m00s, eval 6.0s)"
    old = {k: v for k, v in metrics.items() if k not in ("eval_time_s", "sessions")}  # a metrics.json from before
    assert format_cost(old) == "cost: 1m15s (train 1m00s, eval 5.5s)"


def test_the_interrupted_line_says_where_and_what_a_resume_does(tmp_path):
    from cl_runner.cli import interrupted_line
    from cl_runner.streams.task import Example, Task
    from cl_runner.training.loop import ContinualLoop

    tasks = [Task(name, [], [Example("p", "a")]) for name in ("copy", "sort")]
    where = lambda *activity: ContinualLoop.where(SimpleNamespace(activity=activity, stream=tasks))  # noqa: E731
    assert where("train", 1, 37, 200) == "at step 37/200 of task 2/2 'sort'"
    assert where("eval", 0) == "in the evaluation before training"
    assert where("eval", 2) == "in the evaluation after task 2/2 'sort'"
    assert where("after_task", 0) == "in the strategy's end-of-task step after task 1/2 'copy'"

    run = tmp_path / "run"
    assert interrupted_line(None, "while the run was being built (model, data)") == (
        "interrupted while the run was being built (model, data), before training started; nothing was kept "
        "(the new run folder is removed)")
    (run / "checkpoints").mkdir(parents=True)
    assert f"no checkpoint was saved yet, so cl-run resume={run} starts the run again" in interrupted_line(run, "x")
    (run / "checkpoints" / "task000_done.pt").write_bytes(b"")
    assert interrupted_line(run, "in the evaluation after task 1/2 'copy'") == (
        f"interrupted in the evaluation after task 1/2 'copy'; cl-run resume={run} continues from "
        "checkpoints/task000_done.pt (end of task 1)")


def test_a_gpu_sized_model_without_a_gpu_is_said_at_start(capsys, monkeypatch):
    import torch
    from hydra import compose, initialize_config_dir

    from cl_runner.cli import warn_if_gpu_sized_on_cpu
    from tests.helpers import REPO

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        big, tiny = (compose(config_name="config", overrides=[f"model={m}"]) for m in ("t5_large", "tiny_gpt2"))
    warn_if_gpu_sized_on_cpu(tiny)
    assert capsys.readouterr().err == ""
    warn_if_gpu_sized_on_cpu(big)
    assert "model 't5_large' has 0.74B parameters and no GPU is visible" in capsys.readouterr().err
