"""top_k_bases: exact and randomized preserved subspaces."""
from __future__ import annotations

import pytest
import torch

from cl_runner import ops


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_plus_noise(m: int, n: int, rank: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    return a / a.norm() + noise * torch.randn(m, n, generator=g) / (m * n) ** 0.5


def test_exact_bases_are_the_top_singular_vectors():
    weights = [torch.randn(40, 24), torch.randn(40, 24), torch.randn(24, 40)]
    bases = ops.top_k_bases(weights, [5, 24, 0])
    for w, (u, v), k in zip(weights, bases, [5, 24, 0]):
        assert u.shape == (w.shape[0], k) and v.shape == (w.shape[1], k)
        assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5)
        ref_u, s, ref_vh = torch.linalg.svd(w.double())
        # same subspace: projectors agree
        assert torch.allclose(u.double() @ u.double().T,
                              ref_u[:, :k] @ ref_u[:, :k].T, atol=1e-4)
        assert torch.allclose(v.double() @ v.double().T,
                              ref_vh[:k].T @ ref_vh[:k], atol=1e-4)


def test_keep_complement_spans_the_rest():
    w = torch.randn(30, 20)
    (u, v, u_c, v_c), = ops.top_k_bases([w], [15], keep_complement=True)
    assert u_c.shape == (30, 15) and v_c.shape == (20, 5)
    full_u = torch.cat([u, u_c], 1)
    assert torch.allclose(full_u.T @ full_u, torch.eye(30), atol=1e-5)
    (_, _, u_c, v_c), = ops.top_k_bases([w], [15], keep_complement="auto")
    assert u_c is None and v_c.shape == (20, 5)  # 15 > 20/2 on the right only


@pytest.mark.parametrize("shape", [(120, 120), (200, 80)])
def test_randomized_error_small_on_low_rank_plus_noise(shape):
    m, n = shape
    weights = [low_rank_plus_noise(m, n, 8, 1e-3, s) for s in range(3)]
    exact, exact_stats = ops.top_k_bases(weights, [8] * 3, return_stats=True)
    approx, stats = ops.top_k_bases(weights, [8] * 3, method="randomized", oversample=8,
                                    power_iters=2, return_stats=True)
    assert stats.method == "randomized" and all(stats.randomized)
    for (u, v), (ue, ve), fro, fro_exact, sub in zip(
            approx, exact, stats.residual_fro, exact_stats.residual_fro,
            stats.spectral_suboptimality):
        assert fro < 1.05 * fro_exact + 1e-6  # near the optimal rank-k residual
        assert fro < 2e-3
        assert sub < 1.5
        # the captured subspace is the exact one (angles small)
        assert (u.T @ ue).svd().S.min() > 0.999
        assert (v.T @ ve).svd().S.min() > 0.999


def test_randomized_falls_back_to_exact_when_k_is_large():
    w = torch.randn(30, 20)
    ((u, v),), stats = ops.top_k_bases([w], [18], method="randomized", return_stats=True)
    (ue, _), = ops.top_k_bases([w], [18])
    assert stats.randomized == [False]
    assert torch.allclose(u @ u.T, ue @ ue.T, atol=1e-4)


def test_top_k_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"ks\[0\]=9 .* \[0, 8\]"):
        ops.top_k_bases([torch.randn(8, 10)], [9])
    with pytest.raises(ValueError, match="method='lanczos'"):
        ops.top_k_bases([torch.randn(8, 10)], [2], method="lanczos")
    with pytest.raises(ValueError, match="2 weights and 1 ks"):
        ops.top_k_bases([torch.randn(8, 10)] * 2, [2])


def test_bf16_weights_give_bf16_bases_from_fp32_math():
    w = torch.randn(32, 16).bfloat16()
    (u, v), = ops.top_k_bases([w], [4])
    assert u.dtype == torch.bfloat16
    (u32, _), = ops.top_k_bases([w], [4], out_dtype=torch.float32)
    assert u32.dtype == torch.float32
    assert torch.allclose(u32.T @ u32, torch.eye(4), atol=1e-5)
