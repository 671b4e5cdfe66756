"""TRACE (Wang et al. 2023, "TRACE: A Comprehensive Benchmark for Continual Learning in
Large Language Models"): eight generation tasks read from the user's download.

Layout: `<data_dir>/<Task>/{train,eval,test}.json`, each a list of `{"prompt", "answer"}`
with the instruction already inside `prompt`; `<data_dir>/Lima/` is general instruction
data used as a replay source.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cl_runner.streams.records import (
    read_records,
    require_data_dir,
    require_fields,
    require_nonempty,
    resolve_child,
    subsample,
)
from cl_runner.streams.task import Example, Task


@dataclass(frozen=True)
class TraceTaskSpec:
    scorer: str
    max_new_tokens: int


# Generation budgets. The paper samples up to 512 new tokens everywhere; these are sized
# to each task's answers so evaluation does not pay for 512 tokens on a one-letter answer:
# - letter answers (C-STANCE, FOMC): 8, room for leading whitespace and the letter.
# - ScienceQA: the answer is "B\n<reasons>" but only the first character is scored, and it
#   is fixed by the first token or two; 8 keeps the rationale out of eval time.
#   Raise it (e.g. to 256) to inspect the generated reasons.
# - NumGLUE: numbers, which LLaMA tokenises digit by digit ("1250.75" is 7 tokens): 16.
# - Py150: one line of code: 64.
# - MeetingBank summaries and 20Minuten simplifications: a paragraph: 256.
TRACE_TASKS: dict[str, TraceTaskSpec] = {
    "C-STANCE": TraceTaskSpec("exact_match", 8),
    "FOMC": TraceTaskSpec("exact_match", 8),
    "MeetingBank": TraceTaskSpec("rouge_l", 256),
    "Py150": TraceTaskSpec("edit_similarity", 64),
    "ScienceQA": TraceTaskSpec("first_char", 8),
    "NumGLUE-cm": TraceTaskSpec("exact_match", 16),
    "NumGLUE-ds": TraceTaskSpec("exact_match", 16),
    "20Minuten": TraceTaskSpec("sari", 256),
}

TRACE_ORDERS: dict[str, list[str]] = {
    "default": ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
    "reverse": ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150", "MeetingBank", "ScienceQA"],
}

REPLAY_FOLDER = "Lima"
_FIELDS = ("prompt", "answer")


def load_trace(
    data_dir: str | Path | None,
    order: str | Sequence[str] = "default",
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    test_split: str = "test",
) -> list[Task]:
    """The TRACE tasks in `order` (a key of TRACE_ORDERS or a list of task names).

    `max_train`/`max_test` cap each task's splits by a seeded sample (None: all records,
    in file order). `test_split="eval"` scores on the eval files instead.
    """
    if test_split not in ("test", "eval"):
        raise ValueError(f"load_trace: test_split must be 'test' or 'eval', got {test_split!r}")
    root = _check_root(data_dir)
    tasks = []
    for name in _resolve_order(order):
        spec = TRACE_TASKS[name]
        task_dir = _task_dir(root, name)
        train = _read_split(task_dir, name, "train", max_train, seed)
        test = _read_split(task_dir, name, test_split, max_test, seed)
        tasks.append(Task(name=name, train=train, test=test, scorer=spec.scorer, max_new_tokens=spec.max_new_tokens))
    return tasks


def load_trace_replay_source(data_dir: str | Path | None, max_examples: int | None, seed: int) -> list[Example]:
    """General instruction data from `<data_dir>/Lima/train.json` for replay.

    Unlike the tasks, empty answers are accepted here (the Lima files have some).
    """
    root = _check_root(data_dir)
    folder = resolve_child(root, REPLAY_FOLDER)
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            f"TRACE replay source: no '{REPLAY_FOLDER}/' folder in {root}; it ships with the TRACE "
            f"download next to the task folders and must hold train.json"
        )
    path = _split_file(folder, REPLAY_FOLDER, "train")
    records = read_records(path)
    require_nonempty(records, path)
    require_fields(records, _FIELDS, path, allow_empty=("answer",))
    return [Example(prompt=r["prompt"], answer=r["answer"], task=REPLAY_FOLDER) for r in subsample(records, max_examples, seed)]


def _check_root(data_dir: str | Path | None) -> Path:
    layout = (
        "the folder that holds one folder per TRACE task ("
        + ", ".join(TRACE_TASKS)
        + "), each with train.json, eval.json and test.json, e.g. .../LLM-CL-Benchmark_5000"
    )
    return require_data_dir(data_dir, layout)


def _resolve_order(order: str | Sequence[str]) -> list[str]:
    if isinstance(order, str):
        if order not in TRACE_ORDERS:
            raise ValueError(f"unknown TRACE order '{order}'; known orders: {', '.join(TRACE_ORDERS)} (or a list of task names)")
        return list(TRACE_ORDERS[order])
    by_lower = {name.lower(): name for name in TRACE_TASKS}
    names = []
    for requested in order:
        name = by_lower.get(str(requested).lower())
        if name is None:
            raise ValueError(f"unknown TRACE task '{requested}'; known tasks: {', '.join(TRACE_TASKS)}")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"TRACE order lists a task twice: {names}")
    if not names:
        raise ValueError("TRACE order is empty; list at least one task")
    return names


def _task_dir(root: Path, name: str) -> Path:
    folder = resolve_child(root, name)
    if folder is None or not folder.is_dir():
        hint = _nested_root_hint(root)
        raise FileNotFoundError(
            f"TRACE task '{name}': no folder {root / name} (task_stream.data_dir={root}); "
            f"it must hold train.json, eval.json and test.json{hint}"
        )
    return folder


def _nested_root_hint(root: Path) -> str:
    """Users often point at the folder above the benchmark root; name the likely one."""
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(resolve_child(child, name) is not None for name in TRACE_TASKS):
            return f"; did you mean task_stream.data_dir={child}?"
    return ""


def _split_file(task_dir: Path, name: str, split: str) -> Path:
    path = resolve_child(task_dir, f"{split}.json")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"TRACE task '{name}': split file {task_dir / (split + '.json')} does not exist")
    return path


def _read_split(task_dir: Path, name: str, split: str, cap: int | None, seed: int) -> list[Example]:
    path = _split_file(task_dir, name, split)
    records = read_records(path)
    require_nonempty(records, path)
    require_fields(records, _FIELDS, path)
    return [Example(prompt=r["prompt"], answer=r["answer"], task=name) for r in subsample(records, cap, seed)]


__all__ = [
    "TRACE_ORDERS",
    "TRACE_TASKS",
    "TraceTaskSpec",
    "load_trace",
    "load_trace_replay_source",
]
