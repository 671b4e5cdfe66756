"""cl_runner.ops: every backend against the textbook formula (reference.project_one)."""
from __future__ import annotations

import pytest
import torch

from cl_runner import ops
from cl_runner.ops import _backends, reference

BACKENDS = [b for b in ops.available_backends("cpu")]
SHAPES = [(64, 64), (172, 64), (64, 172), (1, 7), (7, 1)]
# Every (device, backend) pair: the CUDA ones run where a GPU is (marked gpu, else skipped),
# so one test holds the CPU and the GPU implementations to the same formula.
_CUDA = torch.cuda.is_available()
DEVICE_BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu)
    for b in (ops.available_backends("cuda") if _CUDA else ["cuda"])]


def on_device(device: str) -> None:
    if device == "cuda" and not _CUDA:
        pytest.skip("needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(dim: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if k == 0:
        return torch.zeros(dim, 0, dtype=dtype)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return q.to(dtype)


def random_grad(m: int, n: int, seed: int, dtype=torch.float32, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(m, n, generator=g).to(dtype)
    return torch.randn(n, m, generator=g).to(dtype).T  # a transposed view


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 3e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_match_formula_on_adversarial_shapes(device, backend, mode, dtype):
    """Square, tall, wide and degenerate shapes, k from 0 to full rank (on CUDA also the
    sizes where the fused kernel hands over to cuBLAS), one side or both, transposed views."""
    on_device(device)
    shapes = SHAPES + ([(300, 70), (4096, 96)] if device == "cuda" else [])
    grads, lefts, rights, expected = [], [], [], []
    seed = 0
    for m, n in shapes:
        r = min(m, n)
        ks = {0, 1, r // 2, r} | ({7, 16, 32, 33} & set(range(r + 1)) if device == "cuda" else set())
        for k in sorted(ks):
            for sides in ("both", "left", "right"):
                for contiguous in (True, False):
                    seed += 1
                    g = random_grad(m, n, seed, dtype, contiguous).to(device)
                    u = orthonormal(m, k, seed + 1000).to(device) if sides != "right" else None
                    v = orthonormal(n, k, seed + 2000).to(device) if sides != "left" else None
                    expected.append(reference.project_one(g.float(), u, v, mode).cpu())
                    grads.append(g)
                    lefts.append(u)
                    rights.append(v)
    ops.project_(grads, lefts, rights, mode, backend=backend)
    for i, (g, want) in enumerate(zip(grads, expected)):
        assert g.dtype == dtype
        assert (g.double().cpu() - want).abs().max() <= tolerance(dtype) * max(
            1.0, want.abs().max().item()) * 4, f"matrix {i}, shape {tuple(g.shape)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.MODES)
def test_idempotent_and_orthogonal_to_preserved_subspace(backend, mode):
    m, n, k = 96, 80, 30
    u, v = orthonormal(m, k, 1), orthonormal(n, k, 2)
    g = random_grad(m, n, 3)
    once = [g.clone()]
    ops.project_(once, [u], [v], mode, backend=backend)
    twice = [once[0].clone()]
    ops.project_(twice, [u], [v], mode, backend=backend)
    assert rel_err(twice[0], once[0]) < 1e-5
    scale = g.norm()
    p = once[0]
    if mode == "two_sided":
        assert (u.T @ p).norm() / scale < 1e-5
        assert (p @ v).norm() / scale < 1e-5
    else:
        assert (u.T @ p @ v).norm() / scale < 1e-5
        # only the preserved block is removed: the rest of G is untouched
        assert rel_err(p - u @ (u.T @ p @ v) @ v.T, g - u @ (u.T @ g @ v) @ v.T) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("shape,k", [((64, 64), 50), ((64, 64), 64), ((96, 40), 30)])
def test_complement_path_equals_direct_path(backend, mode, shape, k):
    m, n = shape
    u, v = orthonormal(m, k, 4), orthonormal(n, k, 5)
    u_c, v_c = ops.orthonormal_complement(u), ops.orthonormal_complement(v)
    assert u_c.shape == (m, m - k) and v_c.shape == (n, n - k)
    g = random_grad(m, n, 6)
    direct = [g.clone()]
    ops.project_(direct, [u], [v], mode, backend=backend)
    for lc, rc in ((True, True), (True, False), (False, True)):
        via = [g.clone()]
        ops.project_(via, [u_c if lc else u], [v_c if rc else v], mode, backend=backend,
                     left_complement=lc, right_complement=rc)
        assert (via[0] - direct[0]).abs().max() < 1e-5 * g.abs().max(), (lc, rc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_op_pads_different_k_exactly(backend):
    # Zero columns after a basis change nothing: the stacked buffers rely on it.
    m, n = 48, 40
    g = torch.stack([random_grad(m, n, s) for s in range(3)])
    us = [orthonormal(m, k, 10 + k) for k in (0, 5, 17)]
    vs = [orthonormal(n, k, 20 + k) for k in (3, 0, 11)]
    left = torch.zeros(3, m, 17)
    right = torch.zeros(3, n, 11)
    for i in range(3):
        left[i, :, : us[i].shape[1]] = us[i]
        right[i, :, : vs[i].shape[1]] = vs[i]
    for mode in ops.MODES:
        out = g.clone()
        _backends.stacked_impl(backend)(out, left, right, False, False, mode)
        for i in range(3):
            want = reference.project_one(g[i], us[i], vs[i], mode)
            assert (out[i].double() - want).abs().max() < 1e-5 * g.abs().max(), (mode, i)


def test_project_update_keeps_update_in_allowed_subspace():
    torch.manual_seed(0)
    shapes = [(32, 32), (48, 24)]
    for mode in ops.MODES:
        params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        bases = ops.top_k_bases([p.detach() for p in params], [12, 10])
        start = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            sum((p.sin() * p).sum() for p in params).backward()
            ops.project_([p.grad for p in params], [b[0] for b in bases],
                         [b[1] for b in bases], mode)
            previous = [p.detach().clone() for p in params]
            opt.step()
            ops.project_update_(params, previous, [b[0] for b in bases],
                                [b[1] for b in bases], mode)
        for p, w0, (u, v) in zip(params, start, bases):
            delta = (p.detach() - w0).double()
            u, v = u.double(), v.double()
            assert delta.abs().max() > 1e-3  # it did train
            assert (u.T @ delta @ v).abs().max() < 1e-5
            if mode == "two_sided":
                assert (u.T @ delta).abs().max() < 1e-5
                assert (delta @ v).abs().max() < 1e-5


def test_unknown_and_unavailable_backend_errors_name_the_choices():
    with pytest.raises(ValueError, match="backend='nope' is unknown.*torch"):
        ops.project_([torch.zeros(2, 2)], [None], [None], backend="nope")
    if "cuda" not in ops.available_backends():
        with pytest.raises(ValueError, match="backend='cuda' is not available.*Available"):
            ops.project_([torch.zeros(2, 2)], [None], [None], backend="cuda")
    with pytest.raises(ValueError, match="unknown"):
        ops.set_default_backend("nope")


def test_set_default_backend_forces_and_restores():
    try:
        ops.set_default_backend("torch")
        assert ops.get_default_backend() == "torch"
        assert _backends.resolve(None, torch.device("cpu")) == "torch"
    finally:
        ops.set_default_backend(None)
    assert ops.get_default_backend() is None
    assert _backends.resolve(None, torch.device("cpu")) == ops.available_backends("cpu")[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_errors_name_argument_value_and_fix(backend):
    g = torch.zeros(8, 6)
    with pytest.raises((ValueError, RuntimeError), match=r"left_bases\[0\].*\(8, k\)"):
        ops.project_([g], [torch.zeros(6, 2)], [None], backend=backend)
    with pytest.raises((ValueError, RuntimeError), match=r"right_bases\[0\] has k=7"):
        ops.project_([g], [None], [torch.zeros(6, 7)], backend=backend)
    with pytest.raises(ValueError, match="mode='diagonal'"):
        ops.project_([g], [None], [None], mode="diagonal", backend=backend)


def test_fallback_warns_once_in_one_line(monkeypatch):
    import sys
    import warnings

    monkeypatch.setitem(sys.modules, "cl_runner.ops._C", None)  # import now fails
    monkeypatch.delenv("CL_RUNNER_NO_EXT", raising=False)
    for name, value in (("_extension_loaded", False), ("_extension_error", None),
                        ("_warned", False)):
        monkeypatch.setattr(_backends, name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.available_backends() == ["torch"]
        ops.project_([torch.ones(3, 3)], [orthonormal(3, 1, 0)], [None])
        ops.available_backends()
    messages = [str(w.message) for w in caught if "cl_runner.ops" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "pure-PyTorch" in messages[0]


def test_built_extension_is_loaded():
    """If setup.py built cl_runner/ops/_C*.so it must load (an ABI mismatch would
    silently fall back to the slow path otherwise)."""
    import pathlib

    built = list(pathlib.Path(ops.__file__).parent.glob("_C*.so"))
    if not built:
        pytest.skip("extension not built (no compiler, or CL_RUNNER_NO_EXT=1 at install)")
    assert "cpp" in ops.available_backends(), ops.extension_status()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ops.MODES)
def test_opcheck_registered_ops(device, mode):
    on_device(device)
    u = orthonormal(20, 4, 1).expand(2, 20, 4).contiguous().to(device)
    v_c = ops.orthonormal_complement(orthonormal(12, 9, 2)).expand(2, 12, 3).contiguous().to(device)
    stacked = [torch.ops.cl_runner.project_stacked_]
    if device == "cuda" and "cuda" in ops.available_backends("cuda"):
        stacked.append(torch.ops.cl_runner.project_stacked_fused_)
    for op in stacked:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.randn(2, 20, 12, device=device).to(dtype)
            torch.library.opcheck(op.default, (g, u, v_c, False, True, mode))
            torch.library.opcheck(op.default, (g.clone(), None, v_c, False, True, mode))
    if device == "cuda":
        return
    grads = [torch.randn(20, 12), torch.randn(12, 20), torch.randn(20, 12)]
    torch.library.opcheck(torch.ops.cl_runner.project_list_.default,
                          (grads, [u[0], None, u[1]], [v_c[0], orthonormal(20, 2, 3), None],
                           [False, False, False], [True, False, False], mode))


def test_projection_flops_counts_the_cheaper_contraction():
    m = n = 400
    assert reference.projection_flops(m, n, 100, 100) == 8 * m * n * 100
    # k = 300 preserved on both sides: complements of width 100, contracted one at a time
    both = reference.projection_flops(m, n, 100, 100, True, True)
    assert both == 4 * m * n * 100 + 4 * m * 100 * 100
    assert both < 8 * m * n * 100 < 8 * m * n * 300
    # tall: direct left (k = 300 of 1600 rows), complement right (100 of 400 columns)
    assert reference.projection_flops(1600, 400, 300, 100, False, True) == \
        4 * 1600 * 400 * 100 + 4 * 1600 * 300 * 100
