"""Save and restore a run at task boundaries and every N steps.

A checkpoint holds everything a resumed run needs to continue exactly as if it had not
stopped: weights, optimizer and scheduler state, the strategy's state, RNG states, the
rows of R filled so far and where in the stream the run was. Writes are atomic (write a
temporary file, then rename) so a run killed mid-save leaves the previous checkpoint.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    task_seconds: list[dict[str, float]] = field(default_factory=list)
    train_tokens: int = 0
    train_seconds: float = 0.0
    global_step: int = 0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(progress: Progress) -> str:
    if progress.task_done:
        return f"task{progress.task:03d}_done.pt"
    return f"task{progress.task:03d}_{progress.step:07d}.pt"


def save_checkpoint(folder: Path, progress: Progress, model_state: dict, optimizer_state: Optional[dict],
                    scheduler_state: Optional[dict], strategy_state: dict, keep: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "progress": asdict(progress),
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "strategy": strategy_state,
        "rng": rng_state(),
    }
    path = folder / checkpoint_name(progress)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    _prune(folder, keep, path)
    return path


def _prune(folder: Path, keep: int, newest: Path) -> None:
    """Keep the newest `keep` checkpoints (by progress order in the file name)."""
    existing = sorted(p for p in folder.glob("task*.pt"))
    for old in existing[:-keep] if keep > 0 else []:
        if old != newest:
            old.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint furthest along the stream. Names sort by (task, step), and a
    task's `_done` file sorts after its step files."""
    found = sorted(folder.glob("task*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload["progress"] = Progress(**payload["progress"])
    return payload
