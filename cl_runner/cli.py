"""`cl-run`: compose the config once, validate it, make the run folder, run, report.

Hydra does the composing (groups, overrides, multirun, SLURM launcher). The package's
`configs/` is the base; a `configs/` folder in the working directory shadows it file by
file, so users keep their own models and streams beside their code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from cl_runner.checkpoints.files import CheckpointError
from cl_runner.config.paths import package_configs
from cl_runner.config.validate import validate
from cl_runner.errors import ConfigError
from cl_runner.models.build import ModelLoadError
from cl_runner.reporting.outputs import CONFIG_FILE, METRICS_FILE
from cl_runner.reporting.tracking import RunFolderError
from cl_runner.streams.records import RecordError

PACKAGE_CONFIGS = package_configs()


# What may be given together with resume=: how the resumed run is shown and logged, never
# what it computes. Any other override is refused rather than silently dropped.
RESUME_OVERRIDABLE = ("resume", "logger", "trainer.progress_bar", "dry_run", "plan_world_size",
                      "plan_gpu_memory_gb")


def override_key(override: str) -> str:
    """`+trainer.lr=0.1` -> `trainer.lr`."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def _may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_OVERRIDABLE)


def load_config(raw: DictConfig, overrides: Optional[list[str]] = None) -> tuple[DictConfig, bool]:
    """The validated config, or, with resume=DIR, the config saved in that run folder
    (a resumed run continues with exactly the settings it started with). `overrides`
    (the command line's, when known) may only touch RESUME_OVERRIDABLE keys on resume."""
    resume = raw.get("resume")
    if not resume:
        return validate(raw), False
    refused = [o for o in overrides or [] if not _may_change_on_resume(override_key(o))]
    if refused:
        raise ConfigError(
            f"resume={resume} continues the run with the config saved in its folder, so these overrides would be "
            f"ignored: {' '.join(refused)}; drop them (only {', '.join(RESUME_OVERRIDABLE[1:])} may be given "
            "with resume=), or start a new run with them")
    saved = Path(resume) / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"resume={resume!r}: no config.yaml there; point resume at a run folder "
                          "(results/<experiment>/<run>/)")
    loaded = OmegaConf.load(saved)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"resume={resume!r}: {saved} holds no config (the run never started?)")
    for key in {override_key(o) for o in overrides or []} - {"resume"}:
        OmegaConf.update(loaded, key, OmegaConf.select(raw, key), merge=False)
    cfg = validate(loaded)
    cfg.resume = str(resume)
    return cfg, True


