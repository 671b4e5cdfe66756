"""The O-LoRA continual-learning benchmarks (Wang et al., EMNLP 2023 Findings): the
"standard" 4-task orders 1-3 and the "long sequence" 15-task orders 4-6.

Layout: `<data_dir>/<TaskType>/<Dataset>/{train,test,labels}.json`; train/test are lists
of `{"sentence", "label"}` and labels.json is the list of label strings.

Prompt: the O-LoRA release builds it with `add_task_name` and `add_dataset_name` on, so
every input starts with `Task:<TaskType>\\nDataset:<Dataset>\\n`, where <Dataset> is the
dataset's folder name as released (MNLI, SST-2, agnews, ...). COPA has no instruction and
no options (its sentence holds the question and both choices) but keeps that two-line
header: `Task:COPA\\nDataset:COPA\\n<sentence>\\nAnswer:`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cl_runner.streams.records import (
    RecordError,
    read_records,
    require_data_dir,
    require_fields,
    require_nonempty,
    resolve_child,
    subsample,
)
from cl_runner.streams.task import Example, Task

log = logging.getLogger(__name__)

# The O-LoRA paper's orders (Wang et al. 2023, Table 7): 1-3 the standard 4-task benchmark,
# 4-6 the long 15-task one. task_stream.order picks one by name (task_stream=cl_benchmark).
OLORA_ORDERS: dict[str, list[str]] = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": [
        "mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb",
        "yelp", "amazon", "sst-2", "dbpedia", "agnews", "multirc", "yahoo",
    ],
    "order5": [
        "multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte",
        "imdb", "sst-2", "dbpedia", "agnews", "yelp", "amazon", "yahoo",
    ],
    "order6": [
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb",
        "sst-2", "dbpedia", "agnews", "yahoo", "multirc", "boolqa", "wic",
    ],
}

# dataset name (as in the orders) -> (TaskType folder, Dataset folder) as released.
OLORA_DATASETS: dict[str, tuple[str, str]] = {
    "dbpedia": ("TC", "dbpedia"),
    "amazon": ("SC", "amazon"),
    "yahoo": ("TC", "yahoo"),
    "agnews": ("TC", "agnews"),
    "mnli": ("NLI", "MNLI"),
    "cb": ("NLI", "CB"),
    "wic": ("WiC", "WiC"),
    "copa": ("COPA", "COPA"),
    "qqp": ("QQP", "QQP"),
    "boolqa": ("BoolQA", "BoolQA"),
    "rte": ("NLI", "RTE"),
    "imdb": ("SC", "IMDB"),
    "yelp": ("SC", "yelp"),
    "sst-2": ("SC", "SST-2"),
    "multirc": ("MultiRC", "MultiRC"),
}

# Instruction per task type; each ends with a newline. COPA has none (see module doc).
OLORA_INSTRUCTIONS: dict[str, str | None] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.\n',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": (
        "According to the following passage and question, is the candidate answer true or false? "
        "Choose one from the option.\n"
    ),
    "WiC": (
        "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
        "Choose one from the option.\n"
    ),
    "COPA": None,
}

OLORA_SCORER = "exact_match_normalized"
# The O-LoRA scripts generate at most 50 tokens (generation_max_length 50).
OLORA_MAX_NEW_TOKENS = 50
UNKNOWN_LABEL_POLICIES = ("error", "drop")


def format_olora_prompt(task_type: str, dataset: str, labels: Sequence[str], sentence: str) -> str:
    """The generative-model input of one O-LoRA record (the target is the label string)."""
    if task_type not in OLORA_INSTRUCTIONS:
        raise ValueError(f"unknown O-LoRA task type '{task_type}'; known types: {', '.join(OLORA_INSTRUCTIONS)}")
    header = f"Task:{task_type}\nDataset:{dataset}\n"
    instruction = OLORA_INSTRUCTIONS[task_type]
    if instruction is None:
        return f"{header}{sentence}\nAnswer:"
    return f"{header}{instruction}Option: {', '.join(labels)} \n{sentence}\nAnswer:"


def load_olora(
    data_dir: str | Path | None,
    order: str | Sequence[str],
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    template: bool = True,
    unknown_labels: str = "error",
) -> list[Task]:
    """The datasets of `order` (a key of OLORA_ORDERS or a list of dataset names).

    `template=False` gives the bare sentence as prompt (encoder classifiers).
    `unknown_labels`: a record whose label is not in labels.json is an error ("error"),
    or is left out with a warning naming the file and count ("drop"). The released MNLI
    test file has such records: GLUE's "-" (no annotator majority).
    """
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(f"load_olora: unknown_labels must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown_labels!r}")
    root = _check_root(data_dir)
    tasks = []
    for name in resolve_olora_order(order):
        folder = _dataset_dir(root, name)
        labels = read_labels(_file(folder, name, "labels"))
        tasks.append(
            Task(
                name=name,
                train=_read_split(folder, name, "train", labels, max_train, seed, template, unknown_labels),
                test=_read_split(folder, name, "test", labels, max_test, seed, template, unknown_labels),
                scorer=OLORA_SCORER,
                labels=list(labels),
                max_new_tokens=OLORA_MAX_NEW_TOKENS,
            )
        )
    return tasks


def _read_split(
    folder: Path,
    name: str,
    split: str,
    labels: list[str],
    cap: int | None,
    seed: int,
    template: bool,
    unknown_labels: str,
) -> list[Example]:
    task_type, dataset = OLORA_DATASETS[name]
    path = _file(folder, name, split)
    records = read_records(path)
    require_nonempty(records, path)
    require_fields(records, ("sentence", "label"), path)
    records = check_labels(records, labels, path, "label", unknown_labels)
    return [
        Example(
            prompt=format_olora_prompt(task_type, dataset, labels, r["sentence"]) if template else r["sentence"],
            answer=r["label"],
            task=name,
        )
        for r in subsample(records, cap, seed)
    ]


def resolve_olora_order(order: str | Sequence[str]) -> list[str]:
    """Dataset names of a named order, or of a user's list (case ignored)."""
    if isinstance(order, str):
        if order not in OLORA_ORDERS:
            raise ValueError(
                f"unknown O-LoRA order '{order}'; known orders: {', '.join(OLORA_ORDERS)} (or a list of dataset names)"
            )
        return list(OLORA_ORDERS[order])
    names = [str(n).lower() for n in order]
    for requested, name in zip(order, names):
        if name not in OLORA_DATASETS:
            raise ValueError(f"unknown O-LoRA dataset '{requested}'; known datasets: {', '.join(OLORA_DATASETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"O-LoRA order lists a dataset twice: {names}")
    if not names:
        raise ValueError("O-LoRA order is empty; list at least one dataset")
    return names


def read_labels(path: Path) -> list[str]:
    """labels.json: a non-empty JSON list of distinct, non-empty strings."""
    labels = read_records(path)
    if not labels:
        raise RecordError(f"{path}: the label list is empty")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise RecordError(f"{path}: label {i} must be a non-empty string, got {label!r}")
    if len(set(labels)) != len(labels):
        raise RecordError(f"{path}: labels repeat: {labels}")
    return labels


def check_labels(
    records: list[dict],
    labels: Sequence[str],
    path: str | Path,
    field: str,
    policy: str = "error",
    indices: Sequence[int] | None = None,
) -> list[dict]:
    """Records whose `field` is one of `labels`; the others are an error or, with
    policy "drop", left out with a warning. `indices` as in `require_fields`."""
    allowed = set(labels)
    outside = [i for i, r in enumerate(records) if r[field] not in allowed]
    if not outside:
        return records
    if policy == "drop":
        log.warning("%s: left out %d of %d records whose '%s' is not in the labels %s", path, len(outside), len(records), field, list(labels))
        dropped = set(outside)
        return [r for i, r in enumerate(records) if i not in dropped]
    first = outside[0]
    raise RecordError(
        f"{path}: record {indices[first] if indices is not None else first}: field '{field}' is {records[first][field]!r}, not one of the labels "
        f"{list(labels)} ({len(outside)} of {len(records)} records in this file are outside the labels; "
        f"unknown_labels='drop' leaves them out with a warning)"
    )


def _check_root(data_dir: str | Path | None) -> Path:
    layout = (
        "the O-LoRA CL_Benchmark folder, which holds <TaskType>/<Dataset>/ folders "
        "(e.g. NLI/MNLI/, TC/agnews/, SC/SST-2/) each with train.json, test.json and labels.json"
    )
    return require_data_dir(data_dir, layout)


def available_olora_datasets(root: Path) -> list[str]:
    """The known datasets whose folder exists under `root`."""
    found = []
    for name, (task_type, dataset) in OLORA_DATASETS.items():
        type_dir = resolve_child(root, task_type)
        if type_dir is not None and resolve_child(type_dir, dataset) is not None:
            found.append(name)
    return found


def _dataset_dir(root: Path, name: str) -> Path:
    task_type, dataset = OLORA_DATASETS[name]
    type_dir = resolve_child(root, task_type)
    folder = resolve_child(type_dir, dataset) if type_dir is not None else None
    if folder is None or not folder.is_dir():
        present = ", ".join(available_olora_datasets(root)) or "none"
        raise FileNotFoundError(
            f"O-LoRA dataset '{name}': no folder {root / task_type / dataset} (task_stream.data_dir={root}); "
            f"it must hold train.json, test.json and labels.json. Datasets present under that root: {present}"
        )
    return folder


def _file(folder: Path, name: str, split: str) -> Path:
    path = resolve_child(folder, f"{split}.json")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"O-LoRA dataset '{name}': file {folder / (split + '.json')} does not exist")
    return path


__all__ = [
    "OLORA_DATASETS",
    "OLORA_INSTRUCTIONS",
    "OLORA_MAX_NEW_TOKENS",
    "OLORA_ORDERS",
    "OLORA_SCORER",
    "available_olora_datasets",
    "check_labels",
    "format_olora_prompt",
    "load_olora",
    "read_labels",
    "resolve_olora_order",
]
