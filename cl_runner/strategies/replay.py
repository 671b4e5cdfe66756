"""Experience replay from a buffer of past tasks' examples (add-on `replay`).

Two ways to use the buffer:

* `mode: mix` (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
  Pre-train LLMs"): while training task t, a share `ratio` of every batch comes from the
  buffer, spread uniformly over the past tasks (0.05 for a weak distribution shift, 0.25
  for a strong one). `compute_equivalent: true` keeps the batch size and the step count:
  replay takes slots the new data would have used, so less new data is seen.
  `compute_equivalent: false` keeps every new example and enlarges the batch.
* `mode: separate_pass` (TRACE, Wang et al. 2023, as its replay script runs it): after
  the task's own steps, one extra pass over the buffer (plus, optionally, general
  instruction data) with the same optimizer and LR schedule; no mixing inside batches.
  TRACE keeps a share of each past task: `share: 0.1 selection: first per_task: null`.

The buffer is filled in `after_task` (`per_task` examples or a `share` of each task, chosen
at random with a seed fixed by (seed, task) or taken from the front) and checkpointed.
All sampling is seeded by (seed, task), so a resumed run rebuilds the same batches.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.strategies.registry import ADDON, register
from cl_runner.streams.sampling import EndlessShuffle
from cl_runner.streams.task import Example, Task

MODES = ("mix", "separate_pass")
SELECTIONS = ("random", "first")


@dataclass
class ReplayConfig:
    enabled: bool = False
    # Share of every batch drawn from the buffer (mode: mix), in [0, 1).
    ratio: float = 0.05
    # Buffer size per past task; null = use `share` (both null: keep every example).
    per_task: Optional[int] = 1000
    # Buffer size as a share of each task's training set, in (0, 1]; set per_task: null to use it.
    share: Optional[float] = None
    # Which examples of a task enter the buffer: random (seeded) | first
    selection: str = "random"
    # mix: true keeps batch size and step count (replay replaces new examples); false adds
    # replay examples on top of the full batch of new ones (larger batches).
    compute_equivalent: bool = True
    # mix (replay inside every batch) | separate_pass (TRACE: an extra pass after the task)
    mode: str = "mix"
    # separate_pass: passes over the replay examples after each task.
    pass_epochs: float = 1.0
    # TRACE root holding Lima/train.json: general instruction data replayed from task 1 on,
    # as one more "past task" (causal and seq2seq models only). null = none.
    extra_data_dir: Optional[str] = None
    # Cap on the extra examples (seeded sample); null = all.
    extra_max_examples: Optional[int] = None


def replay_slots(share: float, seen_before: int, size: int) -> int:
    """Replay examples for the next batch of `size` when `seen_before` slots came before:
    the running total is kept at round(share * slots so far). This is exactly
    round(share * B) per batch when share * B is an integer, and keeps the long-run share
    right when it is not (0.05 of a batch of 16 would otherwise round to no replay at all)."""
    def total(n: int) -> int:
        return math.floor(share * n + 0.5 + 1e-9)

    return total(seen_before + size) - total(seen_before)


class BalancedSampler:
    """Draws examples uniformly over tasks: the tasks are visited in shuffled rounds (counts
    per task differ by at most one), and each task's examples in shuffled passes."""

    def __init__(self, pools: dict[str, list[Example]], rng: random.Random) -> None:
        self.pools = {k: v for k, v in pools.items() if v}
        self.keys = sorted(self.pools)
        # one generator for the rounds and every pool, so the draws follow from one seed
        self.rounds = EndlessShuffle(len(self.keys), rng=rng) if self.keys else None
        self.orders = {k: EndlessShuffle(len(v), rng=rng) for k, v in self.pools.items()}

    def draw(self, k: int) -> list[Example]:
        out = []
        for _ in range(k):
            key = self.keys[self.rounds.next()]
            out.append(self.pools[key][self.orders[key].next()])
        return out


def select_examples(examples: list[Example], per_task: Optional[int], share: Optional[float], selection: str,
                    rng: random.Random) -> list[Example]:
    """The part of a task's training set that enters the buffer (kept in dataset order)."""
    n = len(examples)
    if share is not None:
        k = min(n, max(1, int(round(share * n))))
    elif per_task is not None:
        k = min(n, per_task)
    else:
        k = n
    if selection == "first" or k == n:
        return list(examples[:k])
    return [examples[i] for i in sorted(rng.sample(range(n), k))]


