"""Built-in generative tasks a tiny random-init model learns in seconds on a CPU.

Each task maps a short string to another with one rule (reverse, sort, ...), and has its
own prefix and alphabet, so tasks share a model but are told apart by their input
format. Training them in sequence makes a tiny model forget visibly, which is what the
default run and the end-to-end tests need. Deterministic from the seed.

The default stream (increment, decrement, complement) is three per-digit maps of the same
inputs: output digit i depends on input digit i only, so the attention pattern a random
model has to discover (its slow, plateau-bound part) is learned once, on task 1, and
later tasks only rewrite the digit map, which takes a few dozen steps. The maps conflict
on every input, so sequential fine-tuning forgets old tasks completely. Streams that
change the attention pattern between tasks (reverse, then an element-wise map) sit on a
plateau for a seed- and thread-dependent number of steps.
"""
from __future__ import annotations

import random
import string
from typing import Callable

from cl_runner.streams.task import Example, Task

ALPHABETS = {"digits": string.digits, "letters": "abcdefghij", "upper": "ABCDEFGHIJ"}


def _shift(s: str, alphabet: str, by: int = 1) -> str:
    return "".join(alphabet[(alphabet.index(c) + by) % len(alphabet)] for c in s)


def _mirror(s: str, alphabet: str) -> str:
    return "".join(alphabet[len(alphabet) - 1 - alphabet.index(c)] for c in s)


# name -> (rule, alphabet, prefix)
RULES: dict[str, tuple[Callable[[str, str], str], str, str]] = {
    "copy": (lambda s, a: s, "digits", "C"),
    "reverse": (lambda s, a: s[::-1], "digits", "R"),
    "sort": (lambda s, a: "".join(sorted(s)), "digits", "S"),
    "increment": (_shift, "digits", "I"),  # 0->1, ..., 9->0
    "decrement": (lambda s, a: _shift(s, a, -1), "digits", "D"),
    "complement": (_mirror, "digits", "M"),  # d -> 9 - d
    "reverse_letters": (lambda s, a: s[::-1], "letters", "r"),
    "sort_letters": (lambda s, a: "".join(sorted(s)), "letters", "s"),
    "shift_letters": (_shift, "letters", "i"),
    "rotate_upper": (lambda s, a: s[1:] + s[:1], "upper", "T"),
}

DEFAULT_ORDER = ["increment", "decrement", "complement"]


def check_synthetic_names(names: list[str]) -> None:
    """ValueError naming the first name that is not a synthetic task (the caller says
    which key listed it)."""
    import difflib

    for name in names:
        if name not in RULES:
            close = difflib.get_close_matches(name, list(RULES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown synthetic task '{name}'; choose from {', '.join(RULES)}{hint}")


def synthetic_task(name: str, num_digits: int, train_size: int, test_size: int, seed: int) -> Task:
    try:
        check_synthetic_names([name])
    except ValueError as err:
        raise ValueError(f"task_stream.order: {err}") from None
    rule, alphabet_name, prefix = RULES[name]
    alphabet = ALPHABETS[alphabet_name]
    # One generator per task, seeded by task name too, so reordering a stream keeps data.
    rng = random.Random(f"{seed}:{name}")
    seen: set[str] = set()
    inputs: list[str] = []
    total = train_size + test_size
    capacity = len(alphabet) ** num_digits
    if total > capacity:
        raise ValueError(f"task_stream: {total} examples requested but only {capacity} distinct "
                         f"inputs of length {num_digits}; raise num_digits or lower train/test sizes")
    while len(inputs) < total:
        s = "".join(rng.choice(alphabet) for _ in range(num_digits))
        if s not in seen:  # train and test never share an input
            seen.add(s)
            inputs.append(s)
    examples = [Example(prompt=f"{prefix}:{s}=", answer=rule(s, alphabet), task=name) for s in inputs]
    return Task(name=name, train=examples[:train_size], test=examples[train_size:], scorer="exact_match",
                max_new_tokens=num_digits + 1)


def load_synthetic(order: list[str], num_digits: int, train_size: int, test_size: int, seed: int) -> list[Task]:
    return [synthetic_task(n, num_digits, train_size, test_size, seed) for n in (order or DEFAULT_ORDER)]
