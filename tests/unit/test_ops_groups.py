"""ProjectionGroups: stacked buffers equal the per-matrix formula; the weight-update
anchors keep every task's update out of the preserved subspace."""
from __future__ import annotations

import pytest
import torch

from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner import ops
from cl_runner.ops import reference

BACKENDS = ops.available_backends("cpu")
# Same shapes with different k (padding), square k > r/2 (complement), tall/wide, k=0.
LAYOUT = [((64, 64), 48), ((64, 64), 10), ((64, 64), 0), ((64, 64), 63),
          ((172, 64), 16), ((172, 64), 40), ((64, 172), 40), ((64, 172), 8)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.w", torch.nn.Parameter(torch.randn(*shape, generator=g) / 8))
            for i, (shape, _) in enumerate(LAYOUT)]


def make_groups(named, mode, backend=None, **kwargs):
    bases = ops.top_k_bases([p.detach() for _, p in named], [k for _, k in LAYOUT])
    groups = ProjectionGroups(named, mode, backend=backend, **kwargs)
    groups.set_bases({name: b for (name, _), b in zip(named, bases)})
    return groups, bases


def amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def loss_of(named, x):
    return sum(((torch.tanh(p) ** 2) * x[: p.shape[0], : p.shape[1]]).sum() for _, p in named)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("use_complement", ["auto", "never"])
def test_groups_match_per_matrix_reference(backend, mode, use_complement):
    named = make_params()
    groups, bases = make_groups(named, mode, backend, use_complement=use_complement)
    kinds = {(b["left"], b["right"]) for b in groups.layout()}
    if use_complement == "auto":
        assert ("complement", "complement") in kinds
    groups.attach_grads()
    loss_of(named, torch.randn(172, 172)).backward()
    raw = [p.grad.clone() for _, p in named]
    groups.project_grads_()
    for (name, p), g, (u, v) in zip(named, raw, bases):
        want = reference.project_one(g, u, v, mode)
        assert (p.grad.double() - want).abs().max() < 1e-5 * g.abs().max(), name


def test_grad_views_survive_zero_grad_and_backward_accumulates_in_place():
    named = make_params()
    groups, _ = make_groups(named, "two_sided")
    groups.attach_grads()
    ptrs = [p.grad.data_ptr() for _, p in named]
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    x = torch.randn(172, 172)
    for _ in range(2):  # gradient accumulation: two backwards into the same views
        loss_of(named, x).backward()
    assert [p.grad.data_ptr() for _, p in named] == ptrs
    opt.zero_grad(set_to_none=False)
    assert [p.grad.data_ptr() for _, p in named] == ptrs
    assert all(p.grad.abs().max() == 0 for _, p in named)
    opt.zero_grad(set_to_none=True)
    groups.attach_grads()  # the documented step before backward
    loss_of(named, x).backward()
    assert [p.grad.data_ptr() for _, p in named] == ptrs


def test_replaced_or_missing_grads_are_still_projected_correctly():
    named = make_params()
    groups, bases = make_groups(named, "two_sided")
    groups.attach_grads()
    loss_of(named, torch.randn(172, 172)).backward()
    name0, p0 = named[0]
    p0.grad = torch.randn_like(p0)  # e.g. DDP replaced the view
    raw0 = p0.grad.clone()
    named[1][1].grad = None  # a parameter that got no gradient this step
    groups.project_grads_()
    want = reference.project_one(raw0, *bases[0], "two_sided")
    assert (p0.grad.double() - want).abs().max() < 1e-5 * raw0.abs().max()
    assert named[1][1].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.MODES)
def test_adamw_task_update_stays_outside_preserved_subspace(backend, mode):
    torch.manual_seed(0)
    named = make_params(1)
    groups, bases = make_groups(named, mode, backend)
    groups.snapshot_weights()
    start = [p.detach().clone() for _, p in named]
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        groups.attach_grads()
        loss_of(named, torch.randn(172, 172)).backward()
        groups.project_grads_()
        opt.step()
        groups.project_weight_update_()
    for (name, p), w0, (u, v), (_, k) in zip(named, start, bases, LAYOUT):
        delta = (p.detach() - w0).double()
        u, v = u.double(), v.double()
        assert delta.abs().max() > 1e-3, name  # it trained
        scale = w0.abs().max()
        assert amax(u.T @ delta @ v) < 1e-5 * scale, name
        if mode == "two_sided":
            assert amax(u.T @ delta) < 1e-5 * scale, name
            assert amax(delta @ v) < 1e-5 * scale, name


def test_snapshot_before_every_step_equals_snapshot_per_task():
    results = []
    for per_step in (False, True):
        named = make_params(2)
        groups, _ = make_groups(named, "two_sided")
        groups.snapshot_weights()
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1)
        torch.manual_seed(3)
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            groups.attach_grads()
            loss_of(named, torch.randn(172, 172)).backward()
            groups.project_grads_()
            if per_step:
                groups.snapshot_weights()
            opt.step()
            groups.project_weight_update_()
        results.append([p.detach().clone() for _, p in named])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-5


def test_state_dict_round_trip_and_nbytes():
    named = make_params()
    groups, _ = make_groups(named, "high_block")
    groups.snapshot_weights()
    state = groups.state_dict()
    other = ProjectionGroups(named, "high_block")
    other.load_state_dict(state)
    assert other.layout() == groups.layout()
    assert other.ranks() == groups.ranks()
    assert other.nbytes() == groups.nbytes() > 0
    for a, b in zip(state["buckets"], other.state_dict()["buckets"]):
        for key in ("left", "right"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert torch.equal(a[key], b[key])
        assert a["anchors"].keys() == b["anchors"].keys()
    with pytest.raises(ValueError, match="mode='two_sided'"):
        ProjectionGroups(named, "two_sided").load_state_dict(state)


def test_set_bases_errors():
    named = make_params()
    groups = ProjectionGroups(named)
    with pytest.raises(KeyError, match="not in this ProjectionGroups"):
        groups.set_bases({"nope": (None, None)})
    with pytest.raises(ValueError, match=r"expected \(64, k\)"):
        groups.set_bases({"layer0.w": (torch.zeros(32, 2), None)})
    with pytest.raises(ValueError, match="not orthonormal"):
        groups.set_bases({"layer0.w": (torch.ones(64, 2), None)})
    with pytest.raises(RuntimeError, match="snapshot_weights"):
        groups.set_bases({"layer0.w": (torch.eye(64)[:, :3], None)})
        groups.project_weight_update_()
