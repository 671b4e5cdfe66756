"""`cl-run` on bad input: one line naming the key and the fix, exit code 2, no traceback,
and no half-made run folder left behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
