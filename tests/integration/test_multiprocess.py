"""Two processes (torchrun on CPUs: DDP over gloo, as on a multi-GPU node) give the run of
one process with the same global batch: the same R, the same token count, weights equal
up to float reduction order, one run folder, every prediction gathered.

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

from tests.helpers import REPO, run_cl

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

STEPS = ["logger=none", "trainer.steps_per_task=3", "task_stream.train_size=64", "task_stream.test_size=10",
         "task_stream.order=[reverse,increment]", "trainer.progress_bar=false"]
CASES = {
    "seq_ft": [],
    "ewc_sampled": ["strategy=ewc", "strategy.fisher=sampled"],
    "hft": ["strategy=hft"],
    "svd_frozen+replay": ["strategy=svd_orthogonal", "strategy.freeze_untargeted=true", "replay.enabled=true"],
    # The anneal takes the global batch in lock-step like training; annealed weights are kept.
    "hft+infinite_annealed": ["strategy=hft", "lr_schedule.enabled=true", "lr_schedule.curve=infinite",
                              "lr_schedule.anneal_steps=2", "lr_schedule.resume_from=annealed"],
    # LoRA dropout off, like the model's: one process draws other masks than two would.
    "lora_seq_ft": ["model.adapter=lora", "model.lora.dropout=0"],
    # One LoRA per task, all created before DDP wraps the model: task 2's must be synchronised too.
    "olora": ["strategy=olora", "model.lora.dropout=0"],
}


def torchrun(overrides: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cl_runner.cli", *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "task001_done.pt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_with_the_same_global_batch(case, tmp_path):
    overrides = STEPS + CASES[case]
    two_dir = tmp_path / "two"
    done = torchrun(overrides + ["trainer.batch_size=8", f"output_dir={two_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("[cl-run] run folder:") == 1, "only rank 0 reports and makes the folder"
    assert not (tmp_path / "results").exists()

    one, one_dir = run_cl(overrides + ["trainer.batch_size=16", f"output_dir={tmp_path / 'one'}"], tmp_path)
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["R"] == one["R"]

    a, b = final_state(two_dir), final_state(one_dir)
    assert a["progress"]["train_tokens"] == b["progress"]["train_tokens"], "tokens are summed over ranks"
    for name, weight in b["model"].items():
        gap = (a["model"][name] - weight).norm() / (weight.norm() + 1e-12)
        # Adam's first steps are ~lr * sign(g): float reduction order moves near-zero
        # gradients, so the weights agree to ~1e-4 relative, not bit for bit.
        assert gap < 5e-3, (name, float(gap))

    for k, task in enumerate(("reverse", "increment"), start=1):
        lines = (two_dir / "predictions" / f"task_{k}_after_2.jsonl").read_text().splitlines()
        assert len(lines) == 10, f"{task}: predictions of both ranks gathered"


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
