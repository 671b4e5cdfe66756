"""Every strategy and the tested combinations, end to end on the built-in stream."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_learned_with_margin, run_cl, run_until_crash, shared_run

TINY = ["task_stream.train_size=200", "task_stream.test_size=10", "trainer.steps_per_task=16",
        "trainer.batch_size=16", "trainer.lr=0.01", "model.architecture_config.resid_pdrop=0.1"]

STRATEGIES = {
    "seq_ft": ["strategy=seq_ft"],
    "seq_ft_carry": ["strategy=seq_ft", "strategy.carry_optimizer=true"],
    "multitask": ["strategy=multitask"],
    "svd_orthogonal": ["strategy=svd_orthogonal"],
    "svd_adaptive_accumulate": ["strategy=svd_orthogonal", "strategy.rank.mode=adaptive", "strategy.bases=accumulate"],
    "hft": ["strategy=hft"],
    "ewc": ["strategy=ewc"],
    "classp": ["strategy=classp"],
    "rewarm_replay": ["strategy=rewarm_replay"],
    "svd+replay+lines": ["strategy=svd_orthogonal", "replay.enabled=true", "replay.ratio=0.25", "lines.enabled=true"],
    "ewc+rewarm_cosine": ["strategy=ewc", "lr_schedule.enabled=true", "lr_schedule.curve=rewarm_cosine"],
    "infinite_schedule": ["lr_schedule.enabled=true", "lr_schedule.curve=infinite", "lr_schedule.anneal_steps=4"],
    "lines_eval_only": ["lines.enabled=true", "lines.apply_to=eval_only"],
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
    chosen = [o.split("=")[1] for o in STRATEGIES[name] if o.startswith("strategy=")]
    base = {"rewarm_replay": "seq_ft"}.get(chosen[0], chosen[0]) if chosen else "seq_ft"
    assert full["strategy_members"].split("+")[0] == base
    assert full["strategy"] == ("rewarm_replay" if name == "rewarm_replay" else full["strategy_members"])

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
