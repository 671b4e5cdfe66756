"""`cl-run`: compose the config once, validate it, make the run folder, run, report.

Hydra does the composing (groups, overrides, multirun, SLURM launcher). The package's
`configs/` is the base; a `configs/` folder in the working directory shadows it file by
file, so users keep their own models and streams beside their code.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from cl_runner.checkpoints.files import CheckpointError
from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from cl_runner.config.paths import package_configs
from cl_runner.models.build import ModelLoadError
from cl_runner.streams.records import RecordError
from cl_runner.reporting.tracking import RunFolderError

PACKAGE_CONFIGS = package_configs()


def run_label(cfg: DictConfig) -> str:
    from cl_runner.strategies.registry import strategy_label

    adapter = cfg.model.get("adapter", "none")
    model = cfg.model.name if adapter == "none" else f"{cfg.model.name}+{adapter}"  # LoRA runs told apart
    return "_".join([cfg.task_stream.name, model, strategy_label(cfg), f"s{cfg.seed}"])


def launched_on_cpus() -> bool:
    """True for a multi-process launch (torchrun, accelerate launch) on a machine without
    CUDA. Accelerate makes such processes one distributed (gloo) job only when told to use
    the CPU; otherwise each would silently run alone and race for the same run folder."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_checked_strategy(cfg: DictConfig):
    """The run's strategy stack. Each strategy checks its own options when it is built
    (the schema leaves them open); building it before any folder or model exists makes a
    bad value fail as early as a bad schema key."""
    from cl_runner.strategies import build_strategy

    try:
        return build_strategy(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def make_accelerator(cfg: DictConfig, strategy):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = []
    if strategy.freezes_parameters:
        # HFT (and svd_orthogonal with freeze_untargeted) freeze parameters after DDP has
        # wrapped the model; DDP must then find the ones that get no gradient.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # Under FSDP2 the sharding's own mixed-precision policy casts parameters (bf16 compute,
    # fp32 gradient reduction); accelerate's autocast stays off.
    precision = "no" if cfg.trainer.sharding == "fsdp" else cfg.trainer.precision
    return Accelerator(mixed_precision=precision, cpu=launched_on_cpus(), kwargs_handlers=handlers)


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
    saved = Path(resume) / "config.yaml"
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


def finished_run(run_dir: Path) -> dict[str, Any]:
    """resume= on a run that has its metrics.json: nothing to do, nothing rewritten."""
    import json

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[cl-run] {run_dir} is a finished run (its metrics.json is there): nothing to resume, "
              "nothing written. Start a new run to train again.", flush=True)
    return json.loads((run_dir / "metrics.json").read_text())


def make_run_dir(cfg: DictConfig, resuming: bool) -> Path:
    from cl_runner.reporting.tracking import new_run_folder

    if resuming:
        return Path(cfg.resume)
    run_dir = new_run_folder(Path("results"), cfg.experiment_name, run_label(cfg), cfg.output_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    return run_dir


def execute(raw: DictConfig, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """One run from a composed config (`overrides`: the command line's, checked on
    resume); returns its metrics."""
    from accelerate.utils import broadcast_object_list

    cfg, resuming = load_config(raw, overrides)  # fails fast, before any model is built
    if resuming and not cfg.dry_run and (Path(cfg.resume) / "metrics.json").is_file():
        return finished_run(Path(cfg.resume))
    strategy = build_checked_strategy(cfg)
    if cfg.dry_run:
        from cl_runner.memory_plan import print_memory_plan

        print(OmegaConf.to_yaml(cfg))
        plan = print_memory_plan(cfg)  # will it fit: per-rank memory from a meta-device model
        return {"memory_plan": plan.as_dict()} if plan is not None else {}
    from cl_runner.reporting.environment import apply_cpu_threads, record_environment

    apply_cpu_threads(cfg.trainer.cpu_threads)  # first, before any parallel work in this process
    from cl_runner.training.loop import ContinualLoop
    from cl_runner.ops.setup import configure_ops
    from cl_runner.reporting.summary import finish_run
    from cl_runner.reporting.tracking import discard_unstarted_run, make_tracker

    configure_ops(cfg.ops)
    accelerator = make_accelerator(cfg, strategy)
    # Rank 0 makes the one run folder; the other ranks learn its path from rank 0.
    holder = [str(make_run_dir(cfg, resuming)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(holder)
    run_dir = Path(holder[0])
    if accelerator.is_main_process:
        record_environment(run_dir, accelerator)  # at once: a run killed later has it too
        print(f"[cl-run] run folder: {run_dir}", flush=True)
    tracker = make_tracker(cfg.logger, run_dir, run_dir.name, OmegaConf.to_container(cfg), accelerator.is_main_process)
    started = time.perf_counter()
    ok = False
    loop = None
    try:
        loop = ContinualLoop(cfg, run_dir, tracker, accelerator, strategy=strategy)
        progress = loop.run(resume=resuming)
        metrics = finish_run(loop, progress, time.perf_counter() - started, tracker)
        ok = True
        return metrics
    finally:
        tracker.finish(ok)  # a failed job in a sweep never leaves its tracker open
        if loop is None and not resuming and accelerator.is_main_process:
            discard_unstarted_run(run_dir)  # no empty run folders from a bad model or data path
        if ok:
            accelerator.wait_for_everyone()  # rank 0 may still be writing results
        # Tear the process group down before the interpreter exits: a gloo group left to
        # its destructor can abort a rank at exit ("terminate called without an active
        # exception") and the launcher then kills the others. No-op on one process.
        accelerator.end_training()
        from cl_runner.distributed.sharding import release_process_group

        release_process_group()


def main(argv: Optional[list[str]] = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cl_runner.config.override_check import misspelt_key_message

    typo = misspelt_key_message(PACKAGE_CONFIGS, sys.argv[1:])
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
        except RuntimeError as err:
            from cl_runner.training.loop import TrainingDivergedError

            if not isinstance(err, TrainingDivergedError):
                raise
            print(f"cl-run: error: {err}", file=sys.stderr)  # NaN/inf loss: the run stopped
            sys.exit(1)

    _hydra_entry()


if __name__ == "__main__":
    main()
