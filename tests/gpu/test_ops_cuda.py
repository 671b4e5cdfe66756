"""cl_runner.ops on CUDA tensors, what only CUDA has: the fused stacked kernel on padded,
non-contiguous stacks, ProjectionGroups' invariant, the randomized SVD. The formula and
opcheck tests run on every device from tests/unit/test_ops.py (their cuda cases marked gpu).
Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner import ops
from cl_runner.ops import _backends, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


def backends():
    return ops.available_backends(DEVICE) if torch.cuda.is_available() else []


def orthonormal(dim, k, seed):
    g = torch.Generator().manual_seed(seed)
    if k == 0:
        return torch.zeros(dim, 0, device=DEVICE)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return q.float().to(DEVICE)


def test_cuda_backend_is_available_when_built_with_cuda():
    if not ops.extension_status().endswith("(with CUDA kernels)"):
        pytest.skip(ops.extension_status())
    assert ops.available_backends(DEVICE)[0] == "cuda"


@pytest.mark.parametrize("mode", ops.MODES)
def test_fused_stacked_op_on_padded_stacks_and_non_contiguous(mode):
    if "cuda" not in backends():
        pytest.skip("cuda backend not built")
    b, m, n = 5, 96, 64
    g = torch.randn(b, n, m, device=DEVICE).transpose(1, 2)  # non-contiguous
    left = torch.zeros(b, m, 20, device=DEVICE)
    right = torch.zeros(b, n, 12, device=DEVICE)
    ks = [(0, 3), (20, 0), (5, 12), (20, 12), (1, 1)]
    for i, (kl, kr) in enumerate(ks):
        left[i, :, :kl] = orthonormal(m, kl, i)
        right[i, :, :kr] = orthonormal(n, kr, i + 9)
    out = g.clone()
    _backends.stacked_impl("cuda")(out, left, right, False, False, mode)
    for i in range(b):
        want = reference.project_one(g[i], left[i], right[i], mode)
        assert (out[i].double() - want).abs().max() < 1e-4 * g.abs().max()


@pytest.mark.parametrize("mode", ops.MODES)
def test_groups_on_cuda_match_reference_and_keep_invariant(mode):
    torch.manual_seed(0)
    shapes = [((256, 256), 16), ((256, 256), 200), ((512, 256), 24), ((256, 512), 30)]
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(*s, device=DEVICE) / 16))
             for i, (s, _) in enumerate(shapes)]
    bases = ops.top_k_bases([p.detach() for _, p in named], [k for _, k in shapes])
    for backend in backends():
        groups = ProjectionGroups(named, mode, backend=backend)
        groups.set_bases({n: b for (n, _), b in zip(named, bases)})
        groups.snapshot_weights()
        start = [p.detach().clone() for _, p in named]
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            groups.attach_grads()
            sum((p.tanh() ** 2).sum() for _, p in named).backward()
            raw = [p.grad.clone() for _, p in named]
            groups.project_grads_()
            for (_, p), r, (u, v) in zip(named, raw, bases):
                want = reference.project_one(r, u, v, mode)
                assert (p.grad.double() - want).abs().max() < 1e-4 * r.abs().max()
            opt.step()
            groups.project_weight_update_()
        for (_, p), w0, (u, v) in zip(named, start, bases):
            d = (p.detach() - w0).double()
            assert (u.double().T @ d @ v.double()).abs().max() < 1e-5 * w0.abs().max()
            with torch.no_grad():
                p.copy_(w0)


def test_top_k_bases_on_cuda_randomized():
    w = torch.randn(512, 8, device=DEVICE) @ torch.randn(8, 384, device=DEVICE)
    w = w + 1e-3 * torch.randn_like(w)
    (u, v), stats = ops.top_k_bases([w], [8], method="randomized", return_stats=True)
    assert u.device.type == "cuda" and stats.residual_fro[0] < 1e-2
