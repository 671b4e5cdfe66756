"""Two processes (torchrun on CPUs: DDP over gloo, as on a multi-GPU node): one run folder,
every prediction gathered, tokens summed over ranks, and a resume at a task boundary.
That two processes give the 1-process run for every strategy is checked by
tests/integration/test_conformance.py (generated from the registry).

Each strategy keeps its state consistent across processes: EWC's Fisher is cut into the
same batches for any world size, HFT freezes parameters after DDP has wrapped the model
(cl-run turns on DDP's unused-parameter detection for it), svd_orthogonal computes the
same bases on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS = ["logger=none", "trainer.steps_per_task=3", "task_stream.train_size=64", "task_stream.test_size=10",
         "task_stream.order=[reverse,increment]", "trainer.progress_bar=false"]


def torchrun(overrides: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cl_runner.cli", *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "task001_done.pt", map_location="cpu", weights_only=False)


def test_two_process_run_resumes_at_a_task_boundary_bit_identically(tmp_path):
    """Stop a two-process EWC run after task 1 (its later files removed) and resume it with
    two processes: the same weights and R as the uninterrupted run."""
    run_dir = tmp_path / "run"
    overrides = STEPS + ["strategy=ewc", "trainer.batch_size=8", "trainer.keep_checkpoints=2"]
    done = torchrun(overrides + [f"output_dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    full_R = json.loads((run_dir / "metrics.json").read_text())["R"]
    full_weights = final_state(run_dir)["model"]

    (run_dir / "metrics.json").unlink()
    (run_dir / "checkpoints" / "task001_done.pt").unlink()
    resumed = torchrun([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from task000_done.pt" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["R"] == full_R
    for name, weight in final_state(run_dir)["model"].items():
        assert torch.equal(weight, full_weights[name]), name
