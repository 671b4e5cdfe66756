"""Helpers the tests share: compose a config the way `cl-run` does, run it in-process,
crash it on purpose, and check that a run learned. Fixtures live in conftest.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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
    from cl_runner.training.loop import ContinualLoop

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


# The default run (`cl-run` with no overrides, tracker off), made once per thread count
# and shared by every test that needs it: about 35 s each on a 2-core machine.
_DEFAULT_RUNS: dict[tuple[str, ...], tuple[dict, Path]] = {}


def shared_run(overrides: list[str], tmp_path_factory) -> tuple[dict, Path]:
    """`run_cl(overrides)` made once per session for the same overrides."""
    key = tuple(overrides)
    if key not in _DEFAULT_RUNS:
        _DEFAULT_RUNS[key] = run_cl(list(overrides), tmp_path_factory.mktemp("shared_run"))
    return _DEFAULT_RUNS[key]



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
