"""A-GEM: the projection on hand vectors, the strategy on a linear model worked out by
hand (a memory batch from all past tasks), seeded draws, option errors, state round trip."""
from __future__ import annotations

import io

import pytest
import torch

from cl_runner.strategies.agem import AGEMConfig, AveragedGEM
from cl_runner.strategies.parts.gradient_constraints import agem_projection
from tests.helpers.linear_model import Linear2, build, ex, grad, set_grad, stream

T = torch.tensor


def test_projection_by_hand():
    # g = (1, -2), g_ref = (0, 1): g.g_ref = -2, |g_ref|^2 = 1 -> g~ = (1, -2) + 2 (0, 1) = (1, 0)
    out, projected = agem_projection(T([1.0, -2.0]), T([0.0, 1.0]))
    assert projected and torch.equal(out, T([1.0, 0.0]))
    # g = (3, 4), g_ref = (1, -1) * 2: g.g_ref = -2, |g_ref|^2 = 8 -> g~ = g + (2, -2) / 4 = (3.5, 3.5)
    out, _ = agem_projection(T([3.0, 4.0]), T([2.0, -2.0]))
    assert torch.allclose(out, T([3.5, 3.5])) and float(torch.dot(out, T([2.0, -2.0]))) == 0.0


def test_no_conflict_or_zero_reference_leaves_g():
    g = T([1.0, 1.0])
    assert agem_projection(g, T([1.0, 0.0])) == (g, False)
    assert agem_projection(g, T([0.0, 0.0])) == (g, False)


def test_strategy_projects_off_the_memory_batch_gradient_by_hand():
    model = Linear2()
    tasks = stream([ex(1, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    s = build(AveragedGEM, AGEMConfig, model, tasks, ref_batch_size=4)
    set_grad(model, 1.0, 1.0)
    s.after_backward()  # no memory yet
    assert grad(model) == [1.0, 1.0] and s.draws == 0
    s.after_task(0, tasks[0])
    s.after_task(1, tasks[1])
    # g_ref: mean over the memory {x=(1,0), y=1; x=(0,1), y=1} at w = 0: (-1, -1).
    # g = (2, -1): g.g_ref = -1, |g_ref|^2 = 2 -> g~ = (2, -1) - 0.5 (-1, -1) = (1.5, -1.5)
    set_grad(model, 2.0, -1.0)
    s.after_backward()
    assert grad(model) == pytest.approx([1.5, -1.5])
    set_grad(model, -1.0, 0.5)  # g.g_ref = 0.5: unchanged
    s.after_backward()
    assert grad(model) == [-1.0, 0.5]
    assert s.report() == {"constrained_steps": 2, "projected_steps": 1, "memory_examples": {0: 1, 1: 1}}


def test_draws_are_seeded_by_their_count():
    model = Linear2()
    train = [ex(i, 0, 1) for i in range(1, 9)]
    tasks = stream(train, [ex(0, 1, 1)])
    s = build(AveragedGEM, AGEMConfig, model, tasks, memory_per_task=5, ref_batch_size=2)
    s.after_task(0, tasks[0])
    assert len(s.memory.of(0)) == 5
    seen = []
    for _ in range(3):
        set_grad(model, 1.0, 1.0)
        s.after_backward()
        seen.append(s.draws)
    assert seen == [1, 2, 3]
    # A strategy restored from the state continues with draw 3, as the original would.
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = build(AveragedGEM, AGEMConfig, Linear2(), tasks, memory_per_task=5, ref_batch_size=2)
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert t.memory.examples == s.memory.examples and t.draws == 3
    assert t.checked_steps == s.checked_steps and t.projected_steps == s.projected_steps


@pytest.mark.parametrize("key,value", [("memory_per_task", 0), ("ref_batch_size", -1)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        AveragedGEM(AGEMConfig(**{key: value}))
