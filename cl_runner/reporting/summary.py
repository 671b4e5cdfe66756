"""End of a run: metrics from R, metrics.json, R.csv, plots, and the printed summary."""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from cl_runner.checkpoints.files import Progress
from cl_runner.reporting.formatting import format_named_metric
from cl_runner.reporting.outputs import ACCURACY_FILE, METRICS_FILE, MONITOR_FILE
from cl_runner.reporting.tracking import write_accuracy_csv, write_json
from cl_runner.strategies.registry import strategy_label

if TYPE_CHECKING:
    from cl_runner.training.run import RunContext


def _plain(node: Any) -> dict[str, Any]:
    """A config group as plain data (evaluation.monitor is a list of entries)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def peak_memory_bytes() -> dict[str, Any]:
    """GPU peak allocation when on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"peak_memory_bytes": rss_kb * scale, "peak_memory_kind": "cpu_max_rss"}


def format_summary(R: list[list[Any]], task_names: list[str], metrics: dict[str, Any]) -> str:
    """The R matrix and the headline metrics as an aligned text table."""
    width = max(8, *(len(n) for n in task_names))
    head = "after \\ task".ljust(18) + "".join(n[:width].rjust(width + 2) for n in task_names)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(R):
        label = "before training" if i == 0 else f"{i}. {task_names[i - 1]}"
        cells = "".join(("-" if v is None else f"{v:.3f}").rjust(width + 2) for v in row)
        lines.append(label[:18].ljust(18) + cells)

    def fmt(k: str, v: Any) -> str:
        return format_named_metric(k, v) if v is None or isinstance(v, (int, float)) else str(v)

    lines.append("")
    lines.append("  ".join(f"{k} {fmt(k, metrics.get(k))}" for k in ("ACC", "BWT", "FWT", "forgetting", "LA", "AIA")))
    cost = format_cost(metrics)
    if cost:
        lines.append(cost)
    return "\n".join(lines)


def monitor_change(monitor: list[list[Any]], names: list[str]) -> dict[str, Any]:
    """{task: last row - row 0} of the monitor scores (None where either is missing):
    how much of the never-trained ability the stream cost (negative: lost)."""
    if not monitor or not names:
        return {}
    first, last = monitor[0], monitor[-1]
    return {n: (None if a is None or b is None else b - a) for n, a, b in zip(names, first, last)}


def format_monitor(monitor: list[list[Any]], names: list[str], R_names: list[str]) -> str:
    """The monitor scores beside R: one row per row of R, one column per monitor task."""
    width = max(8, *(len(n) for n in names))
    head = "monitor (never trained)".ljust(24) + "".join(n[:width].rjust(width + 2) for n in names)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(monitor):
        label = "before training" if i == 0 else f"{i}. {R_names[i - 1]}"
        lines.append(label[:24].ljust(24) + "".join(("-" if v is None else f"{v:.3f}").rjust(width + 2) for v in row))
    change = monitor_change(monitor, names)
    lines.append("change".ljust(24) + "".join(("-" if v is None else f"{v:+.3f}").rjust(width + 2)
                                              for v in change.values()))
    return "\n".join(lines)


def format_cost(metrics: dict[str, Any]) -> str:
    """What the run cost, on one line: time (train / eval), throughput, peak memory and the
    strategy's own state, e.g. `cost: 28.4s (train 26.4s, eval 0.2s)  1.2 GiB peak  ...`.
    The times are the run's totals over every session that worked on it (`Progress`:
    each counted to its last checkpoint), so train + eval never exceed the total; a
    resumed run says over how many sessions. Peak memory is this session's."""
    from cl_runner.reporting.formatting import format_bytes, format_duration

    parts = []
    if metrics.get("wall_time_s") is not None:
        evals = metrics.get("eval_time_s")
        if evals is None:  # metrics.json from before eval_time_s: the rows after each task
            evals = sum(t.get("eval", 0.0) for t in metrics.get("task_time_s") or [])
        sessions = metrics.get("sessions") or 1
        over = f" over {sessions} sessions" if sessions > 1 else ""
        # A strategy's own work at test time (MbPA++'s local adaptation) is part of eval.
        test_time = metrics.get("test_time_s")
        of_it = f", of which test-time adaptation {format_duration(test_time)}" if test_time else ""
        parts.append(f"{format_duration(metrics['wall_time_s'])}{over} (train "
                     f"{format_duration(metrics.get('train_time_s'))}, eval {format_duration(evals)}{of_it})")
    if metrics.get("train_tokens_per_s"):
        parts.append(f"{metrics['train_tokens_per_s']:,.0f} train tokens/s")
    if metrics.get("peak_memory_bytes"):
        kind = "GPU" if metrics.get("peak_memory_kind") == "cuda_allocated" else "RSS"
        parts.append(f"peak memory {format_bytes(metrics['peak_memory_bytes'])} ({kind})")
    adapter = metrics.get("adapter")
    if adapter:
        parts.append(f"trained {adapter['adapter_parameters']:,} adapter params ({adapter['kind']} r={adapter['r']} x "
                     f"{adapter['adapters']} on {','.join(adapter['target_modules'])})"
                     + (f" + {adapter['head_parameters']:,} head" if adapter.get("head_parameters") else ""))
    if metrics.get("strategy_extra_bytes"):
        parts.append(f"strategy state {format_bytes(metrics['strategy_extra_bytes'])}")
    return ("cost: " + "  ".join(parts)) if parts else ""


