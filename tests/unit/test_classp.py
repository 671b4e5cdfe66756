"""CLASSP's update rule on given gradients over three steps, written out by hand: the
paper's rule with p = 1 and p = 2, the released code's rule, the quantile extension, and
the accumulator's persistence across tasks and checkpoints; the defaults train a model,
the paper and code presets compose with their documented values, and clipping in absolute
mode is refused before anything is built."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.cli import build_checked_strategy
from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import StrategyContext
from cl_runner.strategies.classp import ClaSP, ClaSPConfig, ClaSPOptimizer, update_mask
from cl_runner.streams.task import Example, Task, TaskStream
from tests.helpers import compose

# Three steps of gradients for one 3-weight tensor starting at w = 0.
GRADS = [[1.0, 0.2, -2.0], [1.0, 1.0, 0.4], [-2.0, 0.1, 1.0]]


def run(grads: list[list[float]], **options) -> tuple[nn.Parameter, ClaSPOptimizer]:
    w = nn.Parameter(torch.zeros(len(grads[0])))
    opt = ClaSPOptimizer([w], **options)
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    return w, opt


def acc(opt: ClaSPOptimizer, p: nn.Parameter) -> list[float]:
    return opt.state[p]["accumulator"].tolist()


def test_paper_rule_p1_by_hand():
    # alpha 0.1, eps 1, threshold 0.25 (|g| > 0.5 moves), denominator eps + sum_{k<t} |g_k|.
    # step 1: moves [x, -, x]; denominators 1, 1   -> w = [-0.1, 0, 0.2],  acc = [1, 0, 2]
    # step 2: moves [x, x, -]; denominators 2, 1   -> w = [-0.15, -0.1, 0.2], acc = [2, 1, 2]
    # step 3: moves [x, -, x]; denominators 3, 3   -> w = [-0.15 + 0.2/3, -0.1, 0.2 - 0.1/3], acc = [4, 1, 3]
    w, opt = run(GRADS, lr=0.1, threshold=0.25, eps=1.0, power=1.0)
    assert w.detach().tolist() == pytest.approx([-0.15 + 0.2 / 3, -0.1, 0.2 - 0.1 / 3])
    assert acc(opt, w) == pytest.approx([4.0, 1.0, 3.0])


def test_paper_rule_p2_by_hand():
    # denominator (eps + sum_{k<t} g_k^2)^(1/2), the accumulator adds g^2 where moved.
    # step 1: denominators 1, 1        -> w = [-0.1, 0, 0.2],            acc = [1, 0, 4]
    # step 2: denominators sqrt 2, 1   -> w = [-0.1 - 0.1/sqrt 2, -0.1, 0.2], acc = [2, 1, 4]
    # step 3: denominators sqrt 3, sqrt 5 -> w0 += 0.2/sqrt 3, w2 -= 0.1/sqrt 5, acc = [6, 1, 5]
    w, opt = run(GRADS, lr=0.1, threshold=0.25, eps=1.0, power=2.0)
    expected = [-0.1 - 0.1 / math.sqrt(2) + 0.2 / math.sqrt(3), -0.1, 0.2 - 0.1 / math.sqrt(5)]
    assert w.detach().tolist() == pytest.approx(expected)
    assert acc(opt, w) == pytest.approx([6.0, 1.0, 5.0])


def test_accumulator_grows_only_where_updated():
    w, opt = run(GRADS[:1], lr=0.1, threshold=0.25, eps=1.0)
    assert acc(opt, w)[1] == 0.0 and w.detach().tolist()[1] == 0.0  # g = 0.2: below the threshold
    assert float(opt.last_updated) == 2 and opt.last_considered == 3


def test_reference_code_compat_by_hand():
    # The released code: any non-zero gradient updates the whole tensor when threshold < 1;
    # the current |g| is added before the step; denominator (acc + eps)^(1/p).
    # step 1: acc = [1, 0.2, 2]     -> w -= 0.1 * [1/2, 0.2/1.2, -2/3]
    # step 2: acc = [2, 1.2, 2.4]   -> w -= 0.1 * [1/3, 1/2.2, 0.4/3.4]
    # step 3: acc = [4, 1.3, 3.4]   -> w -= 0.1 * [-2/5, 0.1/2.3, 1/4.4]
    w, opt = run(GRADS, lr=0.1, threshold=0.5, eps=1.0, power=1.0, reference_code_compat=True)
    expected = [-0.1 * (1 / 2 + 1 / 3 - 2 / 5), -0.1 * (0.2 / 1.2 + 1 / 2.2 + 0.1 / 2.3), -0.1 * (-2 / 3 + 0.4 / 3.4 + 1 / 4.4)]
    assert w.detach().tolist() == pytest.approx(expected)
    assert acc(opt, w) == pytest.approx([4.0, 1.3, 3.4])


def test_reference_code_compat_ignores_power_in_the_sum_but_keeps_the_root():
    # p = 2: acc still adds |g| (not g^2); the denominator is sqrt(acc + eps).
    w, opt = run(GRADS[:1], lr=0.1, threshold=0.5, eps=1.0, power=2.0, reference_code_compat=True)
    assert acc(opt, w) == pytest.approx([1.0, 0.2, 2.0])
    assert w.detach().tolist() == pytest.approx([-0.1 / math.sqrt(2), -0.02 / math.sqrt(1.2), 0.2 / math.sqrt(3)])


def test_reference_code_compat_threshold_is_a_boolean_comparison():
    w, opt = run(GRADS, lr=0.1, threshold=1.0, eps=1.0, reference_code_compat=True)
    assert w.detach().tolist() == [0.0, 0.0, 0.0]  # True > 1.0 is false: never updates
    w, opt = run([[0.0, 0.0, 0.0]], lr=0.1, threshold=0.5, eps=1.0, reference_code_compat=True)
    assert acc(opt, w) == [0.0, 0.0, 0.0]  # an all-zero gradient leaves the tensor alone


def test_quantile_mode_updates_exactly_the_top_fraction():
    g = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.05, 1.0, -0.7, 0.3, 0.01])
    mask = update_mask(g, "quantile", threshold=99.0, update_fraction=0.3)
    assert mask.tolist() == [False, True, False, True, False, False, True, False, False, False]
    w, opt = run([g.tolist()], lr=0.1, eps=1.0, threshold=99.0, threshold_mode="quantile", update_fraction=0.3)
    moved = [i for i, v in enumerate(w.detach().tolist()) if v != 0.0]
    assert moved == [1, 3, 6] and sum(a > 0 for a in acc(opt, w)) == 3
    assert w.detach()[1] == pytest.approx(0.3)  # -0.1 * -3 / (1 + 0)
    assert update_mask(torch.ones(7), "quantile", 0.0, 0.01).sum() == 1  # at least one weight moves


# ---------------------------------------------------------------- the strategy
def make(**options) -> ClaSP:
    strategy = ClaSP(OmegaConf.structured(ClaSPConfig(**options)))
    task = Task("a", [Example("p", "a", "a")], [Example("p", "a", "a")])
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=nn.Linear(1, 1), stream=TaskStream("s", [task, task]),
        model_kind="classifier", model_family="test", seed=0, trainer=SimpleNamespace(lr=1e-3, max_grad_norm=None),
        loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}))
    return strategy


def test_accumulator_persists_across_tasks_and_checkpoints():
    s = make(alpha=0.1, threshold=0.25, eps=1.0, threshold_mode="absolute", sum_includes_current=False)
    assert s.carry_optimizer  # the loop hands the previous optimizer to the hook
    w = nn.Parameter(torch.zeros(3))
    first = s.optimizer([("w", w)], None)
    for g in GRADS[:2]:
        w.grad = torch.tensor(g)
        first.step()
        s.after_optimizer_step()
    second = s.optimizer([("w", w)], first)  # task 2: a new optimizer, same accumulators
    assert acc(second, w) == pytest.approx([2.0, 1.0, 2.0])
    w.grad = torch.tensor(GRADS[2])
    second.step()
    assert w.detach().tolist() == pytest.approx([-0.15 + 0.2 / 3, -0.1, 0.2 - 0.1 / 3])  # as if one run
    # Through a checkpoint: a fresh optimizer loads the state dict.
    restored = s.optimizer([("w", w)], None)
    restored.load_state_dict(second.state_dict())
    assert acc(restored, w) == pytest.approx([4.0, 1.0, 3.0])
    assert s.report()["mean_update_fraction"] == pytest.approx(4 / 6)


def test_loaded_accumulator_stays_fp32_for_bf16_weights():
    w = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = ClaSPOptimizer([w], lr=0.1, threshold=0.25, eps=1.0)
    w.grad = torch.tensor([1.0, 0.0, 1.0 / 3], dtype=torch.bfloat16)
    opt.step()
    again = ClaSPOptimizer([w], lr=0.1, threshold=0.0, eps=1.0)
    again.load_state_dict(opt.state_dict())
    assert again.state[w]["accumulator"].dtype == torch.float32


def test_alpha_is_constant_unless_asked():
    assert make().lr_lambda(0, 10)(7) == 1.0
    assert make(follow_trainer_schedule=True).lr_lambda(0, 10) is None


@pytest.mark.parametrize("options,match", [
    ({"threshold_mode": "topk"}, r"strategy\.threshold_mode.*'topk'.*absolute, quantile"),
    ({"alpha": 0.0}, r"strategy\.alpha"),
    ({"update_fraction": 1.5}, r"strategy\.update_fraction"),
    ({"threshold": -1.0}, r"strategy\.threshold"),
    ({"reference_code_compat": True, "threshold_mode": "quantile"}, r"reference_code_compat=true.*threshold_mode=absolute"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ClaSP(OmegaConf.structured(ClaSPConfig(**options)))


CLIP_FIX = r"threshold_mode=absolute cannot train with trainer\.max_grad_norm=1\.0.*set trainer\.max_grad_norm=null"


def test_clipping_in_absolute_mode_is_refused_when_built():
    with pytest.raises(ValueError, match=CLIP_FIX):
        build_strategy(validate(compose(["strategy=classp", "strategy.threshold_mode=absolute"])))
    with pytest.raises(ConfigError, match=CLIP_FIX):  # cl-run: config error: ..., exit 2
        build_checked_strategy(validate(compose(["strategy=classp_paper"])))
    # Off, or in quantile mode (the default), clipping is accepted.
    build_strategy(validate(compose(["strategy=classp_paper", "trainer.max_grad_norm=null"])))
    build_strategy(validate(compose(["strategy=classp", "trainer.max_grad_norm=1.0"])))


def test_clipping_in_absolute_mode_is_refused_at_setup_too():
    strategy = ClaSP(OmegaConf.structured(ClaSPConfig(threshold_mode="absolute")))
    task = Task("a", [Example("p", "a", "a")], [Example("p", "a", "a")])
    with pytest.raises(ValueError, match=CLIP_FIX):
        strategy.setup(StrategyContext(
            accelerator=Accelerator(cpu=True), model=nn.Linear(1, 1), stream=TaskStream("s", [task]),
            model_kind="classifier", model_family="test", seed=0, trainer=SimpleNamespace(max_grad_norm=1.0),
            loss_fn=lambda m, b: torch.zeros(()), collate=lambda ex: {}))


# ---------------------------------------------------------------- defaults and presets
def test_defaults_are_the_llm_setting():
    cfg = validate(compose(["strategy=classp"])).strategy
    assert (cfg.threshold_mode, cfg.sum_includes_current, cfg.alpha, cfg.update_fraction) == ("quantile", True, 1e-3, 0.1)
    assert (cfg.eps, cfg.power, cfg.reference_code_compat, cfg.follow_trainer_schedule) == (1e-5, 1.0, False, False)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(ClaSPConfig()))  # yaml = dataclass


def test_paper_and_code_presets_compose_with_the_documented_values():
    paper = validate(compose(["strategy=classp_paper", "trainer.max_grad_norm=null"])).strategy
    assert paper.name == "classp"
    assert (paper.threshold_mode, paper.threshold, paper.alpha, paper.eps, paper.power) == ("absolute", 0.5, 0.2, 1e-5, 1.0)
    assert (paper.sum_includes_current, paper.reference_code_compat) == (False, False)
    code = validate(compose(["strategy=classp_code", "trainer.max_grad_norm=null"])).strategy
    assert (code.threshold_mode, code.threshold, code.alpha, code.eps, code.power) == ("absolute", 0.5, 0.2, 1e-5, 1.0)
    assert (code.sum_includes_current, code.reference_code_compat) == (True, True)
    assert build_strategy(validate(compose(["strategy=classp_code", "trainer.max_grad_norm=null"]))).base.config.alpha == 0.2


def test_defaults_train_a_small_model_with_the_default_clipping():
    """strategy=classp as composed, gradients clipped at trainer.max_grad_norm (1.0 by default)
    as the loop does: weights move and the loss falls."""
    cfg = validate(compose(["strategy=classp"]))
    moved, losses, strategy = train_small_model(build_strategy(cfg).base, cfg.trainer.max_grad_norm)
    assert moved > 0.1 * 161  # more weights than one step's 10% of the 161
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every step lowers the loss
    assert losses[-1] < losses[0] - 0.02, losses
    assert strategy.report()["mean_update_fraction"] == pytest.approx(0.1, abs=0.05)
    # What the refusal prevents: the paper's absolute threshold behind the same clipping moves nothing.
    paper = ClaSP(OmegaConf.structured(ClaSPConfig(alpha=0.2, threshold_mode="absolute", sum_includes_current=False)))
    moved, losses, _ = train_small_model(paper, 1.0)
    assert moved == 0 and losses[-1] == losses[0]


def train_small_model(strategy: ClaSP, max_grad_norm: float, steps: int = 40):
    """(weights moved, losses, strategy) after `steps` full-batch steps of a 161-weight MLP on a
    linear regression, gradients clipped as the loop does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = strategy.optimizer(list(model.named_parameters()), None)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        strategy.after_optimizer_step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    return moved, losses, strategy


