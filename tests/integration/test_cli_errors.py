"""`cl-run` on bad input: one line naming the key and the fix, exit code 2, no traceback,
and no half-made run folder left behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO


def cl_run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cl_runner.cli", "logger=none", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["model.path=/no/such/model", "model.architecture=null"], "/no/such/model"),
    (["task_stream=trace", "task_stream.data_dir=/no/such/data"], "task_stream.data_dir"),
])
def test_missing_model_or_data_is_one_line_and_leaves_no_run_folder(tmp_path, args, expected):
    done = cl_run(args, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "cl-run: error:" in done.stderr and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    leftovers = list((tmp_path / "results").rglob("*")) if (tmp_path / "results").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers
    assert not list(tmp_path.glob("*.log")), "Hydra's job log must not land in the working directory"


def test_config_error_names_key_and_exits_before_anything_is_built(tmp_path):
    done = cl_run(["strategy=svd_orthogonal", "strategy.rank.unfreeze_ratio=1.5"], tmp_path)
    assert done.returncode == 2
    assert "cl-run: config error:" in done.stderr and "strategy.rank.unfreeze_ratio" in done.stderr, done.stderr
    assert not (tmp_path / "results").exists()


def test_a_users_own_files_in_output_dir_survive_a_failed_start(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = cl_run([f"output_dir={out}", "model.path=/no/such/model", "model.architecture=null"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "config.yaml").exists()


def test_misspelt_key_exits_2_with_the_closest_key(tmp_path):
    done = cl_run(["trainer.lrr=0.1"], tmp_path)
    assert done.returncode == 2
    assert "cl-run: config error: unknown config key 'trainer.lrr': did you mean 'trainer.lr'?" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ Ctrl-C, resume, logs
# Two tasks of 100 steps (about 1.5 s each on one thread) with a checkpoint every 5 steps:
# a SIGINT sent when task 2's first checkpoint appears lands mid-training.
INTERRUPTIBLE = ["trainer.cpu_threads=1", "task_stream.train_size=64", "task_stream.test_size=8",
                 "trainer.steps_per_task=100", "trainer.batch_size=8", "task_stream.order=[reverse,increment]",
                 "trainer.checkpoint_every_steps=5"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A real cl-run, its output going to pipes as on a cluster (trainer.progress_bar left
    on), sent SIGINT once task 2's first checkpoint is written: (exit code, stdout,
    stderr, run folder)."""
    work = tmp_path_factory.mktemp("interrupted")
    run_dir = work / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # A test process started in the background of a non-interactive shell (`make test &`)
    # inherits SIGINT ignored, and so would the run: give it the default disposition.
    proc = subprocess.Popen([sys.executable, "-m", "cl_runner.cli", "logger=none", *INTERRUPTIBLE,
                             f"output_dir={run_dir}"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("task001_*.pt")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, run_dir


def test_output_to_a_pipe_has_progress_lines_not_bar_frames(interrupted):
    _, out, err, _ = interrupted
    assert "\r" not in out and "\r" not in err
    lines = [line for line in out.splitlines() if ": step " in line]
    # Task 1: every 10% of its 100 steps, the last left to the task's summary line.
    assert [line.split(": step ")[1].split()[0] for line in lines if "task 1/2" in line] == \
        [f"{s}/100" for s in range(10, 100, 10)]
    assert re.fullmatch(r"\[cl-run\] task 1/2 reverse: step 10/100 \(10%\)  loss \d+\.\d{4}  [\d,]+ tokens/s  ETA \S+",
                        lines[0]), lines[0]


def test_ctrl_c_says_where_it_stopped_and_resume_gives_the_same_R(interrupted, tmp_path):
    """One line naming the step and the checkpoint, exit 130; `cl-run resume=` then ends
    with an uninterrupted run's R, and its cost covers both sessions (the first one's
    time carried in the checkpoint, train + eval within the total)."""
    from tests.helpers import run_cl

    code, _, err, run_dir = interrupted
    assert code == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cl-run:")]
    assert len(lines) == 1, err
    stopped = re.fullmatch(r"cl-run: interrupted at step \d+/100 of task 2/2 'increment'; cl-run resume=(\S+) "
                           r"continues from checkpoints/(task001_\d{7}\.pt) \(step \d+ of task 2\)", lines[0])
    assert stopped, lines[0]
    assert stopped.group(1) == str(run_dir) and (run_dir / "checkpoints" / stopped.group(2)).is_file()
    assert not (run_dir / "metrics.json").exists()
    saved = torch.load(run_dir / "checkpoints" / stopped.group(2), weights_only=True)["progress"]

    resumed, _ = run_cl([f"resume={run_dir}"], tmp_path)
    whole, _ = run_cl(INTERRUPTIBLE + [f"output_dir={tmp_path / 'whole'}"], tmp_path)
    assert resumed["R"] == whole["R"]
    assert resumed["sessions"] == 2 and whole["sessions"] == 1
    assert resumed["train_time_s"] + resumed["eval_time_s"] <= resumed["wall_time_s"]
    assert resumed["wall_time_s"] > saved["wall_seconds"] > saved["train_seconds"] + saved["eval_seconds"]
    assert resumed["train_time_s"] > saved["train_seconds"] > 0
