"""Builds the optional compiled ops of cl_runner (metadata lives in pyproject.toml).

`pip install --no-build-isolation -e .` (the Makefile) compiles, ahead of time,
`cl_runner.ops._C`:

- a CppExtension (csrc/projection.cpp: the `cpp` backend on CPU and CUDA tensors) when
  torch and a C++ compiler are present;
- a CUDAExtension (adds csrc/projection_cuda.cpp + csrc/projection_kernels.cu: the `cuda`
  backend) when torch was built with CUDA and CUDA_HOME (nvcc) is found.

Nothing is built when torch is missing, when CL_RUNNER_NO_EXT=1, or when the build fails:
the package then installs as plain Python and `cl_runner.ops` warns once and uses its
pure-PyTorch backend.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _note(message: str) -> None:
    print(f"cl_runner setup: {message}", file=sys.stderr)


def _extension_setup() -> dict:
    if os.environ.get("CL_RUNNER_NO_EXT") == "1":
        _note("CL_RUNNER_NO_EXT=1: skipping the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not installed: skipping the compiled extension (install torch "
              "first and use `pip install --no-build-isolation -e .` to build it)")
        return {}

    sources = ["csrc/projection.cpp"]
    cxx_flags = ["-O2"]  # the C++ standard is torch's choice (its headers need it)
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += ["csrc/projection_cuda.cpp", "csrc/projection_kernels.cu"]
        extension = cpp_extension.CUDAExtension(
            "cl_runner.ops._C", sources,
            define_macros=[("CL_RUNNER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})
    else:
        extension = cpp_extension.CppExtension(
            "cl_runner.ops._C", sources, extra_compile_args={"cxx": cxx_flags})
    _note(f"building cl_runner.ops._C ({'C++ + CUDA' if with_cuda else 'C++, CPU'})")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds the extension; on failure, warns and installs without it."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing, header mismatch, ...
                _note(f"building the extension failed ({type(error).__name__}: {error}); "
                      "installing without it: cl_runner.ops will use the pure-PyTorch "
                      "backend")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


class BuildPyWithConfigs(build_py):
    """Ships the top-level configs/ inside the wheel as cl_runner/configs/ (where
    cl_runner.config.paths looks when there is no source checkout beside the package)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "cl_runner" / "configs"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / "configs", target)


def _setup_kwargs() -> dict:
    kwargs = _extension_setup()
    kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithConfigs
    return kwargs


setup(**_setup_kwargs())
