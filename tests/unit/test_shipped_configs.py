"""Every option file that ships in configs/ composes, validates and (for strategies and
add-ons) builds its strategy stack, so no shipped option fails only when a user picks it."""
from __future__ import annotations

from pathlib import Path

import pytest

from cl_runner.config.validate import validate
from cl_runner.strategies import build_strategy
from tests.helpers import REPO, compose

CONFIGS = REPO / "configs"
# What a group's options need besides themselves to validate (the data folders are only
# checked to be set here; the loaders check them when a run is built).
NEEDS = {
    "task_stream": {"custom": ["task_stream.tasks=[{name: a, path: /data/a}]"]},
    # the paper's and the code's absolute threshold refuse gradient clipping, by design
    "strategy": {name: ["trainer.max_grad_norm=null"] for name in ("classp_code", "classp_paper")},
}
DATA = ["task_stream.data_dir=/data"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def cases() -> list[tuple[str, str]]:
    groups = ("model", "task_stream", "strategy", "trainer", "logger", "launcher", "experiment")
    return [(g, o) for g in groups for o in options(g)]


@pytest.mark.parametrize("group,option", cases(), ids=lambda v: v)
def test_every_shipped_option_composes_and_validates(group, option):
    if group == "launcher" and option == "submitit_slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [f"{group}={option}", *NEEDS.get(group, {}).get(option, [])]
    if group in ("task_stream", "experiment"):
        overrides += DATA
    cfg = validate(compose(overrides))
    if group == "strategy":
        build_strategy(cfg)


@pytest.mark.parametrize("addon", options("addons"))
def test_every_addon_composes_validates_and_builds(addon):
    cfg = validate(compose([f"{addon}.enabled=true"]))
    stack = build_strategy(cfg)
    assert addon in stack.name
