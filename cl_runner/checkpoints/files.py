"""Save and restore a run at task boundaries and every N steps.

A checkpoint holds everything a resumed run needs to continue exactly as if it had not
stopped: weights, optimizer and scheduler state, the strategy's state, RNG states, the
rows of R filled so far and where in the stream the run was. Writes are atomic (write a
temporary file, then rename) so a run killed mid-save leaves the previous checkpoint.

Checkpoints hold plain data only (tensors, numbers, strings, lists, tuples, dicts) and are
read with `torch.load(weights_only=True)`, so resuming a run folder that came from
elsewhere cannot run code: a file that holds any other pickled object is refused. A file
that cannot be read (truncated, corrupt) is passed over for the one before it, if any.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch


@dataclass
class Progress:
    """Where the run is: `task` is the 0-based task in progress (or next to start),
    `step` the optimizer steps done in it; `task_done` means training of `task` finished
    and it was evaluated."""

    task: int = 0
    step: int = 0
    task_done: bool = False
    R: list[list[Optional[float]]] = field(default_factory=list)
    # Time and work are the run's totals over every session (cl-run process) that worked
    # on it, each counted up to that session's last checkpoint: a session's work after its
    # last checkpoint is lost and redone by the next, and counts once, as redone. So
    # train_seconds + eval_seconds <= wall_seconds across any number of resumes.
    task_seconds: list[dict[str, float]] = field(default_factory=list)  # per task: train, eval (its row of R)
    train_tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # every row of R, "before training" included, and the monitor tasks
    wall_seconds: float = 0.0  # from building the run to now (saved with each checkpoint)
    sessions: int = 1  # cl-run processes whose work is in this record: 1 + the resumes
    global_step: int = 0
    # Per task, [step, loss] at up to ~50 evenly spaced steps: where each task's loss
    # reached its floor (metrics.json `train_loss_curves`).
    loss_curves: list[list[list[float]]] = field(default_factory=list)
    # Scores of the evaluation.monitor tasks (never trained), one row per row of R.
    monitor: list[list[Optional[float]]] = field(default_factory=list)


class CheckpointError(RuntimeError):
    """A checkpoint the run cannot use; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding pickled objects other than plain data: never loaded."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be read (truncated, corrupt, not a cl-run checkpoint)."""


