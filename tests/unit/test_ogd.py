"""OGD: Gram-Schmidt (orthonormal rows, spanning the inputs, dependent and zero vectors
dropped, against earlier blocks), the projection (<g~, u_i> = 0), the strategy on a linear
model worked out by hand, the size guard, option errors, FSDP refusal, state round trip."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.errors import ConfigError
from cl_runner.strategies import check_supported, registry
from cl_runner.strategies.ogd import OGDConfig, OrthogonalGradientDescent, ground_truth_logit
from cl_runner.strategies.parts.orthogonal_basis import extend_basis, project_out
from tests.helpers.linear_model import Linear2, build, ex, grad, set_grad, stream

T = torch.tensor
R2 = 2 ** -0.5


def test_gram_schmidt_by_hand():
    vectors = [T([1.0, 1.0, 0.0]), T([2.0, 2.0, 0.0]), T([1.0, 0.0, 0.0]), T([0.0, 0.0, 0.0]), T([0.0, 0.0, 5.0])]
    B = extend_basis([], vectors, capacity=5, size=3, tol=1e-4)
    # (2,2,0) lies along the first and (0,0,0) is zero: both dropped; (1,0,0) leaves (1/2,-1/2,0).
    assert torch.allclose(B, T([[R2, R2, 0.0], [R2, -R2, 0.0], [0.0, 0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(B @ B.T, torch.eye(3), atol=1e-6)
    for v in vectors:  # every input lies in the span
        assert torch.allclose(B.T @ (B @ v), v, atol=1e-5)


def test_new_block_is_orthogonal_to_earlier_blocks():
    first = extend_basis([], [T([1.0, 1.0, 0.0])], capacity=1, size=3, tol=1e-4)
    second = extend_basis([first], [T([1.0, 0.0, 0.0]), T([3.0, 3.0, 0.0])], capacity=2, size=3, tol=1e-4)
    assert torch.allclose(second, T([[R2, -R2, 0.0]]), atol=1e-6)  # (3,3,0) is in `first`: dropped


def test_capacity_caps_the_accepted_directions():
    B = extend_basis([], [T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0]), T([0.0, 0.0, 1.0])], capacity=2, size=3, tol=1e-4)
    assert B.shape == (2, 3)


def test_projection_is_orthogonal_to_the_basis():
    blocks = [T([[R2, R2, 0.0]]), T([[R2, -R2, 0.0]])]
    out = project_out(T([3.0, 1.0, 2.0]), blocks)
    assert torch.allclose(out, T([0.0, 0.0, 2.0]), atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    B = extend_basis([], list(torch.randn(4, 10, generator=gen)), capacity=4, size=10, tol=1e-4)
    g = project_out(torch.randn(10, generator=gen), [B])
    assert torch.allclose(B @ g, torch.zeros(4), atol=1e-5)


def test_strategy_by_hand():
    model = Linear2()
    # At w = 0 the examples' loss gradients are 2 (0 - y) x: (-2, 0) and (-4, 0), parallel.
    tasks = stream([ex(1, 0, 1), ex(2, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    s = build(OrthogonalGradientDescent, OGDConfig, model, tasks, variant="trace")  # loss gradients
    set_grad(model, 3.0, 4.0)
    s.after_backward()  # no basis yet
    assert grad(model) == [3.0, 4.0]
    s.after_task(0, tasks[0])
    assert torch.allclose(s.blocks[0], T([[-1.0, 0.0]]))  # one direction; the parallel one dropped
    s.after_backward()
    assert grad(model) == pytest.approx([0.0, 4.0])
    s.after_task(1, tasks[1])  # (0, -2): the basis is now the whole plane
    set_grad(model, 3.0, 4.0)
    s.after_backward()
    assert grad(model) == pytest.approx([0.0, 0.0])
    s.after_task(2, tasks[2])  # the last task adds nothing
    assert s.report() == {"variant": "trace", "basis_directions": [1, 1], "projected_steps": 2}

    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = build(OrthogonalGradientDescent, OGDConfig, Linear2(), tasks, variant="trace")
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(t.blocks, s.blocks)) and t.projected_steps == 2


def test_a_basis_over_the_limit_is_refused_with_its_size():
    tasks = stream([ex(1, 0, 1)], [ex(0, 1, 1)], [ex(1, 1, 0)])
    # 2 parameters x 4 bytes x 150 directions x 2 past tasks = 2400 bytes
    with pytest.raises(ConfigError, match=r"2\.3 KiB.*strategy.max_basis_gb"):
        build(OrthogonalGradientDescent, OGDConfig, Linear2(), tasks, max_basis_gb=1e-6)


@pytest.mark.parametrize("key,value", [("variant", "gtl"), ("max_memories", 0), ("max_basis_gb", 0), ("residual_tol", 1.5)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"strategy.{key}"):
        OrthogonalGradientDescent(OGDConfig(**{key: value}))


@pytest.mark.parametrize("name", ["gem", "agem", "ogd"])
def test_fsdp_is_refused_in_one_line(name):
    cfg = OmegaConf.create({"model": {"adapter": "none", "kind": "causal"}, "trainer": {"sharding": "fsdp"}})
    with pytest.raises(ValueError, match=f"strategy={name} cannot run with trainer.sharding=fsdp"):
        check_supported(registry.get(name), cfg)


class FixedLogits(torch.nn.Module):
    """Returns the given logits whatever the input (vocabulary of 3)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, **batch):
        return SimpleNamespace(logits=self.logits)


def test_ground_truth_logit_by_hand():
    logits = T([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]])  # one sequence of 3 positions
    labels = T([[-100, 2, 0]])  # answer tokens at positions 1 and 2
    # causal: position i predicts label i+1 -> logits[0][2] + logits[1][0] = 2 + 3
    assert float(ground_truth_logit(FixedLogits(logits), {"labels": labels}, "causal")) == 5.0
    # seq2seq: position j predicts label j -> logits[1][2] + logits[2][0] = 5 + 6
    assert float(ground_truth_logit(FixedLogits(logits), {"labels": labels}, "seq2seq")) == 11.0
    # classifier: the true class's logit per example, summed -> 1 + 3
    batch = {"labels": T([1, 0]), "label_mask": torch.ones(2, 3, dtype=torch.bool)}
    assert float(ground_truth_logit(FixedLogits(T([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])), batch, "classifier")) == 4.0
