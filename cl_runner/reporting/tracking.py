"""Where results go: the run folder on disk and, optionally, Weights & Biases.

Only the main process writes. The run folder is never shared: a new run gets a fresh
folder, and pointing `output_dir` at a folder that already holds a run is an error.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from cl_runner.reporting.outputs import CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE

RESULT_MARKERS = (METRICS_FILE, "checkpoints")


class RunFolderError(FileExistsError):
    pass


def new_run_folder(root: Path, experiment: str, label: str, output_dir: Optional[str]) -> Path:
    """Create the run's own folder; never reuse one that holds another run.

    Both ways are atomic, so of two runs started at once exactly one gets a folder:
    `output_dir` is claimed by creating its config.yaml exclusively (O_EXCL; the folder
    itself may exist beforehand, holding the user's own files), and the other run gets a
    RunFolderError; an auto-named folder under `root` is made with mkdir, and a name
    already taken gets a suffix (_2, _3, ...) instead."""
    if output_dir:
        folder = Path(output_dir)
        taken = (f"output_dir={output_dir!r} already holds a run; continue it with resume={output_dir} "
                 "or choose a new folder")
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"output_dir={output_dir!r} is a file, not a folder; choose a folder for the run")
        if any((folder / m).exists() for m in RESULT_MARKERS):
            raise RunFolderError(taken)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(folder / CONFIG_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise RunFolderError(taken) from None
        except (NotADirectoryError, PermissionError) as err:
            raise RunFolderError(f"output_dir={output_dir!r} cannot be made ({err.strerror}: {err.filename})") from None
        return folder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / experiment / f"{stamp}_{label}"
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=False)  # atomic: two runs never share
            return folder
        except FileExistsError:
            if not folder.parent.is_dir():  # a file where the experiment folder goes
                raise RunFolderError(f"run folder {folder} cannot be made: {folder.parent} is not a folder") from None
            n += 1
            folder = base.with_name(f"{base.name}_{n}")
        except (NotADirectoryError, PermissionError) as err:
            raise RunFolderError(f"run folder {folder} cannot be made ({err.strerror}: {err.filename})") from None


def link_into_sweep(folder: Path) -> Optional[Path]:
    """In a Hydra sweep (`cl-run -m`), a link to the job's run folder inside the sweep's
    folder (beside multirun.yaml), so that `cl-report <sweep folder>` finds exactly that
    sweep's runs; the run folder itself stays under results/<experiment_name>/. None
    outside a sweep, or where the file system refuses links (the run goes on)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        sweep = Path(HydraConfig.get().sweep.dir)
        sweep.mkdir(parents=True, exist_ok=True)
        link = sweep / folder.name
        link.symlink_to(folder.resolve(), target_is_directory=True)
        return link
    except (OSError, ValueError):
        return None


def discard_unstarted_run(folder: Path) -> None:
    """Undo a run folder whose run failed before training (a missing model or data folder):
    remove what cl-run itself wrote there (config.yaml, environment.json, the W&B offline
    files), then the folder if that leaves it empty. A user's own files are never touched."""
    if any((folder / m).exists() for m in RESULT_MARKERS):
        return
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    (folder / ENVIRONMENT_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / "wandb", ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: the user's files stay


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2))
    os.replace(tmp, path)


def write_accuracy_csv(path: Path, R: list[list[Optional[float]]], task_names: list[str],
                       columns: Optional[list[str]] = None) -> None:
    """R (or another matrix with one row per row of R, e.g. the monitor scores, whose
    task names are `columns`) as CSV."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tasks_learned", "after"] + list(columns if columns is not None else task_names))
        for i, row in enumerate(R):
            after = "before training" if i == 0 else task_names[i - 1]
            writer.writerow([i, after] + ["" if v is None else f"{v:.6f}" for v in row])


def write_predictions(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_item_scores(path: Path, scores: list[float]) -> None:
    """The per-item scores of one evaluation as a JSON list, written when
    evaluation.save_predictions is off (cl-report's bootstrap over test items reads them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([round(float(s), 6) for s in scores]))


class Tracker:
    """No-op tracker (logger=none, and every non-main process)."""

    def log_train(self, step: int, values: dict[str, float]) -> None:
        pass

    def log_eval(self, tasks_learned: int, values: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass


class WandbTracker(Tracker):
    """W&B run with a `tasks_learned` axis for every `eval/*` series, so the runs of a
    sweep overlay as forgetting curves. Offline by default: `wandb sync` uploads later."""

    def __init__(self, cfg: Any, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group, tags=list(cfg.tags),
            name=run_name, dir=str(run_dir), config=config, reinit="finish_previous")
        self.run.define_metric("tasks_learned")
        self.run.define_metric("eval/*", step_metric="tasks_learned")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")

    def log_train(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"train/step": step, **{f"train/{k}": v for k, v in values.items()}})

    def log_eval(self, tasks_learned: int, values: dict[str, Any]) -> None:
        clean = {f"eval/{k}": v for k, v in values.items() if v is not None}
        self.run.log({"tasks_learned": tasks_learned, **clean})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                self.run.summary[k] = v

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def make_tracker(cfg: Any, run_dir: Path, run_name: str, config: dict[str, Any], is_main: bool) -> Tracker:
    if not is_main or cfg.name == "none" or cfg.mode == "disabled":
        return Tracker()
    return WandbTracker(cfg, run_dir, run_name, config)
