"""Endless, seeded reshuffling: the one way cl-run draws examples without end (the loop's
task batches, replay's buffer draws, the infinite schedule's anneal batches)."""
from __future__ import annotations

import random
from typing import Callable, Iterator, Optional


class EndlessShuffle:
    """Indices from endless passes over range(n), each pass a new shuffle, taken in order.

    `rng` shuffles every pass in turn (its state carries on from pass to pass, and may be
    shared with other draws); `seed_of_pass(e)` instead seeds pass e on its own, so pass e
    is the same whatever came before it."""

    def __init__(self, n: int, rng: Optional[random.Random] = None,
                 seed_of_pass: Optional[Callable[[int], str]] = None) -> None:
        if n <= 0:
            raise ValueError("EndlessShuffle needs at least one item")
        if (rng is None) == (seed_of_pass is None):
            raise ValueError("give exactly one of rng and seed_of_pass")
        self.n, self.rng, self.seed_of_pass = n, rng, seed_of_pass
        self.passes = 0
        self._order: list[int] = []
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._order):
            self._order = list(range(self.n))
            rng = self.rng if self.rng is not None else random.Random(self.seed_of_pass(self.passes))
            rng.shuffle(self._order)
            self._pos = 0
            self.passes += 1
        self._pos += 1
        return self._order[self._pos - 1]

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next()
