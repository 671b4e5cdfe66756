"""MbPA++ (d'Autume et al. 2019, "Episodic Memory in Lifelong Language Learning"; TRACE's
model/Replay/MbPAplusplus.py): an episodic memory of training examples, used twice.

* Sparse experience replay (training): every `replay_every_examples` new examples of a
  task, extra optimizer steps on `replay_examples` examples drawn uniformly from the memory
  (the paper: 100 every 10,000, a 1% rate), as steps of their own between the task's steps,
  not mixed into its batches (as the paper does).
* Local adaptation (test time): for each test example, the K memories whose keys are
  nearest its key (Euclidean), L gradient steps on them of the task loss plus
  lambda * ||theta - theta_stored||^2 on the model's trainable weights, the prediction, and
  the stored weights put back bit for bit (Eq. 3 of the paper). `share_neighbours` > 1
  adapts once per group of test examples (an approximation, off by default).

The memory holds the examples the task's batches bring (each with `write_prob`, at most
`max_per_task` a task, no duplicates), written when the task's batches are planned with the
step that brings them (replay only draws what came before it). Keys come from a frozen
copy of the model as built (before any training): the mean of its last hidden states over
the prompt. The paper uses a frozen BERT's [CLS]; a decoder-only model has no [CLS] and its
first token sees only itself (TRACE takes it, from the model being trained, so its keys
also drift), while a mean over the prompt summarises the whole input for every model kind,
and a frozen encoder keeps the stored keys comparable with later queries. Keys are computed
after each task (the encoder never changes, so when does not matter), fp32, host memory.

All draws are seeded by (seed, task), so a resumed run and every process plan the same
batches; local adaptation runs in eval mode (no dropout) and draws nothing.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count, gib
from cl_runner.strategies.parts.local_adaptation import (
    adapt_locally,
    key_inputs,
    nearest_neighbours,
    pooled_keys,
    replay_steps_after,
    restore,
)
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Example, Task

DISTANCES = ("euclidean", "dot")


@dataclass
class MbPAConfig:
    name: str = "mbpa"
    # Chance that an example of a training batch enters the memory (paper: 1.0; its
    # ablation stores 50% / 10%). Seeded by (seed, task, position in the task's batches).
    write_prob: float = 1.0
    # At most this many examples stored per task (the first written); null = no cap.
    # TRACE keeps each task's first 100 micro-batches (200 examples per process).
    max_per_task: Optional[int] = None
    # Sparse replay: `replay_examples` from memory each time a task's count of new examples
    # passes a multiple of `replay_every_examples` (paper: 100 every 10,000, 1%). 0 = no
    # replay (TRACE's default replay_size is 0).
    replay_every_examples: int = 10000
    replay_examples: int = 100
    # Local adaptation: K neighbours (paper 32; TRACE 16), L gradient steps (paper 30; TRACE
    # 10 passes over the K neighbours one at a time), their learning rate (paper 1e-3; TRACE
    # steps the training optimizer), and lambda of the L2 pull (paper and TRACE 1e-3).
    # neighbours or local_steps 0: no local adaptation (sparse replay alone).
    neighbours: int = 32
    local_steps: int = 30
    local_lr: float = 1e-3
    local_l2: float = 1e-3
    # How neighbours are ranked: euclidean (the paper) | dot (largest inner product, TRACE).
    distance: str = "euclidean"
    # Test examples adapted together on the neighbours of their mean key: 1 = one
    # adaptation per test example (the paper); more is cheaper and approximate.
    share_neighbours: int = 1
    # Examples per forward when computing keys.
    key_batch_size: int = 32


@register("mbpa", config=MbPAConfig,
          summary="MbPA++: episodic memory with sparse replay, and local adaptation on the K nearest memories "
                  "before each test prediction",
          sharding="local adaptation takes per-example gradient steps on each process's own test examples, which "
                   "a sharded model's collective forward and reduce-scattered gradients would mix across processes",
          example=("strategy.replay_every_examples=32", "strategy.replay_examples=16", "strategy.neighbours=4",
                   "strategy.local_steps=2", "strategy.local_lr=0.01", "strategy.key_batch_size=16"))
class MbPA(Strategy):
    def __init__(self, config: MbPAConfig) -> None:
        super().__init__(config)
        require(0.0 < config.write_prob <= 1.0, "strategy.write_prob", config.write_prob,
                "use a chance in (0, 1] (1.0 stores every example, as the paper)")
        require(config.max_per_task is None or config.max_per_task >= 1, "strategy.max_per_task",
                config.max_per_task, "use a positive count or null")
        for key in ("replay_every_examples", "replay_examples", "neighbours", "local_steps"):
            require(getattr(config, key) >= 0, f"strategy.{key}", getattr(config, key), "use 0 or a positive integer")
        require(config.local_lr > 0, "strategy.local_lr", config.local_lr, "use a learning rate > 0 (paper: 1e-3)")
        require(config.local_l2 >= 0, "strategy.local_l2", config.local_l2, "use a value >= 0 (paper: 1e-3)")
        require_choice(config.distance, "strategy.distance", DISTANCES)
        for key in ("share_neighbours", "key_batch_size"):
            require(getattr(config, key) >= 1, f"strategy.{key}", getattr(config, key), "use a positive integer")
        self.memory: list[Example] = []
        self.written_by: list[int] = []  # task of each memory entry
        self.keys = torch.zeros(0, 0)  # keys of memory[:len(keys)], fp32, host memory
        self.replayed: dict[int, int] = {}  # task -> replayed examples
        self.adaptation_seconds = 0.0  # local adaptation, every row so far
        self.adaptations = 0
        self._new_steps: dict[int, int] = {}
        self._replay_after: dict[int, dict[int, int]] = {}  # task -> {new-data step: replay steps}
        self.key_encoder: Optional[torch.nn.Module] = None

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        c, cfg, facts = self.config, inputs.cfg, inputs.facts
        per_task = int(cfg.task_stream.get("train_size") or 0)
        per_task = math.ceil(per_task * c.write_prob)
        if c.max_per_task is not None:
            per_task = min(per_task, c.max_per_task)
        entries = per_task * inputs.n_tasks
        per_entry = facts.hidden * FP32 + int(cfg.model.max_length) * 4  # key + text (bound)
        encoder = facts.params * inputs.param_bytes
        adapt = 2 * inputs.trainable * inputs.param_bytes if c.neighbours and c.local_steps else 0
        return StrategyEstimate(
            self.name, state_bytes=encoder, transient_bytes=adapt,
            transient_note=f"local adaptation: a copy of the {count(inputs.trainable)} trainable weights and their "
                           f"gradients (plus the activations of {c.neighbours} neighbours)",
            host_bytes=entries * per_entry,
            notes=[f"mbpa: the frozen key encoder, a copy of the model ({gib(encoder)}); in host memory up to "
                   f"{entries} stored examples (task_stream.train_size x write_prob a task, at most max_per_task) "
                   f"with fp32 keys of {facts.hidden} values ({gib(per_entry)} each at most)"])

    # -- life cycle ---------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        import copy

        # The model as built, before any training (setup runs before a checkpoint is
        # restored, so a resumed run copies the same weights).
        self.key_encoder = copy.deepcopy(ctx.unwrapped_model).eval().requires_grad_(False)

    def num_train_steps(self, t: int, steps: int) -> int:
        per_step = self._examples_per_step()
        earlier = any(task < t for task in self.written_by)
        first = self._first_write(t, steps * per_step)
        plan = {}
        for s in range(1, steps + 1):
            n = replay_steps_after(s, per_step, self.config.replay_every_examples, self.config.replay_examples)
            # Nothing to replay before the first example is stored.
            if n and (earlier or (first is not None and first < s * per_step)):
                plan[s] = n
        self._new_steps[t], self._replay_after[t] = steps, plan
        return steps + sum(plan.values())

    def compose_batches(self, t: int, batches):
        accum = int(self.ctx.trainer.grad_accum)
        steps = self._new_steps.get(t, 0)
        plan = self._replay_after.get(t, {})
        self._forget_task(t)  # a resumed task writes its entries again, the same ones
        writes = self._write_draws(t)
        stored, cap = set(), self.config.max_per_task
        draws = random.Random(f"{self.ctx.seed}:mbpa-replay:{t}")
        out, replayed = [], 0
        for s in range(1, steps + 1):
            micro = [next(batches) for _ in range(accum)]
            out.extend(micro)
            for batch in micro:
                for example in batch:
                    room = cap is None or len(stored) < cap
                    if next(writes) and room and (example.prompt, example.answer) not in stored:
                        stored.add((example.prompt, example.answer))
                        self.memory.append(example)
                        self.written_by.append(t)
            for _ in range(plan.get(s, 0) * accum):
                size = len(micro[0])
                picked = sample_indices(len(self.memory), size, draws)
                out.append([self.memory[i] for i in picked])
                replayed += size
        self.replayed[t] = replayed
        return iter(out)

    def after_task(self, t: int, task: Task) -> None:
        self._key_new_entries()

    # -- evaluation -------------------------------------------------------------------------
    def predict_examples(self, t: int, k: Optional[int], task: Task, examples: list[Example],
                         predict: Callable[[list[Example]], list[str]]) -> list[str]:
        c = self.config
        if not examples or not c.neighbours or not c.local_steps or self.keys.shape[0] == 0:
            return predict(examples)
        model = self.ctx.unwrapped_model
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        started = time.perf_counter()
        queries = self._keys_of(examples)
        out: list[str] = []
        spent = time.perf_counter() - started
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(examples), c.share_neighbours):
                group = examples[start:start + c.share_neighbours]
                began = time.perf_counter()
                chosen = nearest_neighbours(self.keys, queries[start:start + len(group)], c.neighbours, c.distance)
                batch = self.ctx.collate([self.memory[i] for i in chosen])
                stored = adapt_locally(model, params, self.ctx.loss_fn, batch, c.local_steps, c.local_lr, c.local_l2)
                spent += time.perf_counter() - began
                try:
                    out.extend(predict(group))
                finally:
                    began = time.perf_counter()
                    restore(params, stored)
                    spent += time.perf_counter() - began
                self.adaptations += 1
        finally:
            model.train(was_training)
            self.adaptation_seconds += spent
        return out

    def test_time_seconds(self) -> float:
        return self.adaptation_seconds

    # -- helpers ----------------------------------------------------------------------------
    def _examples_per_step(self) -> int:
        tr = self.ctx.trainer
        return int(tr.batch_size) * self.ctx.accelerator.num_processes * int(tr.grad_accum)

    def _write_draws(self, t: int):
        """Whether each example of task t's batches, in order, is written (seeded)."""
        rng = random.Random(f"{self.ctx.seed}:mbpa-write:{t}")
        p = self.config.write_prob
        while True:
            yield p >= 1.0 or rng.random() < p

    def _first_write(self, t: int, positions: int) -> Optional[int]:
        draws = self._write_draws(t)
        return next((i for i in range(positions) if next(draws)), None)

    def _forget_task(self, t: int) -> None:
        kept = [i for i, task in enumerate(self.written_by) if task < t]
        self.memory = [self.memory[i] for i in kept]
        self.written_by = [self.written_by[i] for i in kept]
        self.keys = self.keys[: min(len(kept), self.keys.shape[0])]

    def _keys_of(self, examples: list[Example]) -> torch.Tensor:
        size = self.config.key_batch_size
        parts = [pooled_keys(self.key_encoder, key_inputs(self.ctx.collate, examples[i:i + size], self.ctx.model_kind),
                             self.ctx.model_kind) for i in range(0, len(examples), size)]
        return torch.cat(parts)

    def _key_new_entries(self) -> None:
        done = self.keys.shape[0] if self.keys.numel() else 0
        if done < len(self.memory):
            new = self._keys_of(self.memory[done:])
            self.keys = new if done == 0 else torch.cat([self.keys, new])

    # -- bookkeeping ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"memory": [[e.prompt, e.answer, e.task] for e in self.memory], "written_by": list(self.written_by),
                "keys": self.keys.clone(), "replayed": dict(self.replayed),
                "adaptation_seconds": self.adaptation_seconds, "adaptations": self.adaptations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = [Example(*row) for row in state["memory"]]
        self.written_by = [int(t) for t in state["written_by"]]
        self.keys = state["keys"].to("cpu", torch.float32)
        self.replayed = {int(t): int(n) for t, n in state.get("replayed", {}).items()}
        self.adaptation_seconds = float(state.get("adaptation_seconds", 0.0))
        self.adaptations = int(state.get("adaptations", 0))

    def extra_state_bytes(self) -> int:
        text = sum(len(e.prompt.encode()) + len(e.answer.encode()) for e in self.memory)
        return text + self.keys.numel() * self.keys.element_size()

    def report(self) -> dict[str, Any]:
        names = self.ctx.stream.names if self.ctx is not None else []
        named = {names[t] if t < len(names) else str(t): n for t, n in sorted(self.replayed.items())}
        return {"memory_examples": len(self.memory), "replayed_examples": named,
                "local_adaptations": self.adaptations, "local_adaptation_s": self.adaptation_seconds}


def sample_indices(n: int, size: int, rng: random.Random) -> list[int]:
    """`size` indices of range(n), uniformly without replacement while they last (then
    again, for a memory smaller than the draw)."""
    out: list[int] = []
    while len(out) < size:
        out += rng.sample(range(n), min(n, size - len(out)))
    return out
