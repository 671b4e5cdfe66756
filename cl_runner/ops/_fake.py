"""Fake (meta) kernels for the compiled ops, so torch.compile / opcheck can trace them.

The ops mutate their gradient argument in place and return nothing, so a fake kernel
only has to check what it can and return None. (The schema names the mode argument
`projection`: an argument called `mode` collides with auto_functionalize's own `mode`
parameter under torch.compile.)
"""
from __future__ import annotations

import torch

_STACKED = ("cl_runner::project_stacked_", "cl_runner::project_stacked_fused_")
_LIST = ("cl_runner::project_list_", "cl_runner::project_list_fused_")


def _fake_stacked(grads, left, right, left_complement, right_complement, projection):
    torch._check(grads.dim() == 3, lambda: f"grads must be (B, m, n), got {grads.shape}")
    return None


def _fake_list(grads, left, right, left_complement, right_complement, projection):
    return None


for _name in _STACKED:
    torch.library.register_fake(_name)(_fake_stacked)
for _name in _LIST:
    torch.library.register_fake(_name)(_fake_list)
