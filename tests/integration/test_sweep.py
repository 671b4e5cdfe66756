"""A Hydra sweep (`cl-run -m`): one run folder per job, the sweep's record beside them,
and cl-report tells the jobs apart by the value that was swept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

TINY = ["logger=none", "trainer.progress_bar=false", "task_stream.train_size=100", "task_stream.test_size=8",
        "trainer.steps_per_task=5", "task_stream.order=[reverse,increment]", "experiment_name=sweep"]


@pytest.mark.slow  # sweeps and their folders also run in test_table_command.py
def test_sweep_makes_one_folder_per_job_and_report_names_the_swept_value(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cl_runner.cli", "-m", "trainer.lr=0.003,0.001", *TINY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "results" / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2, list((tmp_path / "results").rglob("*"))
    assert len(list((tmp_path / "results" / "sweep" / "sweeps").glob("*/multirun.yaml"))) == 1
    assert not list(tmp_path.glob("*.log"))

    report = subprocess.run([sys.executable, "-m", "cl_runner.reporting.report", str(tmp_path / "results" / "sweep")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    # (a seed sweep is pooled as one group of seeds instead: tests/unit/test_seed_report.py)
    assert "seq_ft (trainer.lr=0.003)" in report.stdout and "seq_ft (trainer.lr=0.001)" in report.stdout
