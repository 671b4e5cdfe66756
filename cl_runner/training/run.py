"""A run, built once: `build_run` makes everything the loop needs from a validated config
and the run's strategy stack (already built and checked, before this is called), runs
every check that needs built objects, and hands back a `RunContext`. The loop only trains
and evaluates; the summary, the final-model export and the checkpoints read the context.

Order (each step may fail with a one-line error; whatever was made is undone then):
precision against the device -> accelerator -> run folder (rank 0 makes it, the others
learn its path) -> environment.json -> tracker -> tasks (stream + monitor) -> model ->
checks against the built stream and model -> collator -> DDP wrap or FSDP2 sharding.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cl_runner.checkpoints.adapter import FrozenBase
from cl_runner.config.validate import check_epochs, check_lengths, check_task_budget
from cl_runner.errors import ConfigError, bad_value
from cl_runner.evaluation.predict import generation_budget
from cl_runner.models.batching import Collator
from cl_runner.models.build import ModelBundle, build_model
from cl_runner.models.label_space import LabelSpace
from cl_runner.models.positions import position_limit
from cl_runner.reporting.tracking import Tracker, discard_unstarted_run, link_into_sweep, make_tracker, new_run_folder
from cl_runner.strategies import StrategyStack
from cl_runner.strategies.registry import strategy_label
from cl_runner.streams.build import build_monitor, build_stream
from cl_runner.streams.records import RecordError
from cl_runner.streams.task import Task, TaskStream


@dataclass
class RunContext:
    """Everything one run uses, built once by `build_run`."""

    cfg: DictConfig
    run_dir: Path
    resuming: bool
    accelerator: Any  # accelerate.Accelerator
    tracker: Tracker
    stream: TaskStream
    monitor: list[Task]  # scored with every row of R, never trained (evaluation.monitor)
    strategy: StrategyStack
    bundle: ModelBundle  # the model as built (unwrapped), its tokenizer, kind and family
    collate: Collator
    model: nn.Module  # the training model: DDP-prepared, or sharded with FSDP2
    sharded: bool
    # Adapter runs checkpoint the adapters and head only, against this fingerprinted base.
    frozen_base: Optional[FrozenBase]
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def close(self, ok: bool, trained: bool = True) -> None:
        """End the run on every rank: the tracker, then the process group. A run that never
        started training (`trained=False`) leaves no run folder behind."""
        self.tracker.finish(ok)  # a failed job in a sweep never leaves its tracker open
        if not trained and not self.resuming and self.is_main:
            discard_unstarted_run(self.run_dir)  # no empty run folders from a bad model or data path
        if ok:
            self.accelerator.wait_for_everyone()  # rank 0 may still be writing results
        release(self.accelerator)


def release(accelerator: Any) -> None:
    """Tear the process group down before the interpreter exits: a gloo group left to its
    destructor can abort a rank at exit ("terminate called without an active exception")
    and the launcher then kills the others. No-op on one process."""
    from cl_runner.distributed.sharding import release_process_group

    accelerator.end_training()
    release_process_group()


def run_label(cfg: DictConfig) -> str:
    """The run folder's name: stream, model (+ adapter), strategy label, seed."""
    adapter = cfg.model.get("adapter", "none")
    model = cfg.model.name if adapter == "none" else f"{cfg.model.name}+{adapter}"  # LoRA runs told apart
    return "_".join([cfg.task_stream.name, model, strategy_label(cfg), f"s{cfg.seed}"])


def launched_on_cpus() -> bool:
    """True for a multi-process launch (torchrun, accelerate launch) on a machine without
    CUDA. Accelerate makes such processes one distributed (gloo) job only when told to use
    the CPU; otherwise each would silently run alone and race for the same run folder."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_precision(trainer: DictConfig) -> None:
    """accelerate's fp16 mixed precision is CUDA autocast: without a CUDA device it runs
    fp32 while config.yaml says fp16. Checked when the run is built, not in dry_run (which
    plans for a GPU elsewhere). Under FSDP2 the sharding policy casts the weights itself."""
    import torch

    if trainer.precision == "fp16" and trainer.sharding != "fsdp" and not torch.cuda.is_available():
        raise ConfigError(bad_value("trainer.precision", "fp16",
                                    "fp16 mixed precision needs a CUDA GPU and none is visible here, so the run would "
                                    "train in fp32; use trainer.precision=bf16 (CPUs run it) or trainer.precision=no"))


def make_accelerator(cfg: DictConfig, strategy: StrategyStack):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = []
    if strategy.freezes_parameters:
        # Strategies that freeze parameters after DDP has wrapped the model (the stack's
        # `freezes_parameters`): DDP must then find the ones that get no gradient.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # Under FSDP2 the sharding's own mixed-precision policy casts parameters (bf16 compute,
    # fp32 gradient reduction); accelerate's autocast stays off.
    precision = "no" if cfg.trainer.sharding == "fsdp" else cfg.trainer.precision
    return Accelerator(mixed_precision=precision, cpu=launched_on_cpus(), kwargs_handlers=handlers)


def make_run_dir(cfg: DictConfig, resuming: bool, accelerator: Any) -> Path:
    """Rank 0 makes the one run folder (and writes config.yaml); the others learn its path."""
    from accelerate.utils import broadcast_object_list

    from cl_runner.reporting.outputs import CONFIG_FILE

    holder: list[Optional[str]] = [None]
    if accelerator.is_main_process:
        if resuming:
            holder[0] = str(cfg.resume)
        else:
            folder = new_run_folder(Path("results"), cfg.experiment_name, run_label(cfg), cfg.output_dir)
            OmegaConf.save(cfg, folder / CONFIG_FILE)
            link_into_sweep(folder)
            holder[0] = str(folder)
    if accelerator.num_processes > 1:
        broadcast_object_list(holder)
    return Path(str(holder[0]))


def build_tasks(cfg: DictConfig) -> tuple[TaskStream, list[Task]]:
    """The stream's tasks and the monitor tasks, with the scorer of each checked."""
    try:
        stream = build_stream(cfg.task_stream, cfg.model.kind, cfg.seed)
        monitor = build_monitor(cfg.evaluation.monitor, cfg.task_stream, cfg.model.kind, cfg.seed,
                                stream.names) if cfg.evaluation.monitor else []
        check_scorers(stream.tasks + monitor)
    except RecordError:
        raise
    except ValueError as err:  # a task the config asks for cannot be made: one line, no traceback
        raise ConfigError(str(err)) from None
    return stream, monitor


