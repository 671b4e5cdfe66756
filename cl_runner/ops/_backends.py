"""Backend registry: which implementations of the projection exist here, which one runs.

Three backends compute the same thing (see `reference.py` for the math):

- ``torch``: plain PyTorch, always present (the reference).
- ``cpp``:   the compiled extension's ``torch.ops.cl_runner.project_stacked_`` (ATen
  batched GEMMs in C++, CPU and CUDA) and ``project_list_`` (grouping in C++).
- ``cuda``:  the extension's ``torch.ops.cl_runner.project_stacked_fused_``: CUDA kernels
  for small k and low-precision gradients, only on CUDA tensors.

The extension is built ahead of time by ``pip install`` (setup.py); when it is missing we
warn once and run the reference. Nothing is compiled at import time.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional, Sequence

import torch

from cl_runner.ops import reference

BACKENDS = ("torch", "cpp", "cuda")
# Preference when nothing is forced, fastest first (measured: scripts/bench_projection.py).
_PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "cpp", "torch")}

_extension_error: Optional[str] = None
_extension_loaded = False
_warned = False
_default_backend: Optional[str] = None


def _load_extension() -> bool:
    """Import the compiled ops once; remember why it failed."""
    global _extension_loaded, _extension_error
    if _extension_loaded or _extension_error is not None:
        return _extension_loaded
    if os.environ.get("CL_RUNNER_NO_EXT") == "1":
        _extension_error = "CL_RUNNER_NO_EXT=1 is set"
        return False
    try:
        # Loading the library runs its TORCH_LIBRARY registrations (torch.ops.cl_runner.*).
        importlib.import_module("cl_runner.ops._C")
        importlib.import_module("cl_runner.ops._fake")  # fake kernels for torch.compile
    except Exception as error:  # ImportError, or an ABI mismatch with this torch
        _extension_error = f"{type(error).__name__}: {error}"
        return False
    _extension_loaded = True
    return True


def extension_status() -> str:
    """One line: whether the compiled extension is in use, and why not."""
    if _load_extension():
        cuda = "with CUDA kernels" if _has_cuda_kernels() else "CPU only"
        return f"cl_runner extension loaded ({cuda})"
    return f"cl_runner extension not available ({_extension_error})"


def _has_cuda_kernels() -> bool:
    return _extension_loaded and bool(torch.ops.cl_runner.has_cuda_kernels())


def _warn_fallback_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"cl_runner.ops: compiled extension not available ({_extension_error}); using the "
        "pure-PyTorch backend. Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=3)


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Backends usable here (for tensors on `device`, or on any device when None),
    fastest first."""
    has_ext = _load_extension()
    if not has_ext and os.environ.get("CL_RUNNER_NO_EXT") != "1":
        _warn_fallback_once()
    kind = None if device is None else torch.device(device).type
    names = []
    for name in ("cuda", "cpp", "torch"):
        if name == "torch":
            names.append(name)
        elif name == "cpp" and has_ext:
            names.append(name)
        elif (name == "cuda" and has_ext and _has_cuda_kernels() and kind in (None, "cuda")
              and torch.cuda.is_available()):
            names.append(name)
    if kind is not None:
        order = _PREFERENCE.get(kind, ("torch",))
        names = [n for n in order if n in names]
    return names


def set_default_backend(name: Optional[str]) -> None:
    """Force a backend for every call that does not pass `backend=` (config key
    `ops.backend`); None or "auto" restores automatic choice."""
    global _default_backend
    if name in (None, "auto"):
        _default_backend = None
        return
    _check_backend(name, None)
    _default_backend = name


def get_default_backend() -> Optional[str]:
    """The forced backend, or None when chosen automatically."""
    return _default_backend


def _check_backend(name: str, device: Optional[torch.device]) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {BACKENDS} "
                         f"(available here: {available_backends()})")
    usable = available_backends(device)
    if name not in usable:
        why = {
            "cpp": f"the compiled extension is not loaded ({_extension_error}); "
                   "build it with `pip install --no-build-isolation -e .`",
            "cuda": "it needs the extension built with CUDA and CUDA tensors",
        }.get(name, "")
        where = f" for {device} tensors" if device is not None else ""
        raise ValueError(f"backend={name!r} is not available{where}: {why}. "
                         f"Available: {usable}")


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend name to run for tensors on `device`."""
    name = backend if backend is not None else _default_backend
    if name is None or name == "auto":
        return available_backends(device)[0]
    _check_backend(name, device)
    return name


def _impl(name: str, reference_fn: Callable[..., None], op: str) -> Callable[..., None]:
    """The backend's implementation: the torch reference, the compiled op, or its fused
    CUDA variant (`<op>fused_`)."""
    if name == "torch":
        return reference_fn
    return getattr(torch.ops.cl_runner, op if name == "cpp" else op + "fused_")


def stacked_impl(name: str) -> Callable[..., None]:
    """project_stacked_(grads, left, right, left_complement, right_complement, mode)."""
    return _impl(name, reference.project_stacked_, "project_stacked_")


def list_impl(name: str) -> Callable[..., None]:
    """project_list_(grads, lefts, rights, left_complement, right_complement, mode)."""
    return _impl(name, reference.project_list_, "project_list_")


def _as_flags(value: bool | Sequence[bool], n: int, arg: str) -> list[bool]:
    if isinstance(value, bool):
        return [value] * n
    flags = [bool(v) for v in value]
    if len(flags) != n:
        raise ValueError(f"{arg} has {len(flags)} entries for {n} gradients; pass one "
                         "bool per gradient or a single bool")
    return flags
