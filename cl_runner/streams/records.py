"""Reading and checking record files (JSON lists or JSON Lines) for the stream loaders.

Every problem is reported with the file, the record index (0-based, in file order) and the
field, so a user can open the file and fix it; nothing is dropped silently.
"""
from __future__ import annotations

import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class RecordError(ValueError):
    """A record file, or a record in it, is not what the loader needs."""


def read_records(path: str | Path) -> list[Any]:
    """Read a file holding either one JSON list or JSON Lines (one value per line).

    The elements are returned as they are; `require_fields` checks their shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from err
    if not text.strip():
        raise RecordError(f"{path}: the file is empty; expected a JSON list or JSON Lines")

    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(
                f"{path}: starts like a JSON list but is not valid JSON: {err.msg} "
                f"at line {err.lineno}, column {err.colno}"
            ) from err
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    return _read_json_lines(path, text)


def _read_json_lines(path: Path, text: str) -> list[Any]:
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            hint = ""
            if lineno == 1 and line.lstrip().startswith("{"):
                hint = " (a single JSON object spread over several lines is not accepted: use a JSON list)"
            raise RecordError(
                f"{path}: line {lineno}, column {err.colno} is not valid JSON ({err.msg}); "
                f"expected a JSON list or JSON Lines, one record per line{hint}"
            ) from err
    return records


def require_fields(
    records: Sequence[Any],
    fields: Sequence[str],
    path: str | Path,
    *,
    allow_empty: Collection[str] = (),
    indices: Sequence[int] | None = None,
) -> None:
    """Check that every record is an object whose `fields` are strings.

    A string that is empty or only whitespace is an error too, unless its field is in
    `allow_empty` (e.g. the answers of a replay source). `indices` gives each record's
    position in its source when `records` is a sample of it, so errors name the real row.
    """
    for k, record in enumerate(records):
        where = f"{path}: record {indices[k] if indices is not None else k}"
        if not isinstance(record, dict):
            raise RecordError(f"{where} is a {type(record).__name__}, expected an object with fields {list(fields)}")
        for name in fields:
            if name not in record:
                present = ", ".join(map(repr, record)) or "none"
                raise RecordError(f"{where}: field '{name}' is missing (fields present: {present})")
            value = record[name]
            if not isinstance(value, str):
                raise RecordError(f"{where}: field '{name}' must be a string, got {type(value).__name__} ({value!r:.60})")
            if name not in allow_empty and not value.strip():
                raise RecordError(f"{where}: field '{name}' is empty")


def require_nonempty(records: Sequence[Any], path: str | Path) -> None:
    """A split file without records is a broken download or export, not an empty task."""
    if not records:
        raise RecordError(f"{path}: holds no records")


def subsample(records: Sequence[T], n: int | None, seed: int) -> list[T]:
    """Up to `n` records: a seeded shuffle, then the first `n`.

    `n=None` or `n >= len(records)` keeps every record in its original order, so an
    uncapped stream is the file as written.
    """
    if n is None or n >= len(records):
        return list(records)
    if n < 0:
        raise ValueError(f"subsample: n must be >= 0 or None, got {n}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:n]]


def resolve_child(parent: Path, name: str) -> Path | None:
    """The entry `name` of folder `parent`, matched exactly or else ignoring case.

    Downloads of the same benchmark spell folders differently (`IMDB`/`imdb`); a unique
    case-insensitive match is accepted, several are an error, none gives None.
    """
    exact = parent / name
    if exact.exists():
        return exact
    if not parent.is_dir():
        return None
    matches = sorted(p for p in parent.iterdir() if p.name.lower() == name.lower())
    if len(matches) > 1:
        raise ValueError(
            f"{parent}: several entries match '{name}' when case is ignored "
            f"({', '.join(p.name for p in matches)}); keep one"
        )
    return matches[0] if matches else None


def require_data_dir(data_dir: str | Path | None, layout: str) -> Path:
    """The stream's root folder, or a FileNotFoundError naming `task_stream.data_dir`
    and what the folder must hold (`layout`)."""
    if data_dir is None or str(data_dir).strip() == "":
        raise FileNotFoundError(f"task_stream.data_dir is not set; point it at {layout}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"task_stream.data_dir={root} does not exist or is not a folder; point it at {layout}")
    return root
