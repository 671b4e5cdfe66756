"""GPM (Saha et al. 2021) on cases a person can check: the basis size at a given energy,
the criterion with a stored basis, orthonormality, the padding mask of the activation
pass, the memory bound, and the guarantee that training a later task leaves W x unchanged
for x in span(M), on an nn.Linear and on a transposed (GPT-2 Conv1D) weight."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch import nn

from cl_runner.strategies.gpm import GPMConfig, GradientProjectionMemory
from cl_runner.strategies.gpm.activations import input_grams
from cl_runner.strategies.gpm.basis import energy_rank, extend_basis, threshold_at
from cl_runner.strategies.gpm.memory import projection_bytes, worst_target_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

# R with singular values 3, 2, 1 along e1, e2, e3 of R^4: energies 9, 4, 1 of ||R||^2 = 14.
R = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 0, 0]], dtype=torch.float64)
GRAM = R @ R.T
E = torch.eye(4, dtype=torch.float64)


@pytest.mark.parametrize("eps, paper, authors", [(0.9, 2, 1), (0.6, 1, 0), (13 / 14, 2, 1), (1.0, 3, 2),
                                                 (0.5, 1, 0)])
def test_energy_rank_is_the_fewest_directions_reaching_eps(eps, paper, authors):
    energies = torch.tensor([9.0, 4.0, 1.0])
    # eps 0.9: 9/14 = 0.64 < 0.9 <= 13/14 = 0.93 -> 2 (Eq. 5); the authors' first-task count is one fewer.
    assert energy_rank(energies, 14.0, 0.0, eps) == paper
    assert energy_rank(energies, 14.0, 0.0, eps, "authors") == authors


def test_energy_rank_counts_what_the_stored_basis_already_keeps():
    # M keeps 4 of 14; residual energies 9, 1: eps 0.9 needs 12.6 -> 4 + 9 = 13 -> one more direction.
    assert energy_rank(torch.tensor([9.0, 1.0]), 14.0, 4.0, 0.9) == 1
    assert energy_rank(torch.tensor([9.0, 1.0]), 14.0, 4.0, 0.95) == 2  # 13 < 13.3
    assert energy_rank(torch.tensor([9.0, 1.0]), 14.0, 13.0, 0.9) == 0  # already enough
    # Later tasks: the authors' loop is Eq. 9 too.
    assert energy_rank(torch.tensor([9.0, 1.0]), 14.0, 4.0, 0.9, "authors") == 1


def test_first_basis_spans_the_top_directions():
    update = extend_basis(GRAM, None, 0.9)
    assert update.added == 2 and update.basis.shape == (4, 2)
    projector = update.basis @ update.basis.T
    assert torch.allclose(projector, torch.diag(torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)), atol=1e-12)
    assert update.energy_before == 0.0 and update.energy_after == pytest.approx(13 / 14)


def test_extension_with_a_stored_basis_adds_only_new_directions():
    stored = E[:, 1:2]  # e2 already kept: 4/14 of the energy
    update = extend_basis(GRAM, stored, 0.9)
    assert update.added == 1 and update.energy_before == pytest.approx(4 / 14)
    assert torch.equal(update.basis[:, :1], stored)  # old directions first, unchanged
    assert torch.allclose(update.basis[:, 1].abs(), E[:, 0], atol=1e-12)  # then e1 (energy 9)
    assert update.energy_after == pytest.approx(13 / 14)
    both = extend_basis(GRAM, stored, 0.95)  # 13/14 < 0.95: e3 too
    assert both.added == 2 and both.energy_after == pytest.approx(1.0)
    assert extend_basis(GRAM, E[:, :2], 0.9).added == 0  # 13/14 >= 0.9 already


def test_bases_stay_orthonormal_and_never_exceed_the_input_width():
    gen = torch.Generator().manual_seed(0)
    basis = None
    for task in range(6):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 40, generator=gen,
                                                                               dtype=torch.float64)
        old = basis
        basis = extend_basis(x @ x.T, basis, threshold_at(task, 0.97, 0.003)).basis
        assert basis.shape[1] <= 8
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10)
        if old is not None:
            assert torch.equal(basis[:, :old.shape[1]], old)
    assert threshold_at(0, 0.97, 0.003) == 0.97 and threshold_at(2, 0.97, 0.003) == pytest.approx(0.976)
    assert threshold_at(100, 0.97, 0.003) == 1.0


def test_activation_pass_leaves_padding_positions_out():
    layer = nn.Linear(3, 2)
    x = torch.tensor([[[1.0, 0, 0], [0, 2.0, 0]], [[0, 0, 3.0], [9.0, 9.0, 9.0]]])  # the 9s are padding
    batch = {"x": x, "attention_mask": torch.tensor([[1, 1], [1, 0]])}
    (gram,), (columns,) = input_grams(layer, [layer], [3], [batch], lambda m, b: m(b["x"]), contextlib.nullcontext)
    assert columns == 3 and torch.equal(gram, torch.diag(torch.tensor([1.0, 4.0, 9.0])))


def test_memory_bound_by_hand():
    # in 4, out 2: k=2 -> basis 4*2 + anchor W M 2*2 (fp32); k=3 -> complement 4*1 + dense anchor 2*4.
    assert projection_bytes(4, 2, 2, True) == (8 + 4) * 4 and projection_bytes(4, 2, 3, True) == (4 + 8) * 4
    assert projection_bytes(4, 2, 2, False) == 8 * 4
    # Plus the stored M (4 x k): k=2: 32 + 48; k=3: 48 + 48; k=4: 64 + 32 (complement empty).
    assert worst_target_bytes(4, 2, True) == 96


@pytest.mark.parametrize("key, value, text", [("threshold", 0.0, r"\(0, 1\]"), ("threshold", 1.5, r"\(0, 1\]"),
                                              ("threshold_step", -0.1, ">= 0"), ("num_samples", 0, "at least 1"),
                                              ("activation_batch_size", 0, "at least 1"),
                                              ("variant", "trace", "paper, authors")])
def test_bad_options_are_refused_by_name(key, value, text):
    with pytest.raises(ValueError, match=rf"'strategy.{key}'.*{text}"):
        GradientProjectionMemory(GPMConfig(**{key: value}))


# ------------------------------------------------------------------ the guarantee, end to end
class Toy(nn.Module):
    """y = fc(x) + proj(x): one nn.Linear (W: out x in) and one Conv1D (W stored in x out)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = nn.Linear(6, 4)
        self.proj = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs

    def forward(self, inputs, attention_mask=None, targets=None):
        return self.fc(inputs) + self.proj(inputs)


