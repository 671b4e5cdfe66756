"""`cl-run` on bad input as a new user gives it, through its entry point (in-process: the
same Hydra entry and error handling as the command, without a new interpreter per case):
one line on stderr, exit code 2 (1 for a run whose loss diverged), no traceback, no
half-made run folder; and resume that is safe (checkpoints refused or passed over, a
finished run left alone, overrides not dropped silently)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cl

TINY = ["task_stream.train_size=64", "task_stream.test_size=8", "trainer.steps_per_task=4", "trainer.batch_size=8"]


def cl_main(args: list[str], cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """`cl-run logger=none trainer.progress_bar=false ARGS` in `cwd`: (exit code, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from cl_runner.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["cl-run"])
    GlobalHydra.instance().clear()
    code = 0
    try:
        main(["logger=none", "trainer.progress_bar=false", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *expected: str, exit_code: int = 2, prefix: str = "cl-run: error:") -> None:
    assert code == exit_code, err
    assert "Traceback" not in err and "Error executing job" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("cl-run:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def no_run_folder(cwd) -> bool:
    results = cwd / "results"
    return not results.exists() or not [p for p in results.rglob("*") if p.is_file()]


# ------------------------------------------------------------------ config errors, up front
@pytest.mark.parametrize("args, expected", [
    (["trainer.epochs=[1]", "trainer.steps_per_task=null"], ["'trainer.epochs'", "one entry per task"]),
    (["evaluation.max_new_tokens=100"], ["'evaluation.max_new_tokens': 100", "model.max_length=64"]),
    (["model.max_length=200"], ["'model.max_length': 200", "64 positions"]),
    (["evaluation.max_new_tokens=-1"], ["'evaluation.max_new_tokens': -1", "null for each task's own budget"]),
    (["evaluation.max_new_tokens=0"], ["'evaluation.max_new_tokens': 0", "null for each task's own budget"]),
    (["trainer.lr=inf"], ["'trainer.lr': inf", "finite"]),
    (["trainer.lr=nan"], ["'trainer.lr': nan", "finite"]),
    (["trainer.lr=0"], ["'trainer.lr': 0.0", "positive"]),
    (["task_stream=custom", "task_stream.tasks=[{name: a, path: x}, {name: a, path: y}]"], ["task name 'a' is used twice"]),
    (["task_stream=custom", "task_stream.tasks=[{path: x}]"], ["entry 0 needs a non-empty string 'name'"]),
    # An unknown option of a config group: one line listing the options, before Hydra.
    (["strategy=foo"], ["unknown strategy 'foo': choose one of ", " classp, ", "seq_ft, svd_orthogonal;"]),
    (["model=foo"], ["unknown model 'foo': choose one of", "tiny_gpt2"]),
    (["task_stream=foo"], ["unknown task_stream 'foo': choose one of", "synthetic"]),
    (["experiment=foo"], ["unknown experiment 'foo': choose one of", "trace_paper"]),  # optional: was ignored
    (["+experiment=trace_papr"], ["unknown experiment 'trace_papr'", "(did you mean 'trace_paper'?)"]),
    (["-m", "strategy=seq_ft,ewcc"], ["unknown strategy 'ewcc'", "(did you mean 'ewc'?)"]),
    (["evaluation.monitor=[foo]"], ["evaluation.monitor: unknown synthetic task 'foo'; choose from copy,"]),
    (["task_stream.test_size=0"], ["'task_stream.test_size': 0", "at least 1 example"]),
], ids=["epochs_list", "max_new_tokens_100", "max_length_200", "max_new_tokens_-1", "max_new_tokens_0", "lr_inf",
        "lr_nan", "lr_0", "custom_same_name", "custom_no_name", "strategy_foo", "model_foo", "task_stream_foo",
        "experiment_foo", "experiment_typo", "multirun_typo", "monitor_foo", "test_size_0"])
def test_bad_value_is_a_config_error_before_anything_is_made(tmp_path, monkeypatch, capsys, args, expected):
    code, _, err = cl_main(args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, *expected, prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)


def test_an_option_from_a_working_directory_configs_folder_is_known(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs" / "strategy").mkdir(parents=True)
    (tmp_path / "configs" / "strategy" / "mine.yaml").write_text(
        (Path(__file__).parents[2] / "configs" / "strategy" / "seq_ft.yaml").read_text())
    code, out, err = cl_main(["strategy=mine", "dry_run=true"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "name: seq_ft" in out, err
    code, _, err = cl_main(["strategy=mne"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "unknown strategy 'mne'", "mine, multitask", "(did you mean 'mine'?)",
                          prefix="cl-run: config error:")


# ------------------------------------------------------------------ refused when the run is built
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a CUDA device")
def test_fp16_without_cuda_is_refused_when_the_run_is_built(tmp_path, monkeypatch, capsys):
    code, _, err = cl_main(TINY + ["trainer.precision=fp16"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "'trainer.precision': 'fp16'", "needs a CUDA GPU", "trainer.precision=bf16",
                          prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)
    code, out, err = cl_main(["trainer.precision=fp16", "dry_run=true"], tmp_path, monkeypatch, capsys)
    assert code == 0, err  # dry_run plans for a GPU elsewhere


def test_epochs_that_one_accumulated_step_already_exceeds_are_refused(tmp_path, monkeypatch, capsys):
    """epochs=1 over 8 examples in batches of 8 is one micro-batch; grad_accum=4 would make
    the one optimizer step 4 passes over the data."""
    code, _, err = cl_main(["trainer.steps_per_task=null", "trainer.epochs=1", "task_stream.train_size=8",
                            "task_stream.test_size=8", "trainer.batch_size=8", "trainer.grad_accum=4"],
                           tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "'trainer.grad_accum': 4", "task 'increment' has 8 training examples",
                          "makes 1 micro-batch(es), but one optimizer step takes 4", "4.00 passes over the data",
                          "trainer.grad_accum<=1", prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)


def test_ctrl_c_while_the_run_is_built_keeps_nothing(tmp_path, monkeypatch, capsys):
    import cl_runner.training.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "build_model", interrupted)
    code, _, err = cl_main(TINY, tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "interrupted while the run was being built", "nothing was kept", exit_code=130,
                          prefix="cl-run: interrupted")
    assert no_run_folder(tmp_path)


# ------------------------------------------------------------------ run folders
def finished_run_folder(path, config_yaml: str = "seed: 0\n"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config_yaml)
    (path / "metrics.json").write_text('{"R": [[0.0]], "wall_time_s": 12.5}')
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_output_dir_holding_a_finished_run_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    before = finished_run_folder(tmp_path / "done")
    code, _, err = cl_main([f"output_dir={tmp_path / 'done'}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "already holds a run", f"resume={tmp_path / 'done'}")
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before


def test_output_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = cl_main([f"output_dir={tmp_path / 'notes.txt'}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_run_that_loses_an_output_dir_race_gets_one_line(tmp_path, monkeypatch, capsys):
    """The loser of two simultaneous starts finds the folder claimed (config.yaml made
    exclusively by the winner, before it has written anything else)."""
    out = tmp_path / "shared"
    out.mkdir()
    (out / "config.yaml").write_text("")  # the winner's claim
    code, _, err = cl_main([f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "already holds a run")
    assert (out / "config.yaml").read_text() == ""


# ------------------------------------------------------------------ a run whose loss diverges
def test_nan_loss_stops_the_run_naming_task_and_step(tmp_path, monkeypatch, capsys):
    import cl_runner.training.loop as loop

    real, calls = loop.compute_loss, []

    def diverging(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) >= 6 else loss  # task 2, its second step

    monkeypatch.setattr(loop, "compute_loss", diverging)
    out = tmp_path / "run"
    code, _, err = cl_main(TINY + ["task_stream.order=[reverse,increment]", f"output_dir={out}"], tmp_path,
                           monkeypatch, capsys)
    assert_one_line_error(code, err, "training loss is nan at step 2 of task 2/2 'increment'", exit_code=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task000_done.pt"]  # the last good boundary
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-task run with mid-task checkpoints, three kept: (folder, metrics)."""
    work = tmp_path_factory.mktemp("finished")
    metrics, run_dir = run_cl(TINY + ["task_stream.order=[reverse,increment]", "trainer.checkpoint_every_steps=2",
                                      "trainer.keep_checkpoints=3", "trainer.lr=0.01",
                                      "model.architecture_config.resid_pdrop=0.1", f"output_dir={work / 'run'}"], work)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "task000_done.pt", "task001_0000002.pt", "task001_done.pt"]
    return run_dir, metrics


def stopped_copy(finished_run, tmp_path):
    """The finished run as if it had stopped just before writing its metrics."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    (run_dir / "metrics.json").unlink()
    return run_dir


def test_resume_of_a_finished_run_leaves_it_untouched(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    code, out, err = cl_main([f"resume={run_dir}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "is a finished run" in out and "nothing written" in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before


def test_overrides_given_with_resume_are_refused_by_name(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = stopped_copy(finished_run, tmp_path)
    code, _, err = cl_main([f"resume={run_dir}", "trainer.lr=0.5", "seed=3"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "would be ignored: trainer.lr=0.5 seed=3", prefix="cl-run: config error:")
    assert not (run_dir / "metrics.json").exists()


def test_truncated_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = stopped_copy(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "task001_done.pt"
    newest.write_bytes(newest.read_bytes()[:4096])
    code, out, err = cl_main([f"resume={run_dir}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "task001_done.pt is unreadable" in err and "falling back to the previous checkpoint task001_0000002.pt" in err
    assert "resuming from task001_0000002.pt" in out
    assert json.loads((run_dir / "metrics.json").read_text())["R"] == finished_run[1]["R"]
    a = torch.load(finished_run[0] / "checkpoints" / "task001_done.pt", weights_only=True)["model"]
    b = torch.load(newest, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_checkpoint_with_none_before_it_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = stopped_copy(finished_run, tmp_path)
    for name in ("task000_done.pt", "task001_0000002.pt"):
        (run_dir / "checkpoints" / name).unlink()
    (run_dir / "checkpoints" / "task001_done.pt").write_bytes(b"")
    code, _, err = cl_main([f"resume={run_dir}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, "task001_done.pt is unreadable", "no earlier checkpoint")


class RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_holding_a_pickled_object_is_refused(finished_run, tmp_path, monkeypatch, capsys):
    run_dir = stopped_copy(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "task001_done.pt"
    payload = torch.load(newest, weights_only=True)
    payload["strategy"] = RunsCode(tmp_path / "ran")
    torch.save(payload, newest)
    code, _, err = cl_main([f"resume={run_dir}"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, f"checkpoint {newest} refused", "system")
    assert not (tmp_path / "ran").exists()
    assert not (run_dir / "metrics.json").exists()
