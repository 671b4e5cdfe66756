"""The continual-learning loop: train on each task in order, evaluate every task after
each one, fill the accuracy matrix R.

Reads top to bottom like a plain training script. Strategies plug in through the hooks
of `strategies/base.py`; the loop never names one. Runs unchanged on a CPU, one GPU, or
under `accelerate launch` (each process takes its slice of every global batch).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from cl_runner.checkpoints.adapter import load_model_state
from cl_runner.checkpoints.files import Progress, load_latest_checkpoint, save_checkpoint, set_rng_state
from cl_runner.errors import ConfigError, bad_value
from cl_runner.evaluation.predict import generation_budget, predict
from cl_runner.models.batching import compute_loss
from cl_runner.reporting.tracking import write_item_scores, write_predictions
from cl_runner.strategies import StrategyContext, StrategyStack
from cl_runner.streams.sampling import EndlessShuffle
from cl_runner.streams.task import Example, Task, TaskStream
from cl_runner.training.anneal import optimizer_copy, prepared_alone
from cl_runner.training.phases import phase
from cl_runner.training.progress import TaskProgress, on_terminal
from cl_runner.training.run import RunContext


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stops (its checkpoints stay)."""


@dataclass
class TaskPlan:
    """How task t trains: its micro-batches (global, before sharding) and step count."""

    batches: list[list[Example]]
    steps: int


@dataclass
class ResumeState:
    """What a restored checkpoint hands the loop besides the weights and the strategy's
    state (already loaded): where to continue, and the optimizer, scheduler and RNG states
    to continue with. `optimizer` is a state dict, or a sharded checkpoint's folder."""

    progress: Progress
    optimizer: Any = None
    scheduler: Optional[dict] = None
    rng: Any = None

    @property
    def mid_task(self) -> bool:
        """Stopped inside a task (its next step comes from the checkpoint's optimizer and
        scheduler); else at a task boundary."""
        return not self.progress.task_done and self.progress.step > 0


def epochs_for(trainer: Any, t: int) -> float:
    epochs = trainer.epochs
    if isinstance(epochs, (int, float)):
        return float(epochs)
    epochs = list(epochs)
    if t >= len(epochs):
        raise ValueError(f"trainer.epochs lists {len(epochs)} entries but the stream has task {t + 1}; "
                         "give one entry per task")
    return float(epochs[t])


def shuffled_stream(examples: list[Example], seed: int, t: int) -> Iterator[Example]:
    """Endless epochs of `examples`, each reshuffled with a seed fixed by (seed, t, epoch)."""
    for i in EndlessShuffle(len(examples), seed_of_pass=lambda epoch: f"{seed}:{t}:{epoch}"):
        yield examples[i]


# trainer.epochs may be exceeded by this fraction (the last optimizer step rounded up to
# whole grad_accum micro-batches) before the run says so.
EPOCH_SLACK = 0.1


@dataclass(frozen=True)
class EpochPlan:
    """trainer.epochs over a task's examples as optimizer steps: the epochs make
    `micro_batches` global batches, and each step takes grad_accum of them, the last one
    rounded up, so the data is passed over `passes` times rather than `epochs`."""

    epochs: float
    examples: int
    global_batch: int
    accum: int

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.epochs * self.examples / self.global_batch)

    @property
    def steps(self) -> int:
        return math.ceil(self.micro_batches / self.accum)

    @property
    def passes(self) -> float:
        return self.steps * self.accum * self.global_batch / self.examples

    @property
    def unreachable(self) -> bool:
        """One optimizer step already takes more micro-batches than the epochs make: no
        step count honours trainer.epochs."""
        return self.micro_batches < self.accum

    @property
    def overshoots(self) -> bool:
        return self.passes > self.epochs * (1 + EPOCH_SLACK)


