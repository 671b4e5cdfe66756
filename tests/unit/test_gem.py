"""GEM: the dual QP on hand gradients (no binding constraint, one = A-GEM's projection,
two = the closest feasible vector), the margin, TRACE's QP form, the strategy on a linear
model worked out by hand (paper: memory gradients; trace: per-tensor, stored last-step
gradients), option errors and the state round trip."""
from __future__ import annotations

import io

import numpy as np
import pytest
import quadprog
import torch

from cl_runner.strategies.gem import GEMConfig, GradientEpisodicMemory
from cl_runner.strategies.parts.flat_gradients import GradientLayout, loss_gradient
from cl_runner.strategies.parts.gradient_constraints import agem_projection, gem_multipliers, gem_projection
from tests.helpers.linear_model import Linear2, build, ex, grad, set_grad, stream

T = torch.tensor


def close(a: torch.Tensor, b) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-6)


# -- the QP ------------------------------------------------------------------------------
def test_no_violated_constraint_leaves_g_unchanged():
    g = T([1.0, 2.0, -1.0])
    G = T([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # <g, g_k> = 1, 1
    out, projected = gem_projection(g, G, margin=0.5, eps=1e-3)
    assert not projected and out is g


def test_one_violated_constraint_is_agem_projection_by_hand():
    # g = (-1, 1), g_1 = (1, 0): the closest vector with <x, g_1> >= 0 is (0, 1).
    out, projected = gem_projection(T([-1.0, 1.0]), T([[1.0, 0.0]]), margin=0.0, eps=0.0)
    assert projected and close(out, [0.0, 1.0])


def test_one_constraint_equals_agem_on_random_vectors():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g, m = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
        m = m if torch.dot(g, m) < 0 else -m
        gem, _ = gem_projection(g, m.unsqueeze(0), margin=0.0, eps=0.0)
        agem, _ = agem_projection(g, m)
        assert torch.allclose(gem, agem, atol=1e-10)
        assert abs(float(torch.dot(gem, m))) < 1e-10


def test_two_constraints_in_a_cone_by_hand():
    # Constraints x1 + x2 >= 0 and x1 - x2 >= 0 (the cone |x2| <= x1); g = (-1, 0) lies
    # opposite it, so the closest feasible vector is its apex 0, with v = (1/2, 1/2).
    G = T([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    v = gem_multipliers((G @ G.T).numpy(), (G @ T([-1.0, 0.0], dtype=torch.float64)).numpy(), margin=0.0, eps=0.0)
    assert np.allclose(v, [0.5, 0.5])
    out, _ = gem_projection(T([-1.0, 0.0], dtype=torch.float64), G, margin=0.0, eps=0.0)
    assert close(out, [0.0, 0.0])


def test_two_constraints_one_binding_by_hand():
    # x1 >= 0 and x2 >= 0; g = (-1, 2, 3) breaks only the first: closest is (0, 2, 3).
    G = T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    out, _ = gem_projection(T([-1.0, 2.0, 3.0], dtype=torch.float64), G, margin=0.0, eps=0.0)
    assert close(out, [0.0, 2.0, 3.0])


def test_three_constraints_give_the_closest_feasible_vector():
    """Against the primal solved on its own (min 1/2 |x - g|^2 s.t. G x >= 0) and KKT."""
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    g = -G.sum(0) + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)  # conflicts with all three
    out, projected = gem_projection(g, G, margin=0.0, eps=0.0)
    assert projected
    assert bool((G @ out >= -1e-9).all())
    primal = quadprog.solve_qp(np.eye(8), g.numpy(), G.T.numpy(), np.zeros(3))[0]
    assert np.allclose(out.numpy(), primal, atol=1e-8)


def test_margin_is_a_lower_bound_on_the_dual_variables():
    # g = (0.5, 1), g_1 = (-2, 0): v* = 1/4 without margin; margin 0.5 forces v = 0.5,
    # g~ = g + 0.5 g_1 = (-0.5, 1), past the boundary toward task 1.
    g, G = T([0.5, 1.0]), T([[-2.0, 0.0]])
    assert close(gem_projection(g, G, margin=0.0, eps=0.0)[0], [0.0, 1.0])
    assert close(gem_projection(g, G, margin=0.5, eps=0.0)[0], [-0.5, 1.0])


def test_trace_code_form_solves_tracess_qpth_problem():
    # TRACE: min 1/2 v^T (P + eps) v - (G g)^T v  s.t. v <= margin. g = (-1, 1), g_1 = (1, 0):
    # v = (G g) / (P + eps) = -1 / 1.001, g~ = g + v g_1: the conflict nearly doubles
    # (qpth's QPFunction on the same call gives v = -0.9990).
    out, projected = gem_projection(T([-1.0, 1.0]), T([[1.0, 0.0]]), margin=0.5, eps=1e-3, form="trace_code")
    assert projected and close(out, [-1.0 - 1.0 / 1.001, 1.0])
    # Bound active: G g = 3 > margin * P: v = 0.5 (only reached when another row conflicts).
    v = gem_multipliers(np.array([[1.0]]), np.array([3.0]), margin=0.5, eps=0.0, form="trace_code")
    assert np.allclose(v, [0.5])


# -- the strategy --------------------------------------------------------------------------
def test_loss_gradient_leaves_grad_and_mode_alone():
    model = Linear2()
    s = build(GradientEpisodicMemory, GEMConfig, model, stream([ex(1, 0, 1)], [ex(0, 1, 1)]))
    set_grad(model, 5.0, 6.0)
    model.train()
    # loss (w.x - y)^2 at w = 0: gradient 2 (0 - 1) x; mean over the two examples.
    g = loss_gradient(s.ctx, GradientLayout(model), [ex(1, 0, 1), ex(0, 1, 1)], chunk_size=1)
    assert close(g, [-1.0, -1.0])
    assert grad(model) == [5.0, 6.0] and model.training


def test_paper_variant_projects_against_each_memory_by_hand():
    model = Linear2()
    tasks = stream([ex(1, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    s = build(GradientEpisodicMemory, GEMConfig, model, tasks, margin=0.0, eps=0.0)
    set_grad(model, 1.0, 1.0)
    s.after_backward()  # task 0: no memory yet
    assert grad(model) == [1.0, 1.0]
    s.after_task(0, tasks[0])  # memory of task 0: gradient (-2, 0)
    set_grad(model, 1.0, 1.0)
    s.after_backward()  # <g, g_0> = -2: g~ = g - (-2 / 4)(-2, 0) = (0, 1)
    assert grad(model) == pytest.approx([0.0, 1.0])
    set_grad(model, -1.0, 1.0)
    s.after_backward()  # <g, g_0> = 2: unchanged
    assert grad(model) == [-1.0, 1.0]
    s.after_task(1, tasks[1])  # memory of task 1: gradient (0, -2)
    set_grad(model, 1.0, 1.0)
    s.after_backward()  # both violated, orthogonal: g~ = 0
    assert grad(model) == pytest.approx([0.0, 0.0], abs=1e-7)
    assert s.report()["projected_steps"] == 2 and s.report()["constrained_steps"] == 3
    s.after_task(2, tasks[2])  # the last task keeps nothing
    assert s.memory.tasks() == [0, 1]


def test_trace_variant_stores_the_last_step_and_projects_per_tensor():
    model = Linear2()
    tasks = stream([ex(1, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    s = build(GradientEpisodicMemory, GEMConfig, model, tasks, variant="trace", qp="gem", margin=0.0, eps=0.0)
    set_grad(model, 3.0, 3.0)
    s.after_backward()
    set_grad(model, 1.0, 1.0)  # task 0's last step
    s.after_backward()
    s.after_task(0, tasks[0])
    assert close(s.past_gradients, [[1.0, 1.0]])
    # g = (-1, 2): <g, g_0> = 1 over the whole model, but the w1 slice conflicts (-1 * 1):
    # TRACE's per-tensor QP zeroes it; w2 (2 * 1 > 0) stays.
    set_grad(model, -1.0, 2.0)
    s.after_backward()
    assert grad(model) == pytest.approx([0.0, 2.0])


def test_trace_variant_default_qp_is_tracess():
    model = Linear2()
    tasks = stream([ex(1, 0, 1)], [ex(0, 1, 1)])
    s = build(GradientEpisodicMemory, GEMConfig, model, tasks, variant="trace", eps=0.0)
    assert s.qp == "trace_code"
    set_grad(model, 1.0, 1.0)
    s.after_backward()
    s.after_task(0, tasks[0])
    set_grad(model, -1.0, 2.0)
    s.after_backward()  # w1: min 1/2 v^2 + v s.t. v <= 0.5 -> v = -1, g~_1 = -1 - 1 = -2
    assert grad(model) == pytest.approx([-2.0, 2.0])


@pytest.mark.parametrize("key,value", [("variant", "both"), ("qp", "cvx"), ("memory_per_task", 0),
                                       ("memory_batch_size", 0), ("margin", -0.1), ("eps", -1.0)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        GradientEpisodicMemory(GEMConfig(**{key: value}))


def test_state_round_trip_through_a_checkpoint_load():
    model = Linear2()
    tasks = stream([ex(1, 0, 1), ex(2, 0, 1), ex(3, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    s = build(GradientEpisodicMemory, GEMConfig, model, tasks, memory_per_task=2, memory_batch_size=1)
    s.after_task(0, tasks[0])
    set_grad(model, 1.0, 1.0)
    s.after_backward()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # as cl-run loads checkpoints
    t = build(GradientEpisodicMemory, GEMConfig, Linear2(), tasks, memory_per_task=2, memory_batch_size=1)
    t.load_state_dict(state)
    assert t.memory.examples == s.memory.examples and len(t.memory.of(0)) == 2
    assert t.draws == s.draws == 1 and t.memory_batch(0) == s.memory_batch(0)

    trace = build(GradientEpisodicMemory, GEMConfig, model, tasks, variant="trace")
    set_grad(model, 1.0, 2.0)
    trace.after_backward()
    trace.after_task(0, tasks[0])
    u = build(GradientEpisodicMemory, GEMConfig, Linear2(), tasks, variant="trace")
    u.load_state_dict(trace.state_dict())
    assert torch.equal(u.past_gradients, trace.past_gradients) and u.past_tasks == [0]