@register("replay", config=ReplayConfig, kind=ADDON, order=20,
          summary="experience replay: stored examples of earlier tasks mixed into every batch",
          example=("replay.ratio=0.25",))
class Replay(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        # Text, at most per_task examples of each past task (all of a task's examples without
        # a cap): at most model.max_length bytes each as a bound, prompt and answer together.
        c, cfg = self.config, inputs.cfg
        per_task = c.per_task if c.per_task is not None else None
        bound = None if per_task is None else per_task * max(0, inputs.n_tasks - 1) * int(cfg.model.max_length) * 4
        what = (f"at most {per_task} examples per past task" if per_task is not None
                else "a share of every past task's examples")
        return StrategyEstimate(self.name, host_bytes=bound or 0, notes=[
            f"replay: its buffer is examples in host memory, {what} (none on the GPU)"])

    def __init__(self, config: ReplayConfig) -> None:
        super().__init__(config)
        for key, allowed in (("mode", MODES), ("selection", SELECTIONS)):
            require_choice(getattr(config, key), f"replay.{key}", allowed)
        require(0.0 <= config.ratio < 1.0, "replay.ratio", config.ratio,
                "use a share in [0, 1) (0.05 weak shift, 0.25 strong shift)")
        if config.per_task is not None and config.share is not None:
            raise ValueError(f"replay.per_task={config.per_task} and replay.share={config.share} are both set; "
                             "set one of them and the other to null")
        require(config.per_task is None or config.per_task >= 1, "replay.per_task", config.per_task,
                "use a positive count or null")
        require(config.share is None or 0.0 < config.share <= 1.0, "replay.share", config.share,
                "use a share in (0, 1] or null")
        require(config.pass_epochs > 0, "replay.pass_epochs", config.pass_epochs, "use a value > 0")
        require(config.extra_max_examples is None or config.extra_max_examples >= 1, "replay.extra_max_examples",
                config.extra_max_examples, "use a positive count or null")
        self.buffer: dict[int, list[Example]] = {}
        self.replayed: dict[int, int] = {}  # task -> replay examples in its planned batches
        self.anneal_replayed: dict[int, int] = {}  # task -> replay examples in its anneal's batches
        self.pass_split: dict[int, int] = {}  # separate_pass: task -> its own steps (before the pass)
        self._extra: Optional[list[Example]] = None

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        if self.config.extra_data_dir is not None and ctx.model_kind == "classifier":
            raise ValueError("replay.extra_data_dir adds free-text instruction data, which a classifier cannot "
                             "train on; set replay.extra_data_dir=null for model.kind=classifier")

    # -- buffer ---------------------------------------------------------------------
    def after_task(self, t: int, task: Task) -> None:
        rng = random.Random(f"{self.ctx.seed}:replay-buffer:{t}")
        cfg = self.config
        self.buffer[t] = select_examples(task.train, cfg.per_task, cfg.share, cfg.selection, rng)

    def extra_examples(self) -> list[Example]:
        if self.config.extra_data_dir is None:
            return []
        if self._extra is None:
            from cl_runner.streams.trace import load_trace_replay_source

            self._extra = load_trace_replay_source(self.config.extra_data_dir, self.config.extra_max_examples,
                                                   self.ctx.seed)
        return self._extra

    def pools(self, t: int) -> dict[str, list[Example]]:
        """What task t replays: the buffers of tasks 0..t-1 and the extra data, by name."""
        pools = {f"task{k}": v for k, v in sorted(self.buffer.items()) if k < t and v}
        if self.extra_examples():
            pools["extra"] = self.extra_examples()
        return pools

    # -- data -----------------------------------------------------------------------
    def num_train_steps(self, t: int, steps: int) -> int:
        if self.config.mode != "separate_pass":
            return steps
        self.pass_split[t] = steps
        return steps + self._pass_steps(t) if steps > 0 else steps

    def _global_batch(self) -> tuple[int, int]:
        tr = self.ctx.trainer
        return int(tr.batch_size) * self.ctx.accelerator.num_processes, int(tr.grad_accum)

    def _pass_steps(self, t: int) -> int:
        n = sum(len(v) for v in self.pools(t).values())
        if n == 0:
            return 0
        batch, accum = self._global_batch()
        return math.ceil(self.config.pass_epochs * n / (batch * accum))

    def compose_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        pools = self.pools(t)
        if not pools or (self.config.mode == "separate_pass" and t not in self.pass_split):
            self.replayed[t] = 0
            return batches
        rng = random.Random(f"{self.ctx.seed}:replay:{t}")
        if self.config.mode == "separate_pass":
            return self._separate_pass(t, batches, pools, rng)
        if self.config.ratio == 0:
            self.replayed[t] = 0
            return batches
        return self._mixed(t, batches, pools, rng, self.replayed)

    def compose_anneal_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        """mix: the anneal after task t (lr_schedule infinite) mixes the buffer in as task t's
        batches do, with its own seed and count. separate_pass: the anneal keeps the task's own
        data (the replay pass was part of the task's steps)."""
        pools = self.pools(t)
        if self.config.mode != "mix" or self.config.ratio == 0 or not pools:
            self.anneal_replayed[t] = 0
            return batches
        rng = random.Random(f"{self.ctx.seed}:replay-anneal:{t}")
        return self._mixed(t, batches, pools, rng, self.anneal_replayed)

    def _mixed(self, t: int, batches: Iterator[list[Example]], pools: dict[str, list[Example]],
               rng: random.Random, counts: dict[int, int]) -> Iterator[list[Example]]:
        ratio = self.config.ratio
        equivalent = self.config.compute_equivalent
        # compute_equivalent: replay takes `ratio` of the B slots; otherwise k replay
        # examples are added to the B new ones with k / (B + k) = ratio.
        share = ratio if equivalent else ratio / (1.0 - ratio)
        sampler = BalancedSampler(pools, rng)
        waiting: deque[Example] = deque()  # new examples pushed out of a batch, in stream order
        seen = total = 0
        for batch in batches:
            k = replay_slots(share, seen, len(batch))
            seen += len(batch)
            if equivalent:
                waiting.extend(batch)
                new = [waiting.popleft() for _ in range(len(batch) - k)]
            else:
                new = list(batch)
            mixed = new + sampler.draw(k)
            rng.shuffle(mixed)  # spread replay over the processes' slices of the batch
            total += k
            yield mixed
        counts[t] = total

    def _separate_pass(self, t: int, batches: Iterator[list[Example]], pools: dict[str, list[Example]],
                       rng: random.Random) -> Iterator[list[Example]]:
        batch_size, accum = self._global_batch()
        own = self.pass_split.get(t, 0) * accum
        pass_micro = self._pass_steps(t) * accum if own else 0
        for i, batch in enumerate(batches):
            if i >= own:
                break
            yield batch
        examples = [e for pool in pools.values() for e in pool]
        order: list[int] = []
        total = 0
        for _ in range(pass_micro):
            out = []
            while len(out) < batch_size:
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                out.append(examples[order.pop()])
            total += len(out)
            yield out
        self.replayed[t] = total

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": {t: [[e.prompt, e.answer, e.task] for e in examples] for t, examples in self.buffer.items()},
            "replayed": dict(self.replayed),
            "anneal_replayed": dict(self.anneal_replayed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = {int(t): [Example(*row) for row in rows] for t, rows in state.get("buffer", {}).items()}
        self.replayed = {int(t): int(n) for t, n in state.get("replayed", {}).items()}
        self.anneal_replayed = {int(t): int(n) for t, n in state.get("anneal_replayed", {}).items()}

    def extra_state_bytes(self) -> int:
        return sum(len(e.prompt.encode()) + len(e.answer.encode()) for v in self.buffer.values() for e in v)

    def report(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "ratio": self.config.ratio if self.config.mode == "mix" else None,
            "buffer_examples": {self.ctx.stream[t].name if self.ctx else str(t): len(v) for t, v in sorted(self.buffer.items())},
            "replayed_examples": {self.ctx.stream[t].name if self.ctx else str(t): n for t, n in sorted(self.replayed.items())},
            "anneal_replayed_examples": {self.ctx.stream[t].name if self.ctx else str(t): n
                                         for t, n in sorted(self.anneal_replayed.items())},
            "extra_examples": len(self._extra) if self._extra else 0,
        }
