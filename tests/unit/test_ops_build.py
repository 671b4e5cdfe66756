"""The CUDA kernels compile with plain nvcc (no torch headers), so CI checks them even
without a GPU; the GPU tests in tests/gpu/ run them."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_compile_with_plain_nvcc(tmp_path):
    # One architecture keeps this to a few seconds; the real build targets torch's list.
    result = subprocess.run(
        ["nvcc", "-c", str(CSRC / "projection_kernels.cu"), "-o", str(tmp_path / "k.o"),
         "-O3", "-arch=sm_80", "-Werror", "all-warnings"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


def test_kernel_file_includes_no_torch_header():
    text = (CSRC / "projection_kernels.cu").read_text()
    assert "#include <torch" not in text and "#include <ATen" not in text
