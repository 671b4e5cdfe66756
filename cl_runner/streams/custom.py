"""User-defined streams: a list of entries, one task each, read from folders, file pairs
or Hugging Face datasets.

An entry (a dict, e.g. one item of a YAML list) has a `name` and exactly one source:
- `path`: a folder in TRACE layout (`train.json`, `test.json` of prompt/answer; `eval.json`
  is ignored unless named by `test_split`) or O-LoRA layout (`train.json`, `test.json` of
  sentence/label, plus `labels.json`); `.jsonl` files are accepted as well;
- `train` and `test`: two JSON-list or JSON Lines files;
- `hf_dataset`: a Hugging Face dataset id or local dataset folder, with optional `config`,
  `train_split` and `test_split`, read from the local cache only (see `load_custom`).
Field names default to prompt/answer, or to sentence/label when the data is in O-LoRA
layout (a labels.json, or records with sentence and label but no prompt).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cl_runner.streams.olora import (
    OLORA_INSTRUCTIONS,
    UNKNOWN_LABEL_POLICIES,
    check_labels,
    format_olora_prompt,
    read_labels,
)
from cl_runner.streams.records import read_records, require_fields, require_nonempty, resolve_child, subsample
from cl_runner.streams.task import Example, Task

ALLOWED_KEYS = (
    "name",
    "path",
    "train",
    "test",
    "hf_dataset",
    "config",
    "train_split",
    "test_split",
    "prompt_field",
    "answer_field",
    "scorer",
    "labels",
    "max_new_tokens",
    "task_type",
    "unknown_labels",
)
_STRING_KEYS = (
    "path", "train", "test", "hf_dataset", "config", "train_split", "test_split",
    "prompt_field", "answer_field", "scorer", "task_type",
)
DEFAULT_SCORER = "exact_match"
TRACE_FIELDS = ("prompt", "answer")
OLORA_FIELDS = ("sentence", "label")
# O-LoRA-layout tasks get the O-LoRA generation budget; other tasks the Task default.
OLORA_LAYOUT_MAX_NEW_TOKENS = 50


def load_custom(
    entries: Sequence[Mapping[str, Any]],
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    *,
    allow_download: bool = False,
) -> list[Task]:
    """One Task per entry, in the order given.

    `hf_dataset` entries are read with the Hugging Face hub forced offline unless
    `allow_download` is set: a dataset missing from the local cache fails at once with a
    FileNotFoundError saying how to fetch it, instead of retrying the network.
    """
    return [_load_entry(entry, max_train, max_test, seed, allow_download) for entry in check_entries(entries)]


def check_entries(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The entries checked without reading any data (names given and unique, one source,
    known keys and types), so a malformed stream fails before a run starts."""
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise ValueError(f"custom stream: expected a list of task entries, got {type(entries).__name__}")
    if not entries:
        raise ValueError("custom stream: the list of task entries is empty")
    checked: list[dict[str, Any]] = []
    for index, raw in enumerate(entries):
        entry = _check_entry(raw, index)
        if entry["name"] in (e["name"] for e in checked):
            raise ValueError(f"custom stream: task name '{entry['name']}' is used twice (entries "
                             f"{[e['name'] for e in checked].index(entry['name'])} and {index}); names must be unique")
        checked.append(entry)
    return checked


def _check_entry(raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"custom stream: entry {index} must be a mapping with a 'name' and a source, got {type(raw).__name__}")
    # A null value means "not given" (typed configs carry every optional key as None).
    entry = {key: value for key, value in raw.items() if value is not None}
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"custom stream: entry {index} needs a non-empty string 'name', got {name!r}")
    where = f"custom task '{name}'"
    unknown = [k for k in entry if k not in ALLOWED_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(ALLOWED_KEYS)}")

    has_pair = "train" in entry or "test" in entry
    given = {"path": "path" in entry, "train/test": has_pair, "hf_dataset": "hf_dataset" in entry}
    sources = [source for source, present in given.items() if present]
    if len(sources) != 1:
        raise ValueError(
            f"{where}: give exactly one source: 'path' (a folder), 'train' and 'test' (two files), "
            f"or 'hf_dataset'; got {', '.join(sources) or 'none'}"
        )
    if has_pair and not ("train" in entry and "test" in entry):
        raise ValueError(f"{where}: 'train' and 'test' go together; give both files")
    if "config" in entry and "hf_dataset" not in entry:
        raise ValueError(f"{where}: 'config' applies to 'hf_dataset' only")
    if has_pair and ("train_split" in entry or "test_split" in entry):
        raise ValueError(f"{where}: 'train_split'/'test_split' apply to 'path' and 'hf_dataset', not to a train/test file pair")

    for key in _STRING_KEYS:
        if key in entry and (not isinstance(entry[key], (str, Path)) or not str(entry[key]).strip()):
            raise ValueError(f"{where}: '{key}' must be a non-empty string, got {entry[key]!r}")
    if "labels" in entry:
        labels = entry["labels"]
        is_list = isinstance(labels, Sequence) and not isinstance(labels, str)
        if not is_list or not labels or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"{where}: 'labels' must be a non-empty list of strings, got {labels!r}")
        entry["labels"] = list(labels)
    if "max_new_tokens" in entry:
        value = entry["max_new_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: 'max_new_tokens' must be a positive integer, got {value!r}")
    if entry.get("unknown_labels", "error") not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(f"{where}: 'unknown_labels' must be one of {UNKNOWN_LABEL_POLICIES}, got {entry['unknown_labels']!r}")
    if "task_type" in entry and entry["task_type"] not in OLORA_INSTRUCTIONS:
        raise ValueError(f"{where}: unknown 'task_type' {entry['task_type']!r}; O-LoRA task types: {', '.join(OLORA_INSTRUCTIONS)}")
    return entry


