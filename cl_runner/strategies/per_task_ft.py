"""Per-task fine-tuning: a separate model per task, each task scored with its own model.

PerTaskFT of O-LoRA's Table 1 (Wang et al. 2023, arXiv 2310.14152, Sec. 4.1 baselines:
"training a separate model for each task"), the reference a continual learner would reach
with no interference and no transfer. Every task fine-tunes from theta_0 with a fresh
optimizer; after task t its task vector tau_t = theta_t - theta_0 is kept (fp32, host
memory or disk), and task k is always scored with theta_0 + tau_k:

    before_task(t)                  weights <- theta_0
    after_task(t)                   tau_t <- weights - theta_0
    row t+1 of R, task k <= t       weights <- theta_0 + tau_k   (the same tensor every row: BWT = 0)
    row t+1 of R, task k > t        theta_0 (`unseen_tasks: pretrained`: FWT = 0 by construction)
                                    or theta_t (`latest`: what one task's model knows of another)

Monitor tasks (never trained) follow `unseen_tasks` too. The model holds theta_t again after
each row, so a checkpoint, and the model a run saves at the end, is the last task's model.
Only trainable parameters are tracked (under model.adapter=lora: the LoRA factors and the
head, reset to their initial values for every task). Under trainer.sharding=fsdp each process
keeps its own shards of theta_0 and of every tau (elementwise, no collective).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from cl_runner.distributed.sharding import is_sharded, local
from cl_runner.errors import require_choice
from cl_runner.strategies.base import Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count, gib
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task

UNSEEN = ("pretrained", "latest")
STORES = ("memory", "disk")
FOLDER = "task_vectors"  # under the run folder, with store: disk

Weights = dict[str, torch.Tensor]


@dataclass
class PerTaskFTConfig:
    name: str = "per_task_ft"
    # The weights that score tasks not learned yet (and monitor tasks) after task t:
    # pretrained (theta_0, the model has not seen them) | latest (theta_t, the task just learned).
    unseen_tasks: str = "pretrained"
    # Where the task vectors live: memory (host RAM) | disk (<run folder>/task_vectors/, one
    # file per task, read back when that task is scored).
    store: str = "memory"


@register("per_task_ft", config=PerTaskFTConfig,
          summary="a separate model per task from theta_0, each task scored with its own model (no forgetting "
                  "by construction)")
class PerTaskFineTuning(Strategy):
    def __init__(self, config: PerTaskFTConfig) -> None:
        super().__init__(config)
        require_choice(config.unseen_tasks, "strategy.unseen_tasks", UNSEEN)
        require_choice(config.store, "strategy.store", STORES)
        self.theta0: Weights = {}
        # task t -> tau_t (store: memory) or its file name under <run folder>/task_vectors (disk).
        self.task_vectors: dict[int, Union[Weights, str]] = {}
        self.norms: dict[int, float] = {}
        self._row: Optional[Weights] = None  # theta_t while a row of R is scored

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        copy = FP32 * inputs.trainable
        kept = 1 + (inputs.n_tasks if self.config.store == "memory" else 1)
        where = ("theta_0 and one task vector per task" if self.config.store == "memory" else
                 f"theta_0 and the task vector being scored (the others on disk, {gib(copy)} each)")
        return StrategyEstimate(self.name, host_bytes=kept * copy, notes=[
            f"per_task_ft: {where}, fp32 copies of the {count(inputs.trainable)} trainable parameters, in host memory "
            f"({gib(kept * copy)} after {inputs.n_tasks} tasks, plus a copy of the weights while a row is scored)"])

    # -- life cycle ---------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        if self.config.store == "disk" and ctx.run_dir is None:
            raise ValueError("strategy.store=disk needs the run folder, which this caller did not give; "
                             "use strategy.store=memory")
        # Built (seeded) weights: the same in a fresh and a resumed run; the state's copy
        # replaces them on resume.
        self.theta0 = {n: local(p).detach().to("cpu", torch.float32, copy=True) for n, p in self._params().items()}

    def before_task(self, t: int, task: Task) -> None:
        self._load(self.theta0)

    def after_task(self, t: int, task: Task) -> None:
        params = self._params()
        tau = {n: local(params[n]).detach().to("cpu", torch.float32) - ref for n, ref in self.theta0.items()}
        self.norms[t] = task_vector_norm(tau, self._sharded())
        self.task_vectors[t] = self._write(t, tau) if self.config.store == "disk" else tau

    # -- evaluation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation_weights(self, t: int):
        self._row = {n: local(p).detach().to("cpu", copy=True) for n, p in self._params().items()}
        try:
            yield
        finally:
            self._load(self._row)
            self._row = None

    @contextlib.contextmanager
    def evaluation_weights_for(self, t: int, k: Optional[int]):
        if k is not None and k <= t:
            tau = self._task_vector(k)
            self._load({n: ref + tau[n] for n, ref in self.theta0.items()})
        elif self.config.unseen_tasks == "pretrained":
            self._load(self.theta0)
        elif self._row is not None:
            self._load(self._row)
        yield  # the row's weights come back when evaluation_weights(t) exits

    # -- helpers ----------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.ctx.unwrapped_model.named_parameters()
                if p.requires_grad and p.is_floating_point()}

    def _sharded(self) -> bool:
        return any(is_sharded(p) for p in self._params().values())

    def _load(self, values: Weights) -> None:
        params = self._params()
        with torch.no_grad():
            for n, v in values.items():
                held = local(params[n])
                held.copy_(v.to(device=held.device, dtype=held.dtype))

    def _file(self, t: int) -> str:
        # One file per process under FSDP (each holds its own shards), else one per task.
        rank = f".rank{torch.distributed.get_rank()}" if self._sharded() else ""
        return f"task_{t + 1}{rank}.pt"

    def _write(self, t: int, tau: Weights) -> str:
        name = self._file(t)
        acc = self.ctx.accelerator
        if self._sharded() or acc.is_main_process:
            folder = Path(self.ctx.run_dir) / FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(tau, folder / name)
        acc.wait_for_everyone()  # every process reads the file when task t is scored
        return name

    def _task_vector(self, k: int) -> Weights:
        held = self.task_vectors[k]
        if isinstance(held, str):
            return torch.load(Path(self.ctx.run_dir) / FOLDER / held, map_location="cpu", weights_only=True)
        return held

    # -- bookkeeping ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "task_vectors": dict(self.task_vectors), "norms": dict(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def fp32_cpu(values: Weights) -> Weights:
            return {n: v.to("cpu", torch.float32, copy=True) for n, v in values.items()}

        self.theta0 = fp32_cpu(state["theta0"])
        self.task_vectors = {int(t): (v if isinstance(v, str) else fp32_cpu(v))
                             for t, v in state.get("task_vectors", {}).items()}
        self.norms = {int(t): float(v) for t, v in state.get("norms", {}).items()}

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.theta0) + sum(tensor_bytes(v) for v in self.task_vectors.values())

    def report(self) -> dict[str, Any]:
        names = self.ctx.stream.names if self.ctx is not None else []
        return {"unseen_tasks": self.config.unseen_tasks, "store": self.config.store,
                "task_vector_norm": {names[t] if t < len(names) else str(t): v for t, v in sorted(self.norms.items())}}


def task_vector_norm(tau: Weights, sharded: bool) -> float:
    """||tau||_2 over every entry; under FSDP the processes' shards are summed (one all-reduce)."""
    total = torch.tensor(sum(float(v.double().pow(2).sum()) for v in tau.values()), dtype=torch.float64)
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        nccl = torch.distributed.get_backend() == "nccl"
        total = total.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        torch.distributed.all_reduce(total)
    return float(total) ** 0.5