# Checkpoints written before RNG states were stored as plain lists hold numpy's global
# RNG state as an ndarray of uint32; exactly the types that rebuild such an array are
# allowed on top of torch's weights_only set, so those runs still resume.
try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
_LEGACY_NUMPY_GLOBALS = [_np_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
PAYLOAD_KEYS = ("progress", "model", "optimizer", "scheduler", "strategy", "rng")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    # Plain numbers, no ndarray: weights_only loading takes it as it is.
    numpy_state = {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["kind"], np.asarray(saved["keys"], dtype=np.uint32), saved["pos"], saved["has_gauss"],
                 saved["cached_gaussian"])
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(progress: Progress) -> str:
    if progress.task_done:
        return f"task{progress.task:03d}_done.pt"
    return f"task{progress.task:03d}_{progress.step:07d}.pt"


def save_checkpoint(folder: Path, progress: Progress, model_state: dict, optimizer_state: Optional[dict],
                    scheduler_state: Optional[dict], strategy_state: dict, keep: int = 1,
                    model_scope: Optional[dict] = None) -> Path:
    """`model_scope` says what `model_state` covers when it is not the whole model
    (adapter runs: cl_runner/checkpoints/adapter.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "progress": asdict(progress),
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "strategy": strategy_state,
        "rng": rng_state(),
    }
    if model_scope is not None:
        payload["model_scope"] = model_scope
    path = folder / checkpoint_name(progress)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-save: the previous checkpoint stays, no stray file
        tmp.unlink(missing_ok=True)
        raise
    prune_checkpoints(folder, keep, path)
    return path


def prune_checkpoints(folder: Path, keep: int, newest: Path, pattern: str = "task*.pt",
                      remove: Callable[[Path], None] = lambda p: p.unlink(missing_ok=True)) -> None:
    """Keep the newest `keep` checkpoints (by progress order in the name). One further
    along than the one just written is left from before a fall-back past an unreadable
    checkpoint (see `load_latest_checkpoint`): the run has moved on without it. Sharded
    checkpoints (folders) pass their own pattern and `remove`."""
    existing = sorted(folder.glob(pattern))
    for stale in (p for p in existing if p.name > newest.name):
        remove(stale)
    existing = [p for p in existing if p.name <= newest.name]
    for old in existing[:-keep] if keep > 0 else []:
        if old != newest:
            remove(old)


_CHECKPOINT_NAME = re.compile(r"^task(\d+)_(done|\d+)\.(pt|dcp)$")


def resume_point(folder: Path) -> Optional[str]:
    """The newest checkpoint in `folder` (a file, or a sharded run's folder) and where in
    the stream it is, in words, e.g. `checkpoints/task001_0000030.pt (step 30 of task 2)`;
    None when there is none. Read from the names alone: nothing is loaded."""
    found = sorted(p for p in folder.glob("task*") if _CHECKPOINT_NAME.match(p.name)) if folder.is_dir() else []
    if not found:
        return None
    newest = found[-1]
    task, step, _ = _CHECKPOINT_NAME.match(newest.name).groups()
    where = f"end of task {int(task) + 1}" if step == "done" else f"step {int(step)} of task {int(task) + 1}"
    return f"{folder.name}/{newest.name} ({where})"


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint furthest along the stream. Names sort by (task, step), and a
    task's `_done` file sorts after its step files."""
    found = sorted(folder.glob("task*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def _unsafe_globals(path: Path) -> list[str]:
    """The pickled globals in `path` that weights_only loading refuses (read statically,
    nothing is executed); [] when the file cannot be read that far."""
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _refusal_reason(err: BaseException) -> str:
    """torch's reason for a weights_only refusal, without its advice paragraphs."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return reasons[0].split(". ")[0][:200] if reasons else _first_line(err)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read one checkpoint with weights_only loading. Raises UnsafeCheckpointError for a
    file holding other pickled objects, CorruptCheckpointError for one that cannot be read."""
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _refusal_reason(err)
        unsafe = _unsafe_globals(path)
        if unsafe or "GLOBAL" in reason or "Can only build" in reason:
            what = f"pickled {', '.join(unsafe)}" if unsafe else f"other pickled objects ({reason})"
            raise UnsafeCheckpointError(
                f"checkpoint {path} refused: it holds {what}, not the plain data cl-run writes (tensors, numbers, "
                "strings, lists, dicts); loading it could run code. Resume only run folders you trust, or delete "
                "this file to resume from an earlier checkpoint") from None
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable (corrupt? {reason})") from None
    except Exception as err:  # truncated zip, empty file, I/O error
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt? "
                                     f"{type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(payload, dict) or any(k not in payload for k in PAYLOAD_KEYS):
        raise CorruptCheckpointError(f"checkpoint {path} is not a cl-run checkpoint (expected the keys "
                                     f"{', '.join(PAYLOAD_KEYS)})")
    try:
        payload["progress"] = Progress(**payload["progress"])
    except TypeError as err:
        raise CorruptCheckpointError(f"checkpoint {path}: bad progress record ({err})") from None
    return payload


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


def load_latest_checkpoint(folder: Path, say: Any = None) -> Optional[tuple[Path, dict[str, Any]]]:
    """The furthest checkpoint that can be read, as (path, payload); None when there is
    none. An unreadable file is passed over for the one before it (kept when
    trainer.keep_checkpoints > 1), and `say` (default: stderr) is told; with none left
    to fall back to, CorruptCheckpointError. A refused (unsafe) file stops the resume."""
    found = sorted(folder.glob("task*.pt"), reverse=True) if folder.is_dir() else []
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    for i, path in enumerate(found):
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CorruptCheckpointError as err:
            if i + 1 == len(found):
                raise CorruptCheckpointError(
                    f"{err}; no earlier checkpoint to fall back to (trainer.keep_checkpoints > 1 keeps some). "
                    "Delete it to resume from the start of the run, or start a new run") from None
            say(f"[cl-run] warning: {err}; falling back to the previous checkpoint {found[i + 1].name}")
    return None