def _load_entry(entry: dict[str, Any], max_train: int | None, max_test: int | None, seed: int, allow_download: bool) -> Task:
    name = entry["name"]
    if "path" in entry:
        source = _FolderSource(entry)
    elif "hf_dataset" in entry:
        source = _HFSource(entry, allow_download)
    else:
        source = _FilePairSource(entry)

    labels = entry.get("labels", source.labels)
    olora_layout = source.olora_layout
    prompt_field = entry.get("prompt_field", OLORA_FIELDS[0] if olora_layout else TRACE_FIELDS[0])
    answer_field = entry.get("answer_field", OLORA_FIELDS[1] if olora_layout else TRACE_FIELDS[1])
    labels = labels if labels is not None else source.class_names(answer_field)
    task_type = entry.get("task_type")
    if task_type is not None and labels is None and OLORA_INSTRUCTIONS[task_type] is not None:
        raise ValueError(f"custom task '{name}': 'task_type' {task_type} puts the options in the prompt; give 'labels' or a labels.json")

    def examples(split: str, cap: int | None) -> list[Example]:
        records, origin, indices = source.records(split, cap, seed)
        if indices is None:  # a whole file; a hub split is checked for rows as it loads
            require_nonempty(records, origin)
        require_fields(records, (prompt_field, answer_field), origin, indices=indices)
        if labels is not None:
            records = check_labels(records, labels, origin, answer_field, entry.get("unknown_labels", "error"), indices)
        # Files are checked whole, then sampled; a hub dataset is sampled as it is read
        # (so with unknown_labels='drop' it may give fewer than the cap).
        chosen = records if indices is not None else subsample(records, cap, seed)
        return [
            Example(
                prompt=format_olora_prompt(task_type, name, labels or [], r[prompt_field]) if task_type else r[prompt_field],
                answer=r[answer_field],
                task=name,
            )
            for r in chosen
        ]

    return Task(
        name=name,
        train=examples("train", max_train),
        test=examples("test", max_test),
        scorer=entry.get("scorer", DEFAULT_SCORER),
        labels=labels,
        max_new_tokens=entry.get("max_new_tokens", OLORA_LAYOUT_MAX_NEW_TOKENS if olora_layout else Task.max_new_tokens),
    )


def _looks_like_olora(records: list[Any]) -> bool:
    first = records[0] if records else None
    return isinstance(first, dict) and "sentence" in first and "label" in first and "prompt" not in first


class _FolderSource:
    """A folder with <split>.json or <split>.jsonl files (and labels.json in O-LoRA layout)."""

    def __init__(self, entry: dict[str, Any]):
        self.name = entry["name"]
        self.folder = Path(entry["path"]).expanduser()
        self.splits = {"train": entry.get("train_split", "train"), "test": entry.get("test_split", "test")}
        if not self.folder.is_dir():
            what = "is a file; use 'train:' and 'test:' for files" if self.folder.is_file() else "does not exist"
            raise FileNotFoundError(
                f"custom task '{self.name}': path={self.folder} {what}; 'path' must be a folder holding "
                f"{self.splits['train']}.json and {self.splits['test']}.json (or .jsonl), plus labels.json in O-LoRA layout"
            )
        labels_file = resolve_child(self.folder, "labels.json")
        self.labels = read_labels(labels_file) if labels_file is not None else None
        self._cache: dict[str, list[Any]] = {}
        self.olora_layout = self.labels is not None or _looks_like_olora(self._read("train")[0])

    def _read(self, split: str) -> tuple[list[Any], Path]:
        stem = self.splits[split]
        for suffix in (".json", ".jsonl"):
            path = resolve_child(self.folder, stem + suffix)
            if path is not None and path.is_file():
                if split not in self._cache:
                    self._cache[split] = read_records(path)
                return self._cache[split], path
        raise FileNotFoundError(f"custom task '{self.name}': no {stem}.json or {stem}.jsonl in {self.folder}")

    def records(self, split: str, cap: int | None, seed: int) -> tuple[list[Any], Path, None]:
        return (*self._read(split), None)

    def class_names(self, answer_field: str) -> list[str] | None:
        return None


