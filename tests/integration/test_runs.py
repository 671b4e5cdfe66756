"""End-to-end runs of the runner core on the built-in stream with a tiny model."""
from __future__ import annotations

import json

import pytest

from tests.helpers import assert_learned_with_margin, run_cl, run_until_crash

SMALL = ["task_stream.train_size=300", "task_stream.test_size=20", "trainer.steps_per_task=30",
         "trainer.batch_size=16"]


def test_default_run_learns_every_task_and_seq_ft_forgets(default_run):
    """At 1 and 2 CPU threads (the default_run fixture), with margin."""
    metrics, run_dir = default_run
    R = metrics["R"]
    assert metrics["tasks"] == ["increment", "decrement", "complement"]
    assert len(R) == 4 and all(len(row) == 3 for row in R)
    # Every task is learned when it is trained (the diagonal), within half its steps...
    assert all(R[j + 1][j] >= 0.95 for j in range(3)), R
    assert_learned_with_margin(metrics)
    # ...and sequential fine-tuning forgets the earlier ones: BWT clearly negative.
    assert metrics["BWT"] <= -0.5, metrics["BWT"]
    assert metrics["strategy"] == "seq_ft"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_default_run_holds_for_other_seeds(seed, tmp_path):
    metrics, _ = run_cl([f"seed={seed}"], tmp_path)
    assert all(metrics["R"][j + 1][j] >= 0.95 for j in range(3)), metrics["R"]
    assert_learned_with_margin(metrics)
    assert metrics["BWT"] <= -0.5, metrics["R"]


def test_default_run_writes_every_output(default_run):
    metrics, run_dir = default_run
    for key in ("tasks", "R", "ACC", "BWT", "FWT", "forgetting", "LA", "ACC_per_step", "wall_time_s",
                "peak_memory_bytes", "train_tokens_per_s", "strategy_extra_bytes"):
        assert key in metrics, key
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "R.csv").read_text().splitlines()[0].startswith("tasks_learned,after,increment")
    assert (run_dir / "plots" / "accuracy_matrix.png").stat().st_size > 0
    assert (run_dir / "plots" / "forgetting_curves.png").stat().st_size > 0
    assert set(metrics["train_loss_curves"]) == set(metrics["tasks"])
    preds = (run_dir / "predictions" / "task_1_after_3.jsonl").read_text().splitlines()
    assert len(preds) == 100 and {"prompt", "answer", "prediction", "score"} <= set(json.loads(preds[0]))
    assert (run_dir / "checkpoints").is_dir()


def test_output_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_cl(SMALL + ["task_stream.order=[reverse]", f"output_dir={out}"], tmp_path)
    from cl_runner.reporting.tracking import RunFolderError

    with pytest.raises(RunFolderError, match="already holds a run"):
        run_cl(SMALL + ["task_stream.order=[reverse]", f"output_dir={out}"], tmp_path)


def test_two_runs_get_two_folders(tmp_path):
    run_cl(SMALL + ["task_stream.order=[reverse]"], tmp_path)
    run_cl(SMALL + ["task_stream.order=[reverse]"], tmp_path)
    assert len(list(tmp_path.glob("results/default/*/metrics.json"))) == 2


@pytest.mark.parametrize("stop_at", [45, 60])  # mid-task (task 2, step 15) and a task boundary
def test_resume_gives_the_same_R_as_an_uninterrupted_run(tmp_path, monkeypatch, stop_at):
    overrides = SMALL + ["trainer.checkpoint_every_steps=5", "task_stream.order=[reverse,increment,copy]",
                         "trainer.lr=0.01", "model.architecture_config.resid_pdrop=0.1"]  # dropout: RNG must resume too
    full, _ = run_cl(overrides + [f"output_dir={tmp_path / 'full'}"], tmp_path)

    run_until_crash(overrides + [f"output_dir={tmp_path / 'stopped'}"], tmp_path, stop_at, monkeypatch)
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    resumed, _ = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    assert resumed["optimizer_steps"] == full["optimizer_steps"]
    # The strongest check: the final weights are bit-identical.
    import torch

    final_full = torch.load(tmp_path / "full" / "checkpoints" / "task002_done.pt", weights_only=False)["model"]
    final_resumed = torch.load(tmp_path / "stopped" / "checkpoints" / "task002_done.pt", weights_only=False)["model"]
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


@pytest.mark.slow  # 33 s; make test-all runs it (make test keeps the conformance suite's multitask runs)
def test_multitask_is_the_upper_bound(tmp_path):
    two = ["task_stream.order=[increment,decrement]", "task_stream.test_size=50", "trainer.steps_per_task=120"]
    seq, _ = run_cl(two, tmp_path)
    joint, _ = run_cl(two + ["strategy=multitask"], tmp_path)
    assert_learned_with_margin(seq)
    assert joint["ACC"] > seq["ACC"] + 0.2, (joint["R"], seq["R"])


def test_wandb_offline_logs_a_tasks_learned_axis(tmp_path):
    metrics, run_dir = run_cl(SMALL + ["task_stream.order=[reverse,copy]", "logger=wandb", "logger.mode=offline"],
                              tmp_path)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run folder"
    assert list(runs[0].glob("*.wandb"))
