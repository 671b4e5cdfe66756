"""Where a strategy's time and memory go, next to seq_ft's, in one process.

Builds and runs seq_ft first, then each strategy (and each labelled variant), with the
project's own config composition (Hydra + validate, as `cl-run`) and the run builder
(`build_run` + `ContinualLoop`), each over the first two tasks of the stream (one task
boundary) with a few optimizer steps per task and a cut-down evaluation, all under
`cl_runner.training.phases.recording()`. Prints and writes one Markdown table per model:

- a summary per run: ms per optimizer step and its ratio to seq_ft's, seconds in the
  strategy's task start (before_task) and task end (after_task), the run's peak memory
  and its ratio to seq_ft's;
- every phase per run: per-step phases (forward, penalty, backward, the strategy's hooks,
  clip, optimizer step) in ms per step; task-boundary phases (before_task, after_task and
  what runs inside them: importance forwards, SVDs, packing, the Fisher pass) in seconds
  over the run; the phase's peak memory.

Peak memory: CUDA's peak allocated bytes per phase, or on CPU the process's resident-set
high-water mark, reset per phase (/proc/self/clear_refs), so a run's peak is the largest
of its phases' and a later run does not inherit an earlier one's (between runs the
garbage is collected and glibc asked to return free memory; an unreported seq_ft run goes
first and pays the one-time costs of imports and caches). CPU peaks include what the
process holds anyway (interpreter, libraries, data): the `floor` column, measured just
before each run is built; `above floor` is the run's own.

    python scripts/profile_strategy.py --model tiny_llama --strategy ewc \\
        --variant ewc_autograd strategy=ewc strategy.penalty_gradient=autograd
    python scripts/profile_strategy.py --model smollm2_135m --strategy svd_orthogonal,ewc \\
        experiment=smollm2_quick task_stream.data_dir=/work/shared/data/cl_benchmark

Writes results/bench/profile_<model>.md and .json (--name to change the stem).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
from typing import Any, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_output import write_bench_outputs  # noqa: E402  (same folder)

# A strategy names its inner phases in its module's `PHASES` ({method: phase name}; the
# strategies room may not import training.phases, docs/layout.md): the profiler wraps
# those methods of the built strategy in `phase(...)`.


def inner_phases(member: Any) -> dict[str, str]:
    return getattr(sys.modules[type(member).__module__], "PHASES", {})
# What every profiled run gets before the caller's overrides: no tracker, no bar, no saved
# predictions, no monitor tasks, a short warm-up-free schedule.
RUN = ["logger=none", "trainer.progress_bar=false", "evaluation.save_predictions=false", "evaluation.monitor=[]",
       "trainer.warmup_ratio=0.0", "save_final_model=false"]
PER_STEP_ROOT = "step"
BOUNDARY_ROOTS = ("before_task", "after_task")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model config (model=<m>); default: the composed config's")
    p.add_argument("--strategy", default="ewc", help="strategies to profile after seq_ft, comma-separated")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("LABEL", "OVERRIDE"),
                   help="a labelled run with its own overrides (repeatable), e.g. "
                        "--variant ewc_autograd strategy=ewc strategy.penalty_gradient=autograd")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per task (trainer.steps_per_task)")
    p.add_argument("--tasks", type=int, default=2, help="tasks of the stream to run (one boundary per extra task)")
    p.add_argument("--eval-examples", type=int, default=2, help="test examples per task (task_stream.max_test_per_task)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the unreported seq_ft run (1 step per task) that first pays the one-time costs "
                        "(imports, kernels, caches) so they land in no profiled run")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="CPU: mmap allocations from this size on (e.g. 65536), so peaks track live tensors "
                        "(slows the steps: use for memory, not time)")
    p.add_argument("--name", default=None, help="output stem (default profile_<model name>)")
    p.add_argument("--out", default=os.path.join(REPO, "results", "bench"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (experiment=..., task_stream.data_dir=...)")
    args = p.parse_args(argv)
    if any(len(v) < 2 for v in args.variant):
        p.error("--variant takes a label and at least one override")
    return args


def run_config(overrides: list[str]):
    """The validated config `cl-run <overrides>` would run (composed with Hydra's API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cl_runner.config.paths import package_configs
    from cl_runner.config.validate import validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(package_configs()), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


def cut_stream(common: list[str], tasks: int) -> list[str]:
    """An override keeping the first `tasks` tasks of the composed stream's order (none
    when the order is not a list of names or is short enough already)."""
    order = run_config(common).task_stream.order
    names = list(order) if not isinstance(order, str) and order is not None else []
    if len(names) <= tasks:
        return []
    return [f"task_stream.order=[{','.join(str(n) for n in names[:tasks])}]"]


def release_memory() -> None:
    """Collect garbage and hand freed memory back (glibc's arenas, CUDA's cache), so the
    next run's peak starts from what is still alive."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def mmap_large_allocations(threshold: int) -> bool:
    """Ask glibc to mmap every allocation of `threshold` bytes or more (and return it to
    the system when freed), instead of keeping freed blocks in its heap, where the
    resident set keeps counting them. Makes a CPU peak RSS track the live tensors (at
    some cost in speed: for memory comparisons, not for timing). False where unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def resident_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wrap_inner_phases(strategy: Any) -> None:
    """Mark the methods named in each stack member's module PHASES."""
    from cl_runner.training.phases import phase

    for member in getattr(strategy, "members", [strategy]):
        for method, name in inner_phases(member).items():
            original = getattr(member, method, None)
            if original is None:
                continue

            def marked(*a, _original=original, _name=name, **kw):
                with phase(_name):
                    return _original(*a, **kw)

            setattr(member, method, marked)


def profile_run(label: str, overrides: list[str], workdir: str) -> dict[str, Any]:
    """One run under the phase recorder; its phases, step count, floor and peak."""
    import torch

    from cl_runner.cli import build_checked_strategy
    from cl_runner.ops.setup import configure_ops
    from cl_runner.reporting.environment import apply_cpu_threads
    from cl_runner.training.loop import ContinualLoop
    from cl_runner.training.phases import phase, recording
    from cl_runner.training.run import build_run

    cfg = run_config([*overrides, f"output_dir={os.path.join(workdir, label)}"])
    strategy = build_checked_strategy(cfg)
    apply_cpu_threads(cfg.trainer.cpu_threads)
    configure_ops(cfg.ops)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    release_memory()
    floor = int(torch.cuda.memory_allocated()) if device.type == "cuda" else resident_bytes()
    print(f"[profile] {label}: {' '.join(overrides)}", flush=True)
    with recording(device) as table:
        with phase("build"):
            run = build_run(cfg, strategy, False)
        ok = False
        try:
            loop = ContinualLoop(run)
            wrap_inner_phases(loop.strategy)
            with phase("run"):
                loop.run()
            state_bytes = loop.strategy.extra_state_bytes()
            ok = True
        finally:
            run.close(ok)
    phases = table.as_dict()
    del loop, run, strategy, table
    release_memory()
    peaks = [p["peak_bytes"] for p in phases.values() if p["peak_bytes"] is not None]
    return {"label": label, "overrides": overrides, "device": device.type,
            "steps": phases.get(PER_STEP_ROOT, {}).get("calls", 0), "floor_bytes": floor,
            "strategy_state_bytes": state_bytes,
            "peak_bytes": max(peaks) if peaks else None, "phases": phases}


# ----------------------------------------------------------------------------- the table
def kind_of(name: str, phases: dict[str, dict]) -> str:
    """per_step (inside an optimizer step), boundary (in a task's start or end) or other."""
    seen = set()
    while name is not None and name not in seen:
        if name == PER_STEP_ROOT:
            return "per_step"
        if name in BOUNDARY_ROOTS:
            return "boundary"
        seen.add(name)
        name = phases.get(name, {}).get("parent")
    return "other"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summary(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one run against seq_ft's (`base`)."""
    def ms_per_step(r: dict[str, Any]) -> Optional[float]:
        step = r["phases"].get(PER_STEP_ROOT)
        return 1000 * step["seconds"] / r["steps"] if step and r["steps"] else None

    def seconds(r: dict[str, Any], name: str) -> float:
        return r["phases"].get(name, {}).get("seconds", 0.0)

    def above(r: dict[str, Any]) -> Optional[int]:
        return r["peak_bytes"] - r["floor_bytes"] if r["peak_bytes"] is not None and r["floor_bytes"] is not None \
            else None

    return {"label": run["label"], "ms_per_step": ms_per_step(run),
            "step_ratio": ratio(ms_per_step(run), ms_per_step(base)),
            "task_start_s": seconds(run, "before_task"), "task_end_s": seconds(run, "after_task"),
            "peak_bytes": run["peak_bytes"], "peak_ratio": ratio(run["peak_bytes"], base["peak_bytes"]),
            "floor_bytes": run["floor_bytes"], "above_floor_bytes": above(run),
            "above_floor_ratio": ratio(above(run), above(base))}


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def mib(n: Optional[float]) -> str:
    return fmt(None if n is None else n / 2 ** 20, ",.1f", " MiB")


def report_lines(model: str, runs: list[dict[str, Any]], command: str) -> list[str]:
    base = runs[0]
    rows = [summary(r, base) for r in runs]
    kind = "peak GPU allocated" if base["device"] == "cuda" else "peak RSS"
    lines = [f"# Profile: {model}", "", f"Generated by `{command}`.", "",
             f"Each run: {base['steps']} optimizer steps over the stream's first tasks (one task boundary), evaluation "
             f"cut down; the common overrides: `{' '.join(base['overrides'])}`. Times are wall-clock on this machine "
             f"(meaningful only on an idle one); memory is the {kind}"
             + (" of the process (the floor: what it held before the run was built)." if base["device"] == "cpu"
                else "."), "",
             "| run | ms / step | vs seq_ft | task start (s) | task end (s) | "
             f"{kind} | vs seq_ft | floor | above floor | vs seq_ft |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['label']} | {fmt(s['ms_per_step'], ',.1f')} | {fmt(s['step_ratio'], '.2f', 'x')} | "
                     f"{fmt(s['task_start_s'], ',.2f')} | {fmt(s['task_end_s'], ',.2f')} | {mib(s['peak_bytes'])} | "
                     f"{fmt(s['peak_ratio'], '.2f', 'x')} | {mib(s['floor_bytes'])} | "
                     f"{mib(s['above_floor_bytes'])} | {fmt(s['above_floor_ratio'], '.2f', 'x')} |")
    names: list[str] = []
    for r in runs:
        names += [n for n in r["phases"] if n not in names]
    kinds = {n: next(kind_of(n, r["phases"]) for r in runs if n in r["phases"]) for n in names}
    order = {"per_step": 0, "boundary": 1, "other": 2}
    names.sort(key=lambda n: order[kinds[n]])
    head = " | ".join(f"{r['label']}: time | {r['label']}: peak" for r in runs)
    lines += ["", "Per phase: per-step phases in ms per optimizer step (ratio to seq_ft's whole step), "
              "task-boundary and other phases in seconds over the run (calls); peak memory within the phase.", "",
              f"| phase | kind | {head} |", "|---|---|" + "---|---|" * len(runs)]
    base_step = summary(base, base)["ms_per_step"]
    for n in names:
        cells = []
        for r in runs:
            p = r["phases"].get(n)
            if p is None:
                cells += ["", ""]
                continue
            if kinds[n] == "per_step" and r["steps"]:
                ms = 1000 * p["seconds"] / r["steps"]
                cells.append(f"{ms:,.2f} ms ({fmt(ratio(ms, base_step), '.2f', 'x')})")
            else:
                cells.append(f"{p['seconds']:,.2f} s ({p['calls']})")
            cells.append(mib(p["peak_bytes"]))
        lines.append(f"| {n} | {kinds[n]} | " + " | ".join(cells) + " |")
    return lines


def plan_runs(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The common overrides and (label, overrides) per run, seq_ft first."""
    common = [*RUN, *([f"model={args.model}"] if args.model else []), *args.overrides]
    common += [f"trainer.steps_per_task={args.steps}", f"task_stream.max_test_per_task={args.eval_examples}"]
    common += cut_stream(common, args.tasks)
    runs = [("seq_ft", [*common, "strategy=seq_ft"])]
    runs += [(s, [*common, f"strategy={s}"]) for s in args.strategy.split(",") if s.strip() and s != "seq_ft"]
    runs += [(v[0], [*common, *v[1:]]) for v in args.variant]
    return common, runs


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.mmap_threshold is not None and not mmap_large_allocations(args.mmap_threshold):
        print("[profile] warning: --mmap-threshold needs glibc's mallopt; ignored", file=sys.stderr)
    common, planned = plan_runs(args)
    model = str(run_config(common).model.name)
    with tempfile.TemporaryDirectory(prefix="profile_strategy_") as workdir:
        if not args.no_warmup:
            profile_run("warmup", [*planned[0][1], "trainer.steps_per_task=1"], workdir)
        runs = [profile_run(label, overrides, workdir) for label, overrides in planned]
    command = "python scripts/profile_strategy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = report_lines(model, runs, command)
    print("\n".join(lines))
    results = {"model": model, "common_overrides": common, "runs": runs,
               "summary": [summary(r, runs[0]) for r in runs]}
    if not args.no_write:
        write_bench_outputs(args.out, args.name or f"profile_{model}", lines, results, suffix=".md")
    return results


if __name__ == "__main__":
    main()
