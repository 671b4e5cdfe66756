"""An episodic memory: examples kept from each finished task (GEM, A-GEM).

A seeded sample of each task's training set, fixed by (seed, task), kept in dataset order
and checkpointed as text, so a resumed run and every process hold the same memory.
"""
from __future__ import annotations

import random
from typing import Any

from cl_runner.streams.task import Example


class EpisodicMemory:
    def __init__(self, per_task: int) -> None:
        self.per_task = per_task
        self.examples: dict[int, list[Example]] = {}

    def add(self, t: int, train: list[Example], seed: int) -> None:
        """Keep `per_task` examples of task t (all of them when it has fewer)."""
        if len(train) <= self.per_task:
            self.examples[t] = list(train)
            return
        rng = random.Random(f"{seed}:episodic-memory:{t}")
        self.examples[t] = [train[i] for i in sorted(rng.sample(range(len(train)), self.per_task))]

    def tasks(self) -> list[int]:
        return sorted(t for t, kept in self.examples.items() if kept)

    def of(self, t: int) -> list[Example]:
        return self.examples.get(t, [])

    def union(self) -> list[Example]:
        """Every kept example, task by task."""
        return [e for t in self.tasks() for e in self.examples[t]]

    def text_bytes(self) -> int:
        return sum(len(e.prompt.encode()) + len(e.answer.encode()) for kept in self.examples.values() for e in kept)

    def state_dict(self) -> dict[str, Any]:
        return {t: [[e.prompt, e.answer, e.task] for e in kept] for t, kept in self.examples.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples = {int(t): [Example(*row) for row in rows] for t, rows in state.items()}


def draw(pool: list[Example], k: int, seed: str) -> list[Example]:
    """k examples of `pool` without replacement (all of it when k >= len(pool)), in pool
    order; `seed` names the draw, so a resumed run repeats it."""
    if k >= len(pool):
        return list(pool)
    rng = random.Random(seed)
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), k))]