def check_scorers(tasks: list[Task]) -> None:
    from cl_runner.evaluation.scorers import SCORERS

    for task in tasks:
        if task.scorer not in SCORERS:
            raise ValueError(f"task '{task.name}': unknown scorer {task.scorer!r}; choose one of "
                             f"{', '.join(sorted(SCORERS))}")


def check_built(cfg: DictConfig, stream: TaskStream, scored: list[Task], bundle: ModelBundle) -> None:
    """What only the built stream and model can tell: an epoch list against the tasks the
    stream really has, model.max_length against the model's own positions, and each
    task's generation budget against model.max_length."""
    check_epochs(cfg.trainer, stream.names)
    check_lengths(cfg, position_limit(bundle.model.config), "the model's config")
    if cfg.model.kind != "classifier":
        for task in scored:
            check_task_budget(cfg, task.name, generation_budget(cfg.evaluation, task))


def place_model(cfg: DictConfig, bundle: ModelBundle, accelerator: Any) -> nn.Module:
    """DDP-prepared (or plain on one process), or FSDP2-sharded with trainer.sharding=fsdp."""
    if cfg.trainer.sharding == "fsdp":
        from cl_runner.distributed.sharding import ensure_process_group, shard_model

        ensure_process_group(accelerator.device)
        return shard_model(bundle.model.to(accelerator.device), cfg.trainer)
    return accelerator.prepare(bundle.model)


def build_run(cfg: DictConfig, strategy: StrategyStack, resuming: bool = False,
              accelerator: Any = None) -> RunContext:
    """Everything the run needs, built and checked. On failure whatever was made is undone
    (the tracker closed, a new run folder removed, the process group released) before the
    error goes up."""
    from cl_runner.reporting.environment import record_environment

    check_precision(cfg.trainer)
    accelerator = accelerator or make_accelerator(cfg, strategy)
    run_dir = tracker = None
    try:
        run_dir = make_run_dir(cfg, resuming, accelerator)
        if accelerator.is_main_process:
            record_environment(run_dir, accelerator)  # at once: a run killed later has it too
            print(f"[cl-run] run folder: {run_dir}", flush=True)
        tracker = make_tracker(cfg.logger, run_dir, run_dir.name, OmegaConf.to_container(cfg),
                               accelerator.is_main_process)
        started = time.perf_counter()
        set_seed(cfg.seed)
        stream, monitor = build_tasks(cfg)
        scored = stream.tasks + monitor
        label_space = LabelSpace(TaskStream(name=stream.name, tasks=scored), cfg.model.head_sharing) \
            if cfg.model.kind == "classifier" else None
        # The strategy may ask for several adapters (O-LoRA: one per task) before the wrap.
        # ...and its soft prompts' source (L2P: a pool; ProgPrompt: one prompt per task).
        bundle = build_model(cfg.model, label_space, strategy.adapter_names(len(stream)),
                             prompt_source=lambda maker: strategy.prompt_source(maker, len(stream)), seed=cfg.seed)
        check_built(cfg, stream, scored, bundle)
        collate = Collator(cfg.model.kind, bundle.tokenizer, cfg.model.max_length, label_space,
                           device=accelerator.device)
        model = place_model(cfg, bundle, accelerator)
        sharded = cfg.trainer.sharding == "fsdp"
        frozen_base = None if sharded else FrozenBase.of(accelerator.unwrap_model(model))
    except BaseException:
        if tracker is not None:
            tracker.finish(False)
        if run_dir is not None and not resuming and accelerator.is_main_process:
            discard_unstarted_run(run_dir)
        release(accelerator)
        raise
    return RunContext(cfg=cfg, run_dir=run_dir, resuming=resuming, accelerator=accelerator, tracker=tracker,
                      stream=stream, monitor=monitor, strategy=strategy, bundle=bundle, collate=collate,
                      model=model, sharded=sharded, frozen_base=frozen_base, started=started)