class _FilePairSource:
    labels = None

    def __init__(self, entry: dict[str, Any]):
        self.name = entry["name"]
        self.files = {}
        for split in ("train", "test"):
            path = Path(entry[split]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"custom task '{self.name}': {split}={path} does not exist (a JSON list or JSON Lines file)")
            self.files[split] = (read_records(path), path)
        self.olora_layout = _looks_like_olora(self.files["train"][0])

    def records(self, split: str, cap: int | None, seed: int) -> tuple[list[Any], Path, None]:
        return (*self.files[split], None)

    def class_names(self, answer_field: str) -> list[str] | None:
        return None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Force the hub offline for the duration of one load.

    `datasets` and `huggingface_hub` read HF_HUB_OFFLINE once at import, so setting the
    environment variable here would be too late; their module flags are what they check.
    Without this, a dataset missing from the cache costs ~25 s of network retries before
    the error on a machine without network.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


class _HFSource:
    """A Hugging Face dataset (hub id or local dataset folder), from the local cache.

    Capping happens before rows are materialised, so only the chosen rows are converted
    and checked (a hub dataset may have millions of rows).
    """

    labels = None

    def __init__(self, entry: dict[str, Any], allow_download: bool):
        self.name = entry["name"]
        self.dataset_id = str(entry["hf_dataset"])
        self.config = entry.get("config")
        self.splits = {"train": entry.get("train_split", "train"), "test": entry.get("test_split", "test")}
        self.data = {split: self._load(split, allow_download) for split in ("train", "test")}
        first = self.data["train"][0] if len(self.data["train"]) else None
        self.olora_layout = _looks_like_olora([first] if first is not None else [])

    def _describe(self) -> str:
        config = f", config '{self.config}'" if self.config else ""
        return f"hf_dataset '{self.dataset_id}'{config}"

    def _load(self, split: str, allow_download: bool):
        import datasets

        split_name = self.splits[split]
        try:
            with _hub_offline(not allow_download):
                return datasets.load_dataset(self.dataset_id, self.config, split=split_name)
        except (ConnectionError, FileNotFoundError) as err:
            args = repr(self.dataset_id) + (f", {self.config!r}" if self.config else "")
            raise FileNotFoundError(
                f"custom task '{self.name}': {self._describe()} is not in the local Hugging Face cache "
                f"({datasets.config.HF_DATASETS_CACHE}) and downloads are off. Fetch it once on a machine "
                f"with network and the same HF_HOME: python -c \"import datasets; datasets.load_dataset({args})\", "
                f"or export it to JSON files and use 'path:' or 'train:'/'test:' ({type(err).__name__}: {err})"
            ) from err
        except ValueError as err:
            # Unknown config or split names come back as ValueError from `datasets`.
            raise ValueError(f"custom task '{self.name}': {self._describe()}, split '{split_name}': {err}") from err

    def records(self, split: str, cap: int | None, seed: int) -> tuple[list[Any], str, list[int]]:
        import datasets

        ds = self.data[split]
        origin = f"{self._describe()} split '{self.splits[split]}'"
        require_nonempty(ds, origin)
        chosen = subsample(range(len(ds)), cap, seed)
        # ClassLabel columns hold integers; the tasks are scored on label strings.
        class_names = {
            column: feature.names for column, feature in ds.features.items() if isinstance(feature, datasets.ClassLabel)
        }
        records = []
        for row in ds.select(chosen):
            row = dict(row)
            for column, names in class_names.items():
                if isinstance(row.get(column), int) and 0 <= row[column] < len(names):
                    row[column] = names[row[column]]
            records.append(row)
        return records, origin, chosen

    def class_names(self, answer_field: str) -> list[str] | None:
        """The label names of a ClassLabel answer column, used as the task's labels."""
        import datasets

        feature = self.data["train"].features.get(answer_field)
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


__all__ = ["ALLOWED_KEYS", "check_entries", "load_custom"]