def check_epoch_plan(plan: EpochPlan, task_name: str, trainer: Any, world: int) -> Optional[str]:
    """Raises ConfigError when trainer.epochs cannot be honoured at all on this task;
    returns a warning line when it is exceeded by more than EPOCH_SLACK, else None."""
    batch = f"a global batch of {plan.global_batch} (trainer.batch_size={trainer.batch_size} x {world} process(es))"
    if plan.unreachable:
        raise ConfigError(bad_value(
            "trainer.grad_accum", plan.accum,
            f"task '{task_name}' has {plan.examples} training examples: trainer.epochs={plan.epochs:g} at {batch} "
            f"makes {plan.micro_batches} micro-batch(es), but one optimizer step takes {plan.accum}, which is "
            f"{plan.passes:.2f} passes over the data; use trainer.grad_accum<={plan.micro_batches}, a smaller "
            "trainer.batch_size, or a fixed trainer.steps_per_task"))
    if not plan.overshoots:
        return None
    return (f"[cl-run] warning: task '{task_name}': trainer.epochs={plan.epochs:g} over {plan.examples} training examples "
            f"at {batch} makes {plan.micro_batches} micro-batches, rounded up to {plan.steps} optimizer step(s) of "
            f"trainer.grad_accum={plan.accum}: {plan.steps * plan.accum} micro-batches, {plan.passes:.2f} passes over "
            f"the data instead of {plan.epochs:g}")


def plan_task(t: int, task: Task, strategy: StrategyStack, trainer: Any, world: int, seed: int) -> TaskPlan:
    """Task t's micro-batches and optimizer steps: the strategy's examples (multitask's
    union), the trainer's step count or epochs over the global batch (trainer.batch_size
    per process), reshuffled by (seed, t), then the strategy's batch rewrite (replay)."""
    examples = strategy.train_examples(t, task, task.train)
    if not examples:
        return TaskPlan([], 0)
    global_batch = trainer.batch_size * world
    accum = trainer.grad_accum
    if trainer.steps_per_task:
        steps = int(trainer.steps_per_task)
    else:
        steps = EpochPlan(epochs_for(trainer, t), len(examples), global_batch, accum).steps
    steps = strategy.num_train_steps(t, steps)
    source = shuffled_stream(examples, seed, t)
    raw = ([next(source) for _ in range(global_batch)] for _ in range(steps * accum))
    return TaskPlan(list(strategy.compose_batches(t, raw)), steps)


