"""OPCM's projection and scaling, and TIES' trim/elect/merge, on matrices and vectors small
enough to check by hand (cl_runner/ops/merging.py)."""
from __future__ import annotations

import math

import pytest
import torch

from cl_runner.ops.merging import (disjoint_merge, elect_sign, opcm_lambda, opcm_merge_, opcm_project, split_rank,
                                   ties_merge, ties_merge_dicts, trim, trim_threshold)


@pytest.mark.parametrize("alpha, expected", [(0.0, 0), (0.4, 0), (0.5, 1), (0.8, 1), (0.9, 2), (0.99, 2)])
def test_split_rank_is_the_first_index_whose_cumulative_share_exceeds_alpha(alpha, expected):
    # s = (3, 2, 1): cumulative shares 0.5, 0.833, 1.0
    assert split_rank(torch.tensor([3.0, 2.0, 1.0]), alpha) == expected


def test_split_rank_of_a_zero_update_is_zero():
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_projection_by_hand_on_a_diagonal_merged_update():
    merged = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # U = V = I
    tau = torch.ones(3, 3)
    # alpha 0.9: r = 2, so the top-left 2x2 block goes; zero_diagonal also drops (2, 2).
    projected, info = opcm_project(tau, merged, 0.9, zero_diagonal=True)
    assert torch.allclose(projected, torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 1, 0]]), atol=1e-6)
    assert (info.split_rank, info.rank) == (2, 3)
    assert info.projected_fraction == pytest.approx(5 / 9, abs=1e-6)
    projected, info = opcm_project(tau, merged, 0.9, zero_diagonal=False)  # the released repo's no-op fill
    assert torch.allclose(projected, torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 1, 1]]), atol=1e-6)
    assert info.projected_fraction == pytest.approx(4 / 9, abs=1e-6)
    # alpha 0.5: r = 1, only the diagonal goes.
    projected, _ = opcm_project(tau, merged, 0.5, zero_diagonal=True)
    assert torch.allclose(projected, torch.ones(3, 3) - torch.eye(3), atol=1e-6)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_projection_in_a_rotated_basis_matches_the_masked_coefficients(shape, zero_diagonal):
    m, n = shape
    k = min(m, n)
    u, v = random_orthogonal(m, 1)[:, :k], random_orthogonal(n, 2)[:, :k]
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5][:k], dtype=torch.float64)
    merged = u @ torch.diag(s) @ v.T
    tau = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = 0.8  # cumulative shares (k = 4) .53, .80, .93 / (k = 5) .52, .77, .90: r = 2 either way
    r = split_rank(s, alpha)
    projected, info = opcm_project(tau, merged, alpha, zero_diagonal)
    assert info.split_rank == r == 2
    coeff = u.T @ projected @ v
    # The new part is orthogonal to the earlier principal subspace (and to each u_i v_i^T).
    assert coeff[:r, :r].abs().max() < 1e-10
    if zero_diagonal:
        assert coeff.diagonal().abs().max() < 1e-10
    # Nothing else changed: the removed part lies in the removed span, and P is idempotent.
    expected = u.T @ tau @ v
    mask = torch.ones(k, k, dtype=torch.bool)
    mask[:r, :r] = False
    if zero_diagonal:
        mask.fill_diagonal_(False)
    assert torch.allclose(coeff[mask], expected[mask], atol=1e-10)
    outside = tau - u @ (u.T @ tau @ v) @ v.T  # tau beyond the k x k singular block
    assert torch.allclose(projected - u @ coeff @ v.T, outside, atol=1e-10)
    again, _ = opcm_project(projected, merged, alpha, zero_diagonal)
    assert torch.allclose(again, projected, atol=1e-10)


def test_merged_update_new_part_is_orthogonal_to_the_earlier_principal_subspace_fp32():
    g = torch.Generator().manual_seed(0)
    merged = {"w": torch.randn(16, 8, generator=g)}
    before = merged["w"].clone()
    u, s, vh = torch.linalg.svd(before, full_matrices=False)
    r = split_rank(s, 0.5)
    assert r >= 2
    lam, infos = opcm_merge_(merged, {"w": torch.randn(16, 8, generator=g)}, 1.0, 5.0, ["w"], 0.5)
    new_part = merged["w"] * lam - before  # S - lambda_{t-1} M = P(tau)
    coeff = u[:, :r].T @ new_part @ vh[:r].T
    assert coeff.abs().max() < 1e-5
    assert (u.T @ new_part @ vh.T).diagonal().abs().max() < 1e-5