def test_sum_includes_current_by_hand():
    # p = 1, eps = 1, paper threshold; the current |g| joins the sum before the step.
    # step 1: acc = [1, 0, 2]   -> w = -0.1 * [1/2, 0, -2/3]
    # step 2: acc = [2, 1, 2]   -> w -= 0.1 * [1/3, 1/2, 0]
    # step 3: acc = [4, 1, 3]   -> w -= 0.1 * [-2/5, 0, 1/4]
    w, opt = run(GRADS, lr=0.1, threshold=0.25, eps=1.0, sum_includes_current=True)
    assert w.detach().tolist() == pytest.approx([-0.1 * (1 / 2 + 1 / 3 - 2 / 5), -0.05, -0.1 * (-2 / 3 + 1 / 4)])
    assert acc(opt, w) == pytest.approx([4.0, 1.0, 3.0])  # same accumulator as the paper's rule
    # The paper's first step with eps = 1e-5 is alpha * g / eps; this one stays near alpha.
    first, _ = run([[2.0]], lr=0.1, threshold=0.25, eps=1e-5, sum_includes_current=True)
    paper, _ = run([[2.0]], lr=0.1, threshold=0.25, eps=1e-5)
    assert float(first.detach()) == pytest.approx(-0.1, rel=1e-4) and float(paper.detach()) == pytest.approx(-2e4)


def test_kth_largest_by_radix_select_matches_topk():
    """The sharded quantile threshold (exact, from byte histograms) equals topk's k-th
    value, zeros and repeated values included; several tensors in one call."""
    from cl_runner.ops.selection import kth_largest

    torch.manual_seed(0)
    a = torch.randn(1000).abs()
    a[:50] = 0.0
    b = torch.tensor([0.5, 0.5, 0.25, 3.0, 1e-30, 7.0])
    for k_a, k_b in [(1, 1), (100, 2), (970, 3), (1000, 6)]:
        got = kth_largest([a, b], [k_a, k_b])
        assert got == [a.topk(k_a).values[-1].item(), b.topk(k_b).values[-1].item()]
