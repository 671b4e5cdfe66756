"""A run records its environment (environment.json at once, metrics.json at the end),
trainer.cpu_threads is applied, and cl-report names a killed run it leaves out."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cl_runner.reporting import environment
from tests.helpers import REPO, run_cl, run_until_crash

SMALL = ["trainer.steps_per_task=5", "task_stream.train_size=64", "task_stream.test_size=8",
         "trainer.batch_size=16", "evaluation.save_predictions=false"]
KEYS = ("cl_runner", "git_commit", "git_dirty", "python", "torch", "transformers", "accelerate", "datasets",
        "peft", "cuda", "cudnn", "device", "device_names", "cpu", "torch_threads", "world_size", "hostname",
        "command")


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.setattr(environment, "_default_threads", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_run_records_its_environment_with_the_threads_it_used(tmp_path, restore_threads):
    metrics, run_dir = run_cl(SMALL + ["trainer.cpu_threads=1"], tmp_path)
    env = metrics["environment"]
    assert all(key in env for key in KEYS), sorted(set(KEYS) - set(env))
    assert env["torch_threads"] == 1 and env["world_size"] == 1 and env["device"] == "cpu"
    assert env["torch"] == torch.__version__ and env["python"] == ".".join(map(str, sys.version_info[:3]))
    if (REPO / ".git").exists():
        assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert json.loads((run_dir / "environment.json").read_text()) == env
    assert (run_dir / "config.yaml").is_file()


def test_killed_run_keeps_its_environment_and_report_says_it_left_it_out(tmp_path, monkeypatch, capsys,
                                                                         restore_threads):
    killed = tmp_path / "results" / "default" / "killed"
    run_until_crash(SMALL + [f"output_dir={killed}"], tmp_path, 7, monkeypatch)  # in task 2
    assert not (killed / "metrics.json").exists()
    assert json.loads((killed / "environment.json").read_text())["torch"] == torch.__version__
    run_cl(SMALL, tmp_path)  # a finished run beside it

    from cl_runner.reporting.report import main

    capsys.readouterr()
    assert main([str(tmp_path / "results"), "--out", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert f"left out {killed}: no metrics.json" in captured.err
    assert "(1 run)" in captured.out  # the finished run only

    resumed, _ = run_cl([f"resume={killed}"], tmp_path)  # every start is kept
    assert len(resumed["environment"]["earlier_starts"]) == 1


def test_a_non_integer_seed_stops_cl_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cl_runner.cli", "seed=abc", "logger=none"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "cl-run: config error: bad value for 'seed'" in done.stderr
    assert not (tmp_path / "results").exists()
