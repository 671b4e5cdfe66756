"""Gradient corrections against past tasks' gradients: GEM's dual QP and A-GEM's projection.

Pure functions of flat gradient vectors; the strategies decide which vectors go in.
"""
from __future__ import annotations

import numpy as np
import quadprog
import torch

QP_FORMS = ("gem", "trace_code")


def agem_projection(g: torch.Tensor, g_ref: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A-GEM (Chaudhry et al. 2019, Eq. 11): when g^T g_ref < 0,
    g~ = g - (g^T g_ref / g_ref^T g_ref) g_ref; otherwise g. Returns (g~, projected)."""
    dot = torch.dot(g, g_ref)
    ref_sq = torch.dot(g_ref, g_ref)
    if not bool(dot < 0) or not bool(ref_sq > 0):
        return g, False
    return g - (dot / ref_sq) * g_ref, True


def gem_multipliers(gram: np.ndarray, constraint_dots: np.ndarray, margin: float, eps: float,
                    form: str = "gem") -> np.ndarray:
    """The dual variables v of GEM's QP, for P = G G^T (k x k) and G g (k,).

    gem (Lopez-Paz & Ranzato 2017, Eq. 10-11, as the authors' project2cone2 solves it):
        min_v 1/2 v^T (P + eps I) v + (G g)^T v   s.t.  v >= margin
    The margin (the paper's gamma, `memory_strength`) biases the update toward backward
    transfer; margin 0 and eps 0 is the paper's exact dual.

    trace_code (TRACE model/Regular/GEM.py, project2cone2 through qpth's QPFunction, which
    solves min 1/2 z^T Q z + p^T z s.t. G z <= h, called with p = -G g, G = I, h = margin):
        min_v 1/2 v^T (P + eps I) v - (G g)^T v   s.t.  v <= margin
    which does not keep <g~, g_k> >= 0 (one violated constraint: g~ = g + (g.g_k/|g_k|^2) g_k,
    the conflict doubled); kept for reproducing TRACE's numbers."""
    k = gram.shape[0]
    P = 0.5 * (gram + gram.T) + np.eye(k) * eps
    # quadprog: min 1/2 x^T P x - a^T x  s.t.  C^T x >= b
    if form == "gem":
        return quadprog.solve_qp(P, -constraint_dots, np.eye(k), np.full(k, float(margin)))[0]
    if form == "trace_code":
        return quadprog.solve_qp(P, constraint_dots, -np.eye(k), np.full(k, -float(margin)))[0]
    raise ValueError(f"unknown GEM QP form {form!r}; choose one of: {', '.join(QP_FORMS)}")


def gem_projection(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float,
                   form: str = "gem") -> tuple[torch.Tensor, bool]:
    """GEM's update for gradient g (P,) against past-task gradients G (k x P): g when
    <g, g_k> >= 0 for every k, else g~ = G^T v + g with v from `gem_multipliers`.
    The k x k system is solved in float64 on the CPU, as the authors do; the P-sized
    products stay on g's device in fp32. Returns (g~, projected)."""
    dots = G @ g
    if not bool((dots < 0).any()):
        return g, False
    gram = (G @ G.T).double().cpu().numpy()
    v = gem_multipliers(gram, dots.double().cpu().numpy(), margin, eps, form)
    return g + torch.as_tensor(v, dtype=G.dtype, device=G.device) @ G, True