def trainer_lr_factor(trainer: Any, steps: int) -> Callable[[int], float]:
    """step -> multiplier of trainer.lr: linear warm-up over warmup_ratio of the task's
    steps, then constant, linear or cosine decay (the trainer's own per-task schedule)."""
    warmup = int(trainer.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if trainer.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if trainer.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_adamw(params: list[torch.nn.Parameter], trainer: Any) -> torch.optim.AdamW:
    """The trainer's AdamW (every strategy that keeps AdamW trains with this one)."""
    return torch.optim.AdamW(params, lr=trainer.lr, weight_decay=trainer.weight_decay,
                             betas=tuple(trainer.adam_betas), eps=trainer.adam_eps)


class ContinualLoop:
    """Trains and evaluates a run built by `build_run` (training/run.py); builds nothing
    but the optimizer and the strategies' context."""

    def __init__(self, run: RunContext) -> None:
        self.run_context = run
        self.cfg = run.cfg
        self.run_dir = run.run_dir
        self.tracker = run.tracker
        self.trainer = run.cfg.trainer
        self.accelerator = run.accelerator
        self.stream: TaskStream = run.stream
        self.monitor: list[Task] = run.monitor
        self.strategy = run.strategy
        self.bundle = run.bundle
        self.collate = run.collate
        self.model = run.model
        self.sharded = run.sharded
        self.frozen_base = run.frozen_base
        self.strategy_ctx = StrategyContext(
            accelerator=self.accelerator, model=self.model, stream=self.stream,
            model_kind=self.bundle.kind, model_family=self.bundle.family, seed=self.cfg.seed,
            trainer=self.trainer, loss_fn=compute_loss, collate=self.collate,
            log=lambda values: self.tracker.log_train(self.progress.global_step, values),
            anneal=self.anneal, run_dir=run.run_dir)
        self.strategy.setup(self.strategy_ctx)
        self._check_epoch_plans()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        # When this session started (run.started: before the stream and model were built)
        # and the run's wall time before it (restored with a checkpoint).
        self.session_started = run.started
        self.wall_before = 0.0
        # What the loop is doing, for the line an interrupted run prints (`where`):
        # ("before_task", t), ("train", t, steps done, steps), ("after_task", t), ("eval", row)
        # or ("finish",).
        self.activity: tuple = ("restore",)
        T = len(self.stream)
        self.progress = Progress(R=[[None] * T for _ in range(T + 1)],
                                 monitor=[[None] * len(self.monitor) for _ in range(T + 1)] if self.monitor else [])

    # ------------------------------------------------------------------ public
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def run(self, resume: bool = False) -> Progress:
        """Train and evaluate the whole stream; returns the final progress (R inside)."""
        restored = self._restore() if resume else None
        if restored is not None:
            self.progress = restored.progress
            self.progress.sessions += 1
            self.wall_before = self.progress.wall_seconds
        if self.is_main:
            self._warn_cut_prompts()
        if not self._row_filled(0):
            self._evaluate_row(0)
        start = self.progress.task + 1 if self.progress.task_done else self.progress.task
        for t in range(start, len(self.stream)):
            task = self.stream[t]
            # A restored state continues the task it stopped in (mid-task: its optimizer and
            # scheduler; at a boundary with carry_optimizer: the optimizer's moments).
            continuing = restored if restored is not None and t == start else None
            self._train_task(t, task, continuing)
            self.activity = ("after_task", t)
            with phase("after_task"):
                self.strategy.after_task(t, task)
            with phase("evaluate"), self.strategy.evaluation_weights(t):
                self._evaluate_row(t + 1)
            self.progress.task, self.progress.step, self.progress.task_done = t, 0, True
            self._checkpoint()
        self.activity = ("finish",)
        return self.progress

    def where(self) -> str:
        """Where the run is, in words: `at step 37/200 of task 2/3 'decrement'` (steps done)."""
        kind, *at = self.activity
        T = len(self.stream)
        if kind == "train":
            t, step, steps = at
            return f"at step {step}/{steps} of task {t + 1}/{T} '{self.stream[t].name}'"
        if kind == "before_task":
            return f"at the start of task {at[0] + 1}/{T} '{self.stream[at[0]].name}' (before its first step)"
        if kind == "after_task":
            return f"in the strategy's end-of-task step after task {at[0] + 1}/{T} '{self.stream[at[0]].name}'"
        if kind == "eval":
            row = at[0]
            return "in the evaluation before training" if row == 0 else \
                f"in the evaluation after task {row}/{T} '{self.stream[row - 1].name}'"
        if kind == "finish":
            return "while writing the results"
        return "at the start of the run (restoring its checkpoint)"

    def wall_seconds(self) -> float:
        """The run's wall time so far: earlier sessions' (to their last checkpoint) + this one's."""
        return self.wall_before + time.perf_counter() - self.session_started

    def _warn_cut_prompts(self) -> None:
        """One line per task whose prompts do not fit model.max_length (with the answer in
        training, with the generation budget in evaluation) and are cut."""
        generative = self.cfg.model.kind != "classifier"
        for task in self.stream:
            n_train = self.collate.count_cut(task.train)
            room = generation_budget(self.cfg.evaluation, task) if generative else None
            n_test = self.collate.count_cut(task.test, room=room)
            if n_train or n_test:
                budget = " (with the generation budget)" if generative else ""
                print(f"[cl-run] warning: task '{task.name}': {n_train} of {len(task.train)} training prompts "
                      f"(with their answers) and {n_test} of {len(task.test)} test prompts{budget} are longer than "
                      f"model.max_length={self.cfg.model.max_length} allows and are cut {self.collate.cut_side}",
                      file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ training
    def _check_epoch_plans(self) -> None:
        """trainer.epochs against trainer.grad_accum on the examples each task trains on
        (the strategy's: multitask's union), before anything trains: refused when no
        step count honours the epochs, one warning line per task that overshoots them."""
        if self.trainer.steps_per_task:
            return
        world = self.accelerator.num_processes
        for t, task in enumerate(self.stream):
            examples = self.strategy.train_examples(t, task, task.train)
            if not examples:
                continue
            plan = EpochPlan(epochs_for(self.trainer, t), len(examples), self.trainer.batch_size * world,
                             self.trainer.grad_accum)
            warning = check_epoch_plan(plan, task.name, self.trainer, world)
            if warning and self.is_main:
                print(warning, file=sys.stderr, flush=True)

    def plan_task(self, t: int, task: Task) -> TaskPlan:
        return plan_task(t, task, self.strategy, self.trainer, self.accelerator.num_processes, self.cfg.seed)

    def _build_optimizer(self) -> None:
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]
        previous = self.optimizer if self.strategy.carry_optimizer else None
        chosen = self.strategy.optimizer(named, previous)
        if chosen is None:
            if previous is not None:
                return
            chosen = build_adamw([p for _, p in named], self.trainer)
        self.optimizer = chosen

    def _lr_lambda(self, t: int, steps: int) -> Callable[[int], float]:
        custom = self.strategy.lr_lambda(t, steps)
        return custom if custom is not None else trainer_lr_factor(self.trainer, steps)

    def _count_train_time(self, t: int, since: float) -> float:
        """Adds the time since `since` to task t's and the run's training time; returns now."""
        now = time.perf_counter()
        self.progress.train_seconds += now - since
        self._task_seconds(t)["train"] = self._task_seconds(t).get("train", 0.0) + now - since
        return now

    def _train_task(self, t: int, task: Task, restored: Optional[ResumeState] = None) -> None:
        started = clock = time.perf_counter()
        self.activity = ("before_task", t)
        mid_task = restored is not None and restored.mid_task
        if not mid_task:
            with phase("before_task"):
                self.strategy.before_task(t, task)
        plan = self.plan_task(t, task)
        self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(t, plan.steps))
        first_step = 0
        if mid_task:
            if restored.optimizer is not None:
                self._load_optimizer_state(restored.optimizer)
            if restored.scheduler is not None:
                self.scheduler.load_state_dict(restored.scheduler)
            set_rng_state(restored.rng)
            first_step = self.progress.step
        elif restored is not None and restored.progress.task_done and restored.optimizer is not None \
                and self.strategy.carry_optimizer:
            # Resumed at a task boundary with carry_optimizer: continue its moments.
            self._load_optimizer_state(restored.optimizer)
        optimizer = self.accelerator.prepare_optimizer(self.optimizer, device_placement=False)
        self.model.train()
        self.activity = ("train", t, first_step, plan.steps)
        shown = TaskProgress(f"task {t + 1}/{len(self.stream)} {task.name}", plan.steps, first_step,
                             enabled=self.is_main and self.trainer.progress_bar)
        accum = self.trainer.grad_accum
        running = 0.0
        for step in range(first_step, plan.steps):
            micro = plan.batches[step * accum:(step + 1) * accum]
            with phase("step"):  # the whole optimizer step; the phases inside break it down
                loss_value, tokens = self._optimizer_step(optimizer, micro)
            self.scheduler.step()
            if not math.isfinite(loss_value):
                # Nothing after this point is saved: the last checkpoint stays the run's
                # last good state. Every rank sees the same (reduced) loss and stops.
                shown.close()
                raise TrainingDivergedError(
                    f"training loss is {loss_value} at step {step + 1} of task {t + 1}/{len(self.stream)} "
                    f"'{task.name}' (optimizer step {self.progress.global_step + 1} of the run); the run stops here, "
                    f"its checkpoints so far stay in {self.run_dir / 'checkpoints'}. Start a new run with a lower "
                    f"trainer.lr (this one: {self.trainer.lr:g}) or with trainer.max_grad_norm set")
            self.progress.step = step + 1
            self.progress.global_step += 1
            self.activity = ("train", t, step + 1, plan.steps)
            self.progress.train_tokens += tokens
            running = loss_value if step == first_step else 0.9 * running + 0.1 * loss_value
            self._record_loss(t, step + 1, plan.steps, loss_value)
            shown.update(step + 1, running, tokens)
            if self.progress.global_step % self.trainer.log_every_steps == 0:
                self.tracker.log_train(self.progress.global_step, {
                    "loss": loss_value, "lr": self.scheduler.get_last_lr()[0], "task": t + 1})
            every = self.trainer.checkpoint_every_steps
            if every and self.progress.step % every == 0 and self.progress.step < plan.steps:
                self.progress.task, self.progress.task_done = t, False
                clock = self._count_train_time(t, clock)  # the checkpoint holds the training time so far
                self._checkpoint()
        shown.close()
        elapsed = self._count_train_time(t, clock) - started
        if self.is_main and plan.steps:
            print(f"[cl-run] task {t + 1}/{len(self.stream)} {task.name}: {plan.steps} steps in {elapsed:.1f}s, "
                  f"final loss {running:.4f}", flush=True)

    def _record_loss(self, t: int, step: int, steps: int, loss: float) -> None:
        curves = self.progress.loss_curves
        while len(curves) <= t:
            curves.append([])
        if step % max(1, steps // 50) == 0 or step == steps:
            curves[t].append([step, loss])

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        """No gradient all-reduce / reduce-scatter for the micro-batches before the last."""
        if sync:
            yield
        elif self.sharded:
            from cl_runner.distributed.sharding import set_gradient_sync

            set_gradient_sync(self.model, False)
            try:
                yield
            finally:
                set_gradient_sync(self.model, True)
        else:
            with self.accelerator.no_sync(self.model):
                yield

    def _optimizer_step(self, optimizer: Any, micro: list[list[Example]]) -> tuple[float, int]:
        """Forward/backward over the micro-batches, then one optimizer step (the caller
        steps its lr scheduler). Training and the anneal both step through here."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        total_loss, tokens = 0.0, 0
        for i, examples in enumerate(micro):
            mine = examples[rank::world]
            batch = self.collate(mine)
            self.strategy_ctx.batch_examples = mine
            sync = i == len(micro) - 1
            with self._gradient_sync(sync):
                with self.accelerator.autocast():
                    with phase("forward"):
                        loss = compute_loss(self.model, batch)
                    with phase("penalty"):
                        penalty = self.strategy.penalty(self.model, batch)
                    objective = loss if penalty is None else loss + penalty
                with phase("backward"):
                    self.accelerator.backward(objective / len(micro))
            total_loss += loss.item() / len(micro)
            tokens += int(batch["attention_mask"].sum())
        if world > 1:
            # The loss shown and logged is the global batch's, and tokens count every rank's.
            summed = self.accelerator.reduce(torch.tensor([total_loss, float(tokens)], device=self.accelerator.device),
                                             reduction="sum")
            total_loss, tokens = summed[0].item() / world, int(summed[1].item())
        self.strategy_ctx.batch_examples = None
        with phase("after_backward"):
            self.strategy.after_backward()
        if self.trainer.max_grad_norm:
            with phase("clip"):
                if self.sharded:  # DTensor gradients: torch's clip reduces the norm over shards
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.trainer.max_grad_norm)
                else:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.trainer.max_grad_norm)
        with phase("before_optimizer_step"):
            self.strategy.before_optimizer_step()
        with phase("optimizer_step"):
            optimizer.step()
        with phase("after_optimizer_step"):
            self.strategy.after_optimizer_step()
        optimizer.zero_grad(set_to_none=False)
        return total_loss, tokens

    def anneal(self, t: int, batches: list[list[Example]], factor_at: Callable[[int], float],
               keep_optimizer: bool = False) -> list[float]:
        """lr_schedule's anneal after task t: optimizer steps of grad_accum micro-batches
        (global, as planned for training: every process takes its slice, in lock-step)
        through `_optimizer_step`, so the strategy's penalty, projections, masks and
        clipping act as in training; the batches go through the strategy's
        compose_anneal_batches (replay). The optimizer is a copy of task t's, moments
        included, at lr = trainer.lr * factor_at(step); the training optimizer is left as it
        was unless keep_optimizer (resume_from: annealed), where the copy replaces it so a
        carried optimizer continues from the moments that led to the kept weights. No
        progress counter, loss curve or token count moves: the anneal is not training
        (lr_schedule reports its cost). Returns each step's loss."""
        if self.optimizer is None:
            raise RuntimeError(f"the anneal after task {t + 1} needs the task's optimizer; none was built")
        batches = list(self.strategy.compose_anneal_batches(t, iter(batches)))
        accum = self.trainer.grad_accum
        optimizer = optimizer_copy(self.optimizer)
        # base lr = the group's initial_lr (trainer.lr, set by the task's scheduler).
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor_at)
        losses: list[float] = []
        was_training = self.model.training
        self.model.train()
        self.strategy_ctx.annealing = True
        try:
            with prepared_alone(self.accelerator, optimizer) as prepared:
                for step in range(len(batches) // accum):
                    loss, _ = self._optimizer_step(prepared, batches[step * accum:(step + 1) * accum])
                    if not math.isfinite(loss):
                        raise TrainingDivergedError(
                            f"anneal loss is {loss} at anneal step {step + 1} after task {t + 1}/{len(self.stream)} "
                            f"'{self.stream[t].name}'; the run stops here, its checkpoints so far stay in "
                            f"{self.run_dir / 'checkpoints'}. Lower trainer.lr or lr_schedule.const_ratio")
                    scheduler.step()
                    losses.append(loss)
        finally:
            self.strategy_ctx.annealing = False
            self.model.train(was_training)
        if keep_optimizer:
            self.optimizer = optimizer
        return losses

    # ------------------------------------------------------------------ evaluation
    def _row_filled(self, i: int) -> bool:
        monitor = self.progress.monitor[i] if i < len(self.progress.monitor) else [None] * len(self.monitor)
        return all(v is not None for v in self.progress.R[i]) and all(v is not None for v in monitor)

    def _evaluate_row(self, tasks_learned: int) -> None:
        """Score every task; fills row `tasks_learned` of R (and of the monitor scores)."""
        started = time.perf_counter()
        self.activity = ("eval", tasks_learned)
        self.progress.R[tasks_learned] = self._score_tasks(self.stream.tasks, tasks_learned, "task")
        if self.monitor:
            while len(self.progress.monitor) <= tasks_learned:  # a checkpoint from before monitors
                self.progress.monitor.append([None] * len(self.monitor))
            self.progress.monitor[tasks_learned] = self._score_tasks(self.monitor, tasks_learned, "monitor")
        elapsed = time.perf_counter() - started
        self.progress.eval_seconds += elapsed
        if tasks_learned > 0:
            self._task_seconds(tasks_learned - 1)["eval"] = elapsed
        self._log_row(tasks_learned)

    def _score_tasks(self, tasks: list[Task], tasks_learned: int, kind: str) -> list[Optional[float]]:
        """Each task's score; predictions go to predictions/<kind>_<j>_after_<t>.jsonl."""
        from cl_runner.evaluation.scorers import score

        ev = self.cfg.evaluation
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        model = self.accelerator.unwrap_model(self.model)
        row: list[Optional[float]] = []
        what = "monitor" if kind == "monitor" else "eval"
        bar = tqdm(tasks, desc=f"{what} after {tasks_learned} task(s)", leave=False,
                   disable=not (self.is_main and self.trainer.progress_bar and on_terminal()))
        for j, task in enumerate(bar):
            shard = task.test[rank::world]
            size = len(shard)
            if self.sharded and task.test:
                # Every forward is collective under FSDP: each rank runs the same number of
                # batches (shards padded to the longest, padding dropped) and generation
                # keeps stepping until every rank's sequences are done (synced).
                longest = -(-len(task.test) // world)
                shard = shard + [task.test[0]] * (longest - size)
            # After a task, the strategy may hold other weights for each task (per_task_ft).
            own = self.strategy.evaluation_weights_for(tasks_learned - 1, j if kind == "task" else None) \
                if tasks_learned else contextlib.nullcontext()
            def plain(examples: list[Example], task: Task = task) -> list[str]:
                return predict(model, self.collate, task, examples, ev, ev.batch_size, synced=self.sharded)

            with own, self.accelerator.autocast():
                # After a task, the strategy may take the prediction over (MbPA++ adapts first).
                local = (self.strategy.predict_examples(tasks_learned - 1, j if kind == "task" else None, task, shard,
                                                        plain) if tasks_learned else plain(shard))[:size]
            gathered = gather_object([(rank + world * i, p) for i, p in enumerate(local)]) if world > 1 else list(enumerate(local))
            predictions = [p for _, p in sorted(gathered, key=lambda x: x[0])]
            value, per_item = score(task.scorer, predictions, [e.answer for e in task.test], [e.prompt for e in task.test])
            row.append(float(value))
            if self.is_main and ev.save_predictions:
                write_predictions(self.run_dir / "predictions" / f"{kind}_{j + 1}_after_{tasks_learned}.jsonl", [
                    {"task": task.name, "prompt": e.prompt, "answer": e.answer, "prediction": p, "score": s}
                    for e, p, s in zip(task.test, predictions, per_item)])
            elif self.is_main:  # no predictions: the per-item scores alone, for cl-report's bootstrap
                write_item_scores(self.run_dir / "item_scores" / f"{kind}_{j + 1}_after_{tasks_learned}.json", per_item)
        return row

    def _task_seconds(self, t: int) -> dict[str, float]:
        while len(self.progress.task_seconds) <= t:
            self.progress.task_seconds.append({})
        return self.progress.task_seconds[t]

    def _log_row(self, tasks_learned: int) -> None:
        from cl_runner.evaluation.metrics import average_accuracy, backward_transfer

        row = self.progress.R[tasks_learned]
        values: dict[str, Any] = {f"{task.name}/score": s for task, s in zip(self.stream, row)}
        if tasks_learned > 0:
            # The metrics of the stream so far: R restricted to the tasks learned.
            seen = [r[:tasks_learned] for r in self.progress.R[: tasks_learned + 1]]
            values["ACC"] = average_accuracy(seen)
            values["BWT"] = backward_transfer(seen)
        monitor = self.progress.monitor[tasks_learned] if self.monitor else []
        values.update({f"monitor/{task.name}/score": s for task, s in zip(self.monitor, monitor)})
        self.tracker.log_eval(tasks_learned, values)
        if self.is_main:
            scores = "  ".join(f"{task.name}={s:.3f}" for task, s in zip(self.stream, row))
            head = "before training" if tasks_learned == 0 else f"after {self.stream[tasks_learned - 1].name}"
            print(f"[cl-run] eval {head}: {scores}", flush=True)
            if self.monitor:
                kept = "  ".join(f"{task.name}={s:.3f}" for task, s in zip(self.monitor, monitor))
                print(f"[cl-run] monitor (never trained) {head}: {kept}", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        self.progress.wall_seconds = self.wall_seconds()
        if self.sharded:
            from cl_runner.checkpoints.sharded import save_sharded_checkpoint

            save_sharded_checkpoint(
                self.run_dir / "checkpoints", self.progress, self.model, self.optimizer,
                self.scheduler.state_dict() if self.scheduler is not None else None,
                self.strategy.state_dict(), keep=self.trainer.keep_checkpoints)
            return
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return
        model_state, scope = self.accelerator.get_state_dict(self.model), None
        if self.frozen_base is not None:
            model_state, scope = self.frozen_base.trim(model_state)
        save_checkpoint(
            self.run_dir / "checkpoints", self.progress, model_state,
            self.optimizer.state_dict() if self.optimizer is not None else None,
            self.scheduler.state_dict() if self.scheduler is not None else None,
            self.strategy.state_dict(), keep=self.trainer.keep_checkpoints, model_scope=scope)

    def _restore_sharded(self) -> Optional[ResumeState]:
        """The newest readable sharded checkpoint, re-sharded to this run's processes."""
        from cl_runner.checkpoints.files import CorruptCheckpointError
        from cl_runner.checkpoints.sharded import (
            load_model_and_strategy,
            rank_rng_state,
            read_meta,
            sharded_checkpoints,
        )

        for path in reversed(sharded_checkpoints(self.run_dir / "checkpoints")):
            try:
                meta = read_meta(path)
            except CorruptCheckpointError as err:
                if self.is_main:
                    print(f"[cl-run] warning: {err}; trying the checkpoint before it", file=sys.stderr, flush=True)
                continue
            self.strategy.load_state_dict(load_model_and_strategy(path, meta, self.model))
            state = ResumeState(meta["progress"], optimizer=path if meta["has_optimizer"] else None,
                                scheduler=meta["scheduler"], rng=rank_rng_state(meta))
            if state.progress.task_done:
                set_rng_state(state.rng)
            if self.is_main:
                progress = state.progress
                where = "end of" if progress.task_done else f"step {progress.step} of"
                print(f"[cl-run] resuming from {path.name} (saved by {meta['world_size']} process(es)): "
                      f"{where} task {progress.task + 1}", flush=True)
                world = self.accelerator.num_processes
                if meta["world_size"] != world:
                    print(f"[cl-run] warning: saved by {meta['world_size']} process(es), resumed on {world}: "
                          f"trainer.batch_size={self.trainer.batch_size} is per process, so the global batch is now "
                          f"{self.trainer.batch_size * world} (was {self.trainer.batch_size * meta['world_size']})",
                          file=sys.stderr, flush=True)
            return state
        return None

    def _load_optimizer_state(self, state: Any) -> None:
        """A saved optimizer state: a state dict, or (sharded runs) the checkpoint folder."""
        if isinstance(state, Path):
            from cl_runner.checkpoints.sharded import load_optimizer

            load_optimizer(state, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state)

    def _restore(self) -> Optional[ResumeState]:
        """Loads the newest readable checkpoint's weights and strategy state; returns where
        to continue and with which optimizer, scheduler and RNG states (None: nothing saved)."""
        if self.sharded:
            return self._restore_sharded()
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if self.is_main else (lambda line: None)
        found = load_latest_checkpoint(self.run_dir / "checkpoints", say=say)
        if found is None:
            return None
        path, payload = found
        load_model_state(self.accelerator.unwrap_model(self.model), payload, self.frozen_base, str(path))
        self.strategy.load_state_dict(payload["strategy"])
        state = ResumeState(payload["progress"], optimizer=payload["optimizer"], scheduler=payload["scheduler"],
                            rng=payload["rng"])
        if state.progress.task_done:
            set_rng_state(state.rng)
        if self.is_main:
            progress = state.progress
            where = "end of" if progress.task_done else f"step {progress.step} of"
            print(f"[cl-run] resuming from {path.name}: {where} task {progress.task + 1}", flush=True)
        return state