def build_checked_strategy(cfg: DictConfig):
    """The run's strategy stack. Each strategy checks its own options, what its
    registration says it supports and the rest of the run config when it is built
    (`strategies.build_strategy`); building it before any folder or model exists makes a
    bad value fail as early as a bad schema key."""
    from cl_runner.strategies import build_strategy

    try:
        return build_strategy(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def finished_run(run_dir: Path) -> dict[str, Any]:
    """resume= on a run that has its metrics.json: nothing to do, nothing rewritten."""
    import json

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[cl-run] {run_dir} is a finished run (its metrics.json is there): nothing to resume, "
              "nothing written. Start a new run to train again.", flush=True)
    return json.loads((run_dir / METRICS_FILE).read_text())


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run, after the run was closed; the message says where it
    stopped and what `cl-run resume=` continues from."""


def interrupted_line(run_dir: Optional[Path], where: str) -> str:
    """Where an interrupted run stopped, and how to continue it (run_dir None: nothing kept)."""
    from cl_runner.checkpoints.files import resume_point

    if run_dir is None:
        return f"interrupted {where}, before training started; nothing was kept (the new run folder is removed)"
    if (run_dir / METRICS_FILE).is_file():
        return f"interrupted {where}, after the run had finished; its results are in {run_dir}"
    point = resume_point(run_dir / "checkpoints")
    if point is None:
        return (f"interrupted {where}; no checkpoint was saved yet, so cl-run resume={run_dir} starts the run "
                "again from its beginning (trainer.checkpoint_every_steps=N saves within tasks)")
    return f"interrupted {where}; cl-run resume={run_dir} continues from {point}"


# Above this many parameters a run without a GPU takes hours a task: the paper presets
# (T5-large 738M, LLaMA-2-7B) say so at start instead of silently crawling.
GPU_SIZED_PARAMS = 500_000_000


def warn_if_gpu_sized_on_cpu(cfg: DictConfig) -> None:
    import torch

    if torch.cuda.is_available() or cfg.model.gguf_file:  # a GGUF's header takes seconds to read: not at every start
        return
    from cl_runner.memory_plan import model_facts

    try:
        params = model_facts(cfg.model).params  # a meta-device build: no weights read
    except Exception:  # noqa: BLE001 - the run's own model build reports what is wrong
        return
    if params >= GPU_SIZED_PARAMS:
        print(f"[cl-run] warning: model '{cfg.model.name}' has {params / 1e9:.2f}B parameters and no GPU is visible; "
              "on CPU a task takes hours to days. This setting is meant for GPUs (cl-run dry_run=true "
              "plan_gpu_memory_gb=<GiB> says what fits).", file=sys.stderr, flush=True)


def execute(raw: DictConfig, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """One run from a composed config (`overrides`: the command line's, checked on
    resume); returns its metrics. Every check that needs nothing built runs first (the
    config, the strategy stack and its combination); `build_run` then builds the run once
    and checks what only built objects tell; the loop trains and evaluates."""
    cfg, resuming = load_config(raw, overrides)  # fails fast, before any model is built
    if resuming and not cfg.dry_run and (Path(cfg.resume) / METRICS_FILE).is_file():
        return finished_run(Path(cfg.resume))
    strategy = build_checked_strategy(cfg)
    if cfg.dry_run:
        from cl_runner.memory_plan import print_memory_plan

        print(OmegaConf.to_yaml(cfg))
        plan = print_memory_plan(cfg)  # will it fit: per-rank memory from a meta-device model
        return {"memory_plan": plan.as_dict()} if plan is not None else {}
    warn_if_gpu_sized_on_cpu(cfg)
    from cl_runner.reporting.environment import apply_cpu_threads

    apply_cpu_threads(cfg.trainer.cpu_threads)  # first, before any parallel work in this process
    from cl_runner.ops.setup import configure_ops
    from cl_runner.reporting.summary import finish_run
    from cl_runner.training.loop import ContinualLoop
    from cl_runner.training.run import build_run

    configure_ops(cfg.ops)
    try:
        run = build_run(cfg, strategy, resuming)  # undoes what it made when interrupted
    except KeyboardInterrupt:
        kept = Path(cfg.resume) if resuming else None
        raise RunInterrupted(interrupted_line(kept, "while the run was being built (model, data)")) from None
    ok = trained = False
    loop = None
    try:
        loop = ContinualLoop(run)
        trained = True
        progress = loop.run(resume=resuming)
        metrics = finish_run(run, progress, loop.wall_seconds())
        ok = True
        return metrics
    except KeyboardInterrupt:
        # The run stays resumable: checkpoints are written atomically, and run.close()
        # below keeps the folder of a run that started training.
        where = loop.where() if loop is not None else "while the run was being set up"
        kept = run.run_dir if trained or resuming else None
        raise RunInterrupted(interrupted_line(kept, where)) from None
    finally:
        run.close(ok, trained)


def main(argv: Optional[list[str]] = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        compose_and_run()
    except KeyboardInterrupt:  # before a run was built (checking, composing, validating): nothing made
        print("cl-run: interrupted before the run was built; nothing of it was written", file=sys.stderr, flush=True)
        sys.exit(130)


def compose_and_run() -> None:
    """The command line checked, composed by Hydra (one run, or a sweep with -m) and run;
    each failure a run can meet ends in one line and its exit code."""
    from cl_runner.config.override_check import misspelt_key_message, unknown_option_message

    # Before Hydra: an unknown group option (Hydra's dump, or for the optional experiment
    # group a silent default run) and a misspelt key each get one line.
    typo = (unknown_option_message([Path.cwd() / "configs", PACKAGE_CONFIGS], sys.argv[1:])
            or misspelt_key_message(PACKAGE_CONFIGS, sys.argv[1:]))
    if typo:
        print(f"cl-run: config error: {typo}", file=sys.stderr)
        sys.exit(2)
    # A working-directory configs/ shadows these through the search-path plugin in
    # hydra_plugins/cl_runner_searchpath.
    @hydra.main(version_base=None, config_path=str(PACKAGE_CONFIGS), config_name="config")
    def _hydra_entry(raw: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from cl_runner.distributed.env import init_from_slurm

        init_from_slurm()  # one task of a multi-task SLURM job (submitit, srun): RANK, WORLD_SIZE, MASTER_*
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
        try:
            execute(raw, overrides)
        except ConfigError as err:
            print(f"cl-run: config error: {err}", file=sys.stderr)
            sys.exit(2)
        except (ModelLoadError, RecordError, FileNotFoundError, RunFolderError, CheckpointError) as err:
            # Bad input found while building the run (missing model/data, malformed record,
            # a run folder already taken, a checkpoint refused or unreadable): one clear
            # line, no traceback.
            print(f"cl-run: error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunInterrupted as stop:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"cl-run: {stop}", file=sys.stderr, flush=True)
            sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C
        except RuntimeError as err:
            from cl_runner.training.loop import TrainingDivergedError

            if not isinstance(err, TrainingDivergedError):
                raise
            print(f"cl-run: error: {err}", file=sys.stderr)  # NaN/inf loss: the run stopped
            sys.exit(1)

    _hydra_entry()


if __name__ == "__main__":
    main()
