"""Strategies and add-ons that cannot run together are refused when the stack is built,
before any run folder or model exists: one `cl-run: config error:` line naming both and the
fix, exit code 2."""
from __future__ import annotations

from typing import Any

import pytest
from omegaconf import OmegaConf

from cl_runner.config.validate import validate
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import Strategy
from cl_runner.strategies.classp import ClaSP, ClaSPConfig
from cl_runner.strategies.lr_schedule import LRSchedule, LRScheduleConfig
from cl_runner.strategies.stack import StrategyStack, declares
from tests.helpers import compose
from tests.integration.test_cli_bad_input import assert_one_line_error, cl_main, no_run_folder


def classp(**options: Any) -> ClaSP:
    return ClaSP(OmegaConf.structured(ClaSPConfig(**options)))


def schedule() -> LRSchedule:
    return LRSchedule(OmegaConf.structured(LRScheduleConfig(enabled=True)))


class MakesOptimizer(Strategy):
    name = "makes_optimizer"

    def optimizer(self, named_params, previous):
        return None


class MakesSchedule(Strategy):
    name = "makes_schedule"
    sets_lr_lambda = True


class OwnsRule(Strategy):
    name = "owns_rule"
    owns_update_rule = True
    sets_lr_lambda = False


def test_what_members_declare():
    assert declares(classp(), "optimizer") and declares(classp(), "lr_lambda")
    assert not declares(classp(follow_trainer_schedule=True), "lr_lambda")
    assert declares(schedule(), "lr_lambda") and not declares(schedule(), "optimizer")  # undeclared: it overrides the hook
    assert not declares(Strategy(), "optimizer") and not declares(Strategy(), "lr_lambda")


@pytest.mark.parametrize("members, expected", [
    (lambda: [classp(), schedule()],
     r"^strategy=classp cannot be combined with lr_schedule\.enabled=true: .*; set lr_schedule\.enabled=false$"),
    (lambda: [classp(follow_trainer_schedule=True), schedule()],
     r"^strategy=classp cannot be combined with lr_schedule\.enabled=true"),
    (lambda: [classp(), OwnsRule()],
     r"^strategy=classp cannot be combined with strategy=owns_rule: both replace the optimizer's update rule"),
    (lambda: [classp(follow_trainer_schedule=True), MakesOptimizer()],
     r"^strategy=classp cannot be combined with strategy=makes_optimizer: both build the optimizer"),
    (lambda: [MakesSchedule(), schedule()],
     r"^strategy=makes_schedule cannot be combined with lr_schedule\.enabled=true: both set the learning-rate "
     r"schedule \(`lr_lambda`\); set lr_schedule\.enabled=false$"),
], ids=["classp_lr_schedule", "classp_following_lr_schedule", "two_owners", "two_optimizers", "two_schedules"])
def test_stack_refuses_conflicts_when_built(members, expected):
    with pytest.raises(ValueError, match=expected):
        StrategyStack(members())


def test_stack_accepts_compatible_members():
    assert StrategyStack([MakesOptimizer(), schedule()]).name == "makes_optimizer+lr_schedule"
    assert build_strategy(validate(compose(["strategy=ewc", "lr_schedule.enabled=true"]))).name == "ewc+lr_schedule"
    assert build_strategy(validate(compose(["strategy=rewarm_replay"]))).name == "seq_ft+lr_schedule+replay"


@pytest.mark.parametrize("args, expected", [
    (["strategy=classp", "lr_schedule.enabled=true"],
     ["strategy=classp cannot be combined with lr_schedule.enabled=true", "set lr_schedule.enabled=false"]),
    (["strategy=classp_paper"], ["trainer.max_grad_norm=1.0", "set trainer.max_grad_norm=null"]),
], ids=["classp_lr_schedule", "classp_paper_clipping"])
def test_cl_run_refuses_before_anything_is_made(tmp_path, monkeypatch, capsys, args, expected):
    code, _, err = cl_main(args, tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, *expected, prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)


@pytest.mark.parametrize("on", [combo for k in range(4) for combo in __import__("itertools").combinations(
    ["lr_schedule", "replay", "lines"], k)], ids=lambda combo: "+".join(combo) or "none")
@pytest.mark.parametrize("flip", [False, True], ids=["registry_order", "reversed_on_the_command_line"])
def test_folder_name_label_and_members_agree_for_every_addon_combination(on, flip):
    """The run folder's name, metrics.json's "strategy" and "strategy_members" all come from
    the registry's one label function: the same add-ons in the same (registered) order,
    whatever order the command line names them in."""
    from cl_runner.strategies.registry import members_label, strategy_label
    from cl_runner.training.run import run_label

    switches = [f"{name}.enabled=true" for name in on]
    cfg = validate(compose(["strategy=ewc", *(reversed(switches) if flip else switches)]))
    expected = "+".join(["ewc", *[n for n in ("lr_schedule", "replay", "lines") if n in on]])
    assert strategy_label(cfg) == members_label(cfg) == build_strategy(cfg).name == expected
    assert run_label(cfg) == f"synthetic_tiny_gpt2_{expected}_s0"
