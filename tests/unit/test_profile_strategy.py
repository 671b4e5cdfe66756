"""scripts/profile_strategy.py on tiny_llama: seq_ft and EWC in one process, a table of
phases with positive times, per-step ratios and peaks (a couple of seconds)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import profile_strategy  # noqa: E402


def test_kind_of_follows_the_parent_chain():
    phases = {"step": {"parent": "run"}, "forward": {"parent": "step"}, "ewc/penalty_gradient": {"parent": "after_backward"},
              "after_backward": {"parent": "step"}, "after_task": {"parent": "run"}, "ewc/fisher": {"parent": "after_task"},
              "run": {"parent": None}, "evaluate": {"parent": "run"}}
    assert profile_strategy.kind_of("ewc/penalty_gradient", phases) == "per_step"
    assert profile_strategy.kind_of("forward", phases) == "per_step"
    assert profile_strategy.kind_of("ewc/fisher", phases) == "boundary"
    assert profile_strategy.kind_of("evaluate", phases) == "other"


def test_summary_ratios_by_hand():
    base = {"label": "seq_ft", "steps": 4, "peak_bytes": 300, "floor_bytes": 100,
            "phases": {"step": {"seconds": 0.4}, "before_task": {"seconds": 0.0}}}
    run = {"label": "s", "steps": 4, "peak_bytes": 450, "floor_bytes": 100,
           "phases": {"step": {"seconds": 0.8}, "before_task": {"seconds": 2.5}, "after_task": {"seconds": 1.0}}}
    s = profile_strategy.summary(run, base)
    assert s["ms_per_step"] == pytest.approx(200.0) and s["step_ratio"] == pytest.approx(2.0)
    assert (s["task_start_s"], s["task_end_s"]) == (2.5, 1.0)
    assert s["peak_ratio"] == pytest.approx(1.5) and s["above_floor_ratio"] == pytest.approx(350 / 200)


def test_profile_seq_ft_and_ewc_on_tiny_llama(tmp_path):
    results = profile_strategy.main(["--model", "tiny_llama", "--strategy", "ewc", "--steps", "2", "--no-warmup",
                                     "--variant", "ewc_autograd", "strategy=ewc", "strategy.penalty_gradient=autograd",
                                     "--out", str(tmp_path), "task_stream.train_size=16"])
    assert [r["label"] for r in results["runs"]] == ["seq_ft", "ewc", "ewc_autograd"]
    for run in results["runs"]:
        assert run["steps"] == 4  # 2 tasks x 2 steps
        for name in ("step", "forward", "backward", "optimizer_step", "before_task", "after_task", "evaluate"):
            assert run["phases"][name]["seconds"] > 0, (run["label"], name)
        assert run["phases"]["forward"]["calls"] == 4 and run["phases"]["before_task"]["calls"] == 2
        assert run["peak_bytes"] > 0
    ewc = results["runs"][1]["phases"]
    assert ewc["ewc/fisher"]["calls"] == 1 and ewc["ewc/fisher"]["parent"] == "after_task"  # one boundary
    assert ewc["ewc/penalty_gradient"]["calls"] == 4  # marked in every step (a no-op before the boundary)
    assert "ewc/penalty_gradient" not in results["runs"][2]["phases"]  # autograd: the penalty is a loss term
    for s in results["summary"]:
        assert s["step_ratio"] > 0 and s["peak_ratio"] > 0
    assert results["summary"][0]["step_ratio"] == pytest.approx(1.0)
    text = (tmp_path / "profile_tiny_llama.md").read_text()
    assert "| ewc/fisher | boundary |" in text and "| forward | per_step |" in text
    assert json.loads((tmp_path / "profile_tiny_llama.json").read_text())["model"] == "tiny_llama"
