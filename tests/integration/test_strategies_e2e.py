"""Every strategy and the tested combinations, end to end on the built-in stream."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_learned_with_margin, run_cl, run_until_crash, shared_run

TINY = ["task_stream.train_size=200", "task_stream.test_size=10", "trainer.steps_per_task=16",
        "trainer.batch_size=16", "trainer.lr=0.01", "model.architecture_config.resid_pdrop=0.1"]

# Settings and combinations beyond each registration's own example (those run in
# tests/integration/test_conformance.py, generated from the registry).
STRATEGIES = {
    "seq_ft_carry": ["strategy=seq_ft", "strategy.carry_optimizer=true"],
    "svd_orthogonal": ["strategy=svd_orthogonal"],  # tiny_gpt2's Conv1D weights, with dropout
    "svd_adaptive_accumulate": ["strategy=svd_orthogonal", "strategy.rank.mode=adaptive", "strategy.bases=accumulate"],
    "rewarm_replay": ["strategy=rewarm_replay"],
    "svd+replay+lines": ["strategy=svd_orthogonal", "replay.enabled=true", "replay.ratio=0.25", "lines.enabled=true"],
    "ewc+rewarm_cosine": ["strategy=ewc", "lr_schedule.enabled=true", "lr_schedule.curve=rewarm_cosine"],
    "infinite_schedule": ["lr_schedule.enabled=true", "lr_schedule.curve=infinite", "lr_schedule.anneal_steps=4"],
    "lines_eval_only": ["lines.enabled=true", "lines.apply_to=eval_only"],
}
# What metrics.json must say: the label (a preset's own name) and the members that ran,
# base first, add-ons in their registered order.
EXPECTED_LABELS = {
    "seq_ft_carry": ("seq_ft", "seq_ft"),
    "svd_orthogonal": ("svd_orthogonal", "svd_orthogonal"),
    "svd_adaptive_accumulate": ("svd_orthogonal", "svd_orthogonal"),
    "rewarm_replay": ("rewarm_replay", "seq_ft+lr_schedule+replay"),
    "svd+replay+lines": ("svd_orthogonal+replay+lines", "svd_orthogonal+replay+lines"),
    "ewc+rewarm_cosine": ("ewc+lr_schedule", "ewc+lr_schedule"),
    "infinite_schedule": ("seq_ft+lr_schedule", "seq_ft+lr_schedule"),
    "lines_eval_only": ("seq_ft+lines", "seq_ft+lines"),
}


def final_weights(run_dir):
    path = sorted((run_dir / "checkpoints").glob("task*_done.pt"))[-1]
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_runs_and_resumes_identically(name, tmp_path, monkeypatch):
    """Each strategy completes a 3-task stream, reports its costs, and a run stopped in
    the middle of task 2 resumes to the same R and bit-identical final weights."""
    overrides = TINY + ["trainer.checkpoint_every_steps=4"] + STRATEGIES[name]
    full, full_dir = run_cl(overrides + [f"output_dir={tmp_path / 'full'}"], tmp_path)
    assert len(full["R"]) == 4 and all(v is not None for row in full["R"] for v in row)
    assert (full["strategy"], full["strategy_members"]) == EXPECTED_LABELS[name]

    stop_at = full["optimizer_steps"] // 2 + 2  # inside the second task
    run_until_crash(overrides + [f"output_dir={tmp_path / 'stopped'}"], tmp_path, stop_at, monkeypatch)
    resumed, resumed_dir = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    a, b = final_weights(full_dir), final_weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_replay_forgets_measurably_less_than_seq_ft(tmp_path_factory):
    """On the default stream (seed 0, 2 threads), 25% replay keeps much more of the old
    tasks; seq_ft is the default run the other tests share."""
    seq, _ = shared_run(["trainer.cpu_threads=2"], tmp_path_factory)
    replay, _ = shared_run(["trainer.cpu_threads=2", "replay.enabled=true", "replay.ratio=0.25"], tmp_path_factory)
    assert seq["BWT"] <= -0.8, seq["R"]
    assert_learned_with_margin(replay)
    assert replay["BWT"] >= seq["BWT"] + 0.5, (seq["R"], replay["R"])
    assert replay["ACC"] >= seq["ACC"] + 0.3