SUBSPACE = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)))[0]  # task 1's inputs


def examples(task: int, n: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + task)
    if task == 0:  # inputs inside a 3-dim subspace of R^6
        return [(SUBSPACE @ torch.randn(3, 5, generator=gen)).T for _ in range(n)]
    return [torch.randn(5, 6, generator=gen) for _ in range(n)]


def gpm_on(model, **options):
    strategy = GradientProjectionMemory(GPMConfig(targets={"toy": ["fc", "proj"]}, **options))
    collate = lambda xs: {"inputs": torch.stack(xs), "attention_mask": torch.ones(len(xs), xs[0].shape[0])}
    ctx = types.SimpleNamespace(accelerator=types.SimpleNamespace(unwrap_model=lambda m: m,
                                                                  autocast=contextlib.nullcontext),
                                model=model, unwrapped_model=model, model_family="toy", model_kind="causal", seed=0,
                                collate=collate, log=lambda values: None,
                                stream=types.SimpleNamespace(names=["a", "b"]))
    strategy.setup(ctx)
    return strategy, collate


def train(strategy, model, collate, task, steps=20):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    data = collate(examples(task))
    target = torch.randn(12, 5, 4, generator=torch.Generator().manual_seed(99))
    for _ in range(steps):
        loss = (model(**data) - target).pow(2).mean()
        loss.backward()
        strategy.after_backward()
        strategy.before_optimizer_step()
        optimizer.step()
        strategy.after_optimizer_step()
        optimizer.zero_grad(set_to_none=False)


def logical_weights(model) -> dict[str, torch.Tensor]:
    return {"fc": model.fc.weight.detach().clone(), "proj": model.proj.weight.detach().T.clone()}  # out x in


@pytest.mark.parametrize("project_update, preserved", [(True, True), (False, False)])
def test_later_task_leaves_w_x_unchanged_on_the_stored_subspace(project_update, preserved):
    torch.manual_seed(0)
    model = Toy()
    strategy, collate = gpm_on(model, threshold=1.0, project_update=project_update)
    task = lambda t: types.SimpleNamespace(name=f"t{t}", train=examples(t))
    strategy.before_task(0, task(0))
    train(strategy, model, collate, 0)
    strategy.after_task(0, task(0))
    for name in ("fc.weight", "proj.weight"):  # eps = 1: M is exactly task 1's 3-dim input subspace
        m = strategy.bases[name].double()
        assert m.shape == (6, 3) and torch.allclose(m @ m.T, SUBSPACE.double() @ SUBSPACE.double().T, atol=1e-5)

    before = logical_weights(model)
    strategy.before_task(1, task(1))
    assert not model.fc.bias.requires_grad and not model.proj.bias.requires_grad  # freeze_untargeted
    train(strategy, model, collate, 1)
    after = logical_weights(model)
    strategy.after_task(1, task(1))
    assert model.fc.bias.requires_grad and strategy.report()["tasks"][1]["frozen_untargeted"] == 2
    for name in ("fc", "proj"):
        assert not torch.allclose(after[name], before[name], atol=1e-3), "task 2 trains the layer"
        gap = ((after[name] - before[name]) @ SUBSPACE).abs().max().item()  # W x for x in span(M)
        if preserved:
            assert gap < 1e-5, (name, gap)
        else:  # gradients projected, but AdamW's element-wise step and weight decay leak into span(M)
            assert gap > 1e-3, (name, gap)


def test_state_round_trip_mid_task_continues_bit_identically():
    torch.manual_seed(0)
    model = Toy()
    strategy, collate = gpm_on(model, threshold=0.9)
    task = lambda t: types.SimpleNamespace(name=f"t{t}", train=examples(t))
    strategy.before_task(0, task(0))
    train(strategy, model, collate, 0, steps=5)
    strategy.after_task(0, task(0))
    strategy.before_task(1, task(1))
    train(strategy, model, collate, 1, steps=3)
    state = strategy.state_dict()
    assert state["in_task"] and set(state["bases"]) == {"fc.weight", "proj.weight"}

    twin = Toy()
    twin.load_state_dict(model.state_dict())
    resumed, _ = gpm_on(twin, threshold=0.9)
    resumed.load_state_dict(state)
    for name, m in strategy.bases.items():
        assert torch.equal(resumed.bases[name], m)
    train(strategy, model, collate, 1, steps=2)
    train(resumed, twin, collate, 1, steps=2)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.extra_state_bytes() == strategy.extra_state_bytes() > 0
    assert strategy.report()["k_per_target"]["fc.weight"][1] == 6


def test_registration():
    from cl_runner.strategies import registry

    reg = registry.get("gpm")
    assert reg.cls is GradientProjectionMemory and reg.adapters and reg.sharding
