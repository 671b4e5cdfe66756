"""EWC's two penalty gradients in a real run (tiny_llama, CPU): the analytic one added
after backward trains the same trajectory as the autograd graph, with gradient
accumulation and clipping on, and the penalty does move it (lambda = 0 differs)."""
from __future__ import annotations

import pytest

from tests.helpers import run_cl

# 3 tasks x 3 steps of 2 micro-batches: the penalty acts in tasks 2 and 3, and once per
# optimizer step (not once per micro-batch) whichever the path.
BASE = ["model=tiny_llama", "strategy=ewc", "strategy.ewc_lambda=5000", "strategy.fisher_samples=16",
        "trainer.steps_per_task=3", "trainer.grad_accum=2", "trainer.batch_size=4", "trainer.max_grad_norm=1.0",
        "trainer.lr=0.003", "task_stream.train_size=32", "task_stream.test_size=4", "evaluation.batch_size=4",
        "evaluation.save_predictions=false"]


def curves(tmp_path, name: str, *extra: str) -> list[float]:
    metrics, _ = run_cl([*BASE, *extra, f"output_dir={tmp_path / name}"], tmp_path)
    return [loss for curve in metrics["train_loss_curves"].values() for _, loss in curve]


def test_analytic_and_autograd_penalty_gradients_train_the_same_trajectory(tmp_path):
    analytic = curves(tmp_path, "analytic", "strategy.penalty_gradient=analytic")
    autograd = curves(tmp_path, "autograd", "strategy.penalty_gradient=autograd")
    unpenalised = curves(tmp_path, "lambda0", "strategy.ewc_lambda=0")
    assert len(analytic) == len(autograd) == 9
    assert analytic == pytest.approx(autograd, rel=1e-5, abs=1e-6)
    assert analytic[:3] == pytest.approx(unpenalised[:3], rel=1e-6)  # task 1: no penalty yet
    assert max(abs(a - b) for a, b in zip(analytic[3:], unpenalised[3:])) > 1e-4  # the penalty acts
