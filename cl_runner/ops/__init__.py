"""cl_runner.ops: the math of svd_orthogonal, gradient projection and per-task subspaces
(stateless functions; the strategy's stacked buffers and anchors, `ProjectionGroups`, live in
`cl_runner/strategies/svd_orthogonal/groups.py`).

Public API (stable; the svd_orthogonal strategy codes against it)
-----------------------------------------------------------------
project_(grads, left_bases, right_bases, mode="two_sided", backend=None, *,
         left_complement=False, right_complement=False) -> None
    In place, for every gradient G (m x n) with preserved bases U (m x k), V (n x k)
    (orthonormal columns; None = no basis on that side; k may be 0):
    two_sided  G <- (I - U U^T) G (I - V V^T);   high_block  G <- G - U (U^T G V) V^T.
    With left_complement[i] the left entry is the complement U_c (cheaper for k > m/2).
project_update_(params, previous, left_bases, right_bases, mode="two_sided",
                backend=None, *, left_complement=False, right_complement=False) -> None
    After an optimizer step: W <- W_prev + P(W - W_prev).
top_k_bases(weights, ks, method="exact"|"randomized", oversample=10, power_iters=2,
            keep_complement=False|True|"auto", *, out_dtype=None, return_stats=False,
            seed=0) -> list[(U, V)] (or (U, V, U_c, V_c)); with return_stats also a
    SubspaceStats (relative Frobenius / spectral residuals, suboptimality bound).
orthonormal_complement(basis) -> basis of the orthogonal complement (complete QR).
available_backends(device=None) -> list[str]   fastest first ("cuda", "cpp", "torch").
set_default_backend(name | None)  force a backend (config key ops.backend); None = auto.
get_default_backend(), extension_status() -> one line on the compiled extension.

Backends: "torch" (reference, pure PyTorch, always present), "cpp" (compiled ATen ops in
C++: CPU and CUDA), "cuda" (CUDA kernels: fused small-k and low-precision paths). The
extension is built by `pip install --no-build-isolation -e .`; when it is missing,
cl_runner.ops warns once and uses "torch". CL_RUNNER_NO_EXT=1 disables it.
"""
from cl_runner.ops._backends import (
                                     BACKENDS,
                                     available_backends,
                                     extension_status,
                                     get_default_backend,
                                     set_default_backend,
)
from cl_runner.ops.projection import project_, project_update_
from cl_runner.ops.reference import MODES
from cl_runner.ops.subspace import SubspaceStats, orthonormal_complement, top_k_bases

__all__ = [
    "BACKENDS", "MODES", "SubspaceStats", "available_backends",
    "extension_status", "get_default_backend", "orthonormal_complement", "project_",
    "project_update_", "set_default_backend", "top_k_bases",
]