def adapter_report(run: RunContext) -> Optional[dict[str, Any]]:
    """model.adapter's kind, rank, targets and parameter counts (None without an adapter)."""
    from cl_runner.models.adapters import adapter_summary, is_adapted

    model = run.unwrapped_model
    return adapter_summary(model) if is_adapted(model) else None


def finish_run(run: RunContext, progress: Progress, wall_time_s: float) -> dict[str, Any]:
    """metrics.json, R.csv, plots, the tracker's summary and the printed table (rank 0);
    the final model when asked for (every rank takes part)."""
    from cl_runner.evaluation.metrics import summarize

    names = run.stream.names
    metrics: dict[str, Any] = {
        "run_id": run.run_dir.name,
        "experiment": run.cfg.experiment_name,
        "model": run.cfg.model.name,
        "task_stream": run.cfg.task_stream.name,
        "strategy": strategy_label(run.cfg),
        "strategy_members": run.strategy.name,  # the base strategy + add-ons that ran
        "seed": run.cfg.seed,
        "tasks": names,
        "R": progress.R,
    }
    metrics.update(summarize(progress.R, names))
    tokens_per_s = progress.train_tokens / progress.train_seconds if progress.train_seconds else None
    metrics.update({
        # The run's totals over its sessions (cl-run processes), each to its last checkpoint.
        "wall_time_s": wall_time_s,
        "train_time_s": progress.train_seconds,
        "eval_time_s": progress.eval_seconds,
        "test_time_s": run.strategy.test_time_seconds(),  # the strategy's own work inside eval_time_s
        "sessions": progress.sessions,
        "task_time_s": progress.task_seconds,
        "train_tokens": progress.train_tokens,
        "train_tokens_per_s": tokens_per_s,
        "optimizer_steps": progress.global_step,
        "distributed": {"world_size": run.accelerator.num_processes, "sharding": run.cfg.trainer.sharding},
        "train_loss_curves": {name: curve for name, curve in zip(names, progress.loss_curves)},
        "strategy_extra_bytes": run.strategy.extra_state_bytes(),
        "strategy_report": run.strategy.report(),
        "adapter": adapter_report(run),
        "decoding": _plain(run.cfg.evaluation),
        **peak_memory_bytes(),
    })
    if run.monitor:
        monitor_names = [t.name for t in run.monitor]
        metrics["monitor"] = progress.monitor  # rows of R x monitor tasks
        metrics["monitor_tasks"] = monitor_names
        metrics["monitor_change"] = monitor_change(progress.monitor, monitor_names)
    if run.cfg.get("save_final_model"):
        from cl_runner.checkpoints.final_model import save_final_model

        metrics["final_model"] = save_final_model(run)
    if not run.is_main:
        return metrics
    run_dir: Path = run.run_dir
    from cl_runner.reporting.environment import run_environment

    metrics["environment"] = run_environment(run_dir, run.accelerator)
    write_json(run_dir / METRICS_FILE, metrics)
    write_accuracy_csv(run_dir / ACCURACY_FILE, progress.R, names)
    if run.monitor:
        write_accuracy_csv(run_dir / MONITOR_FILE, progress.monitor, names, metrics["monitor_tasks"])
    try:
        from cl_runner.reporting.plots import plot_accuracy_matrix, plot_forgetting_curves

        (run_dir / "plots").mkdir(exist_ok=True)
        plot_accuracy_matrix(progress.R, names, run_dir / "plots" / "accuracy_matrix.png", title=metrics["strategy"])
        plot_forgetting_curves(progress.R, names, run_dir / "plots" / "forgetting_curves.png")
    except Exception as err:  # plots are a convenience; never lose the numbers for them
        print(f"[cl-run] warning: plots not written ({err})", file=sys.stderr)
    summary = {k: metrics.get(k) for k in ("ACC", "BWT", "FWT", "forgetting", "LA", "wall_time_s")}
    if metrics.get("adapter"):
        summary["adapter_parameters"] = metrics["adapter"]["adapter_parameters"]
    summary.update({f"monitor_change/{k}": v for k, v in (metrics.get("monitor_change") or {}).items()})
    run.tracker.summary(summary)
    print("\n" + format_summary(progress.R, names, metrics))
    if run.monitor:
        print("\n" + format_monitor(progress.monitor, metrics["monitor_tasks"], names))
    print(f"\n[cl-run] results: {run_dir}/metrics.json  R.csv  plots/  predictions/", flush=True)
    return metrics