def test_scaling_by_hand():
    # Task 1: w = [[3, 0], [0, 0]], b = 0 (norm 3) is the merged update with lambda_1 = 1.
    merged = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.zeros(2)}
    # Task 2: w = [[1, 4], [0, 0]], b = [1, 1] (norm sqrt(19)). M's SVD: u_1 = v_1 = e_1, s = (3, 0):
    # r = 0 at alpha 0.5, the diagonal drops tau's 1 at (0, 0): P(w) = [[0, 4], [0, 0]]; b is not projected.
    tau = {"w": torch.tensor([[1.0, 4.0], [0.0, 0.0]]), "b": torch.tensor([1.0, 1.0])}
    mean = (3 + math.sqrt(19)) / 2
    lam, infos = opcm_merge_(merged, tau, 1.0, mean, ["w"], 0.5)
    # S = {w: [[3, 4], [0, 0]], b: [1, 1]}, ||S|| = sqrt(27); lambda_2 = sqrt(27) / mean.
    assert lam == pytest.approx(math.sqrt(27) / mean, rel=1e-6)
    assert torch.allclose(merged["w"], torch.tensor([[3.0, 4.0], [0.0, 0.0]]) / lam, atol=1e-6)
    assert torch.allclose(merged["b"], torch.tensor([1.0, 1.0]) / lam, atol=1e-6)
    # The merged update keeps the mean task vector norm.
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in merged.values()))
    assert norm == pytest.approx(mean, rel=1e-6)
    assert infos["w"].split_rank == 0 and infos["w"].projected_fraction == pytest.approx(1 / 17, rel=1e-5)


def test_lambda_grows_like_sqrt_t_for_orthogonal_equal_norm_updates():
    # t orthogonal unit updates: ||S_t|| = sqrt(t), mean norm 1, so lambda_t = sqrt(t).
    assert opcm_lambda(math.sqrt(4), 1.0) == pytest.approx(2.0)
    assert opcm_lambda(0.0, 1.0) == 1.0


def test_ties_trim_keeps_the_top_entries_as_the_reference_code_counts_them():
    x = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)
    # d = 10, keep 20%: the (10 - 2) = 8th smallest |x| (8) is the threshold, so 8, 9, 10 stay.
    assert trim_threshold(x, 20) == 8.0
    assert torch.equal(trim(x, 8.0) != 0, torch.arange(10) >= 7)
    assert trim_threshold(x, 100) == 0.0
    with pytest.raises(ValueError):
        trim_threshold(x, 0.2)


def test_ties_by_hand():
    rows = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5],
                         [-1.0, 1.0, 2.0, 5.0, -0.1]])
    # keep 40% (d = 5): thresholds 2 and 1 -> [0, -2, 3, -4, 0] and [-1, 1, 2, 5, 0];
    # summed [-1, -1, 5, 1, 0] -> elected signs [-, -, +, +, 0] (majority of signs: 0).
    assert torch.equal(ties_merge(rows, 40, "sum"), torch.tensor([-1.0, -2.0, 5.0, 5.0, 0.0]))
    assert torch.equal(ties_merge(rows, 40, "mean"), torch.tensor([-1.0, -2.0, 2.5, 5.0, 0.0]))
    assert torch.equal(ties_merge(rows, 40, "max"), torch.tensor([-1.0, -2.0, 3.0, 5.0, 0.0]))


def test_ties_zero_sum_entries_take_the_majority_sign():
    rows = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    # summed [0, 5]: entry 0 takes the majority sign (+), so only the +1 survives there.
    assert torch.equal(elect_sign(rows.sum(0), 1.0), torch.tensor([1.0, 1.0]))
    assert torch.equal(ties_merge(rows, 100, "sum"), torch.tensor([1.0, 5.0]))
    assert torch.equal(disjoint_merge(rows, torch.tensor([-1.0, 1.0])), torch.tensor([-1.0, 5.0]))


def test_ties_on_dicts_equals_ties_on_the_concatenated_vector():
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(7, generator=g)}
    b = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(7, generator=g)}
    flat = torch.stack([torch.cat([v["x"].reshape(-1), v["y"]]) for v in (a, b)])
    for func in ("sum", "mean", "max"):
        merged, kept = ties_merge_dicts([a, b], 20, func)
        assert torch.equal(torch.cat([merged["x"].reshape(-1), merged["y"]]), ties_merge(flat, 20, func))
    assert kept == [4 / 19, 4 / 19]  # int(19 * 0.2) + 1 entries of 19
