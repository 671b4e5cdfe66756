"""Run every strategy on one experiment preset, one after another, then compare them with
cl-report: the table a user wants before choosing a strategy ("which one forgets least,
at what cost?").

    python scripts/compare_strategies.py --data-dir ../shared/data/cl_benchmark
    python scripts/compare_strategies.py --preset minilm_cl_benchmark --only seq_ft svd_r25

Each run is a plain `cl-run` in its own folder under RUNS/ (default
results/compare/<preset>/, git-ignored: it holds checkpoints); a run whose folder already
has metrics.json is skipped and a stopped one is resumed, so a comparison continues where
it left off. OUT/comparison.md (the cl-report table and each run's R matrix),
comparison.csv and comparison.png (default OUT: results/reproduce/<preset>/, committed)
are rewritten at the end.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# label -> overrides. The strategy settings are the ones measured on MiniLM (README,
# "Measured results"): defaults unless a default is known not to fit a 22M encoder.
STRATEGIES: dict[str, list[str]] = {
    "seq_ft": [],
    "multitask": ["strategy=multitask"],
    "svd_r25": ["strategy=svd_orthogonal", "strategy.rank.mode=ratio", "strategy.rank.unfreeze_ratio=0.25"],
    "svd_adaptive": ["strategy=svd_orthogonal"],
    "hft": ["strategy=hft"],
    "ewc_norm_l1": ["strategy=ewc", "strategy.normalize_fisher=true", "strategy.ewc_lambda=1",
                    "strategy.fisher_samples=256"],
    # The paper's rule and the released code's values (absolute threshold g^2 > 0.5, no
    # clipping): it never fires on a pretrained model's small gradients.
    "classp": ["strategy=classp_paper", "trainer.max_grad_norm=null"],
    # The defaults: quantile threshold (top 10% by |g|) with the code's AdaGrad-like sum, alpha 1e-3.
    "classp_llm": ["strategy=classp", "trainer.max_grad_norm=null"],
    "rewarm_replay": ["strategy=rewarm_replay"],
    # The default: each task's own update scaled once (reference = the task's start).
    "seq_ft_lines": ["lines.enabled=true"],
    # The paper's reference applied to the training state after every task: compounds.
    "seq_ft_lines_pretrained": ["lines.enabled=true", "lines.reference=pretrained"],
    # LoRA (r 8, alpha 32, q/v; docs/adapters.md) at O-LoRA's scripts' lr 1e-3: an adapter
    # trains at a larger lr than full fine-tuning. Not yet measured on MiniLM.
    "lora_seq_ft": ["model.adapter=lora", "trainer.lr=1e-3"],
    "olora": ["strategy=olora", "trainer.lr=1e-3"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minilm_quick",
                        help="experiment preset (default: minilm_quick; 'none' = the default config)")
    parser.add_argument("--data-dir", type=Path, default=None, help="task_stream.data_dir (the CL_Benchmark root)")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: results/compare/<preset>)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: results/reproduce/<preset>)")
    parser.add_argument("--only", nargs="+", choices=sorted(STRATEGIES), help="run just these labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more cl-run overrides for every run")
    return parser.parse_args(argv)


def run_one(label: str, overrides: list[str], args: argparse.Namespace, runs_dir: Path) -> bool:
    """True when the run has its metrics.json (now or from before)."""
    folder = runs_dir / label
    if (folder / "metrics.json").is_file():
        print(f"[compare] {label}: done before, skipped", flush=True)
        return True
    cl_run = [sys.executable, "-m", "cl_runner.cli"]  # the cl-run of this interpreter
    if (folder / "config.yaml").is_file():
        # A stopped run: its checkpoints let cl-run continue it.
        command = cl_run + [f"resume={folder}"]
    else:
        preset = [] if args.preset == "none" else [f"experiment={args.preset}"]
        data = [] if args.data_dir is None else [f"task_stream.data_dir={args.data_dir}"]
        command = cl_run + preset + data + [f"seed={args.seed}", "logger=none", "trainer.progress_bar=false",
                                            f"output_dir={folder}", *overrides, *args.extra]
    print(f"[compare] {label}: cl-run {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command).returncode
    # One failing strategy must not cost the others their runs.
    status = "done" if code == 0 else f"FAILED (exit code {code}); the comparison goes on without it"
    print(f"[compare] {label}: {status}, {time.perf_counter() - started:.0f} s", flush=True)
    return code == 0


def r_matrix_markdown(metrics: dict) -> str:
    tasks = metrics["tasks"]
    lines = ["| after \\ task | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for i, row in enumerate(metrics["R"]):
        name = "before" if i == 0 else tasks[i - 1]
        lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path("results") / "reproduce" / args.preset
    runs_dir = args.runs or Path("results") / "compare" / args.preset
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    failed = [label for label in (args.only or list(STRATEGIES))
              if not run_one(label, STRATEGIES[label], args, runs_dir)]
    # The report covers every finished run in RUNS, also those of earlier --only calls.
    labels = [label for label in STRATEGIES if (runs_dir / label / "metrics.json").is_file()]
    if not labels:
        print("[compare] no finished run; nothing to compare", file=sys.stderr)
        return 1

    report = subprocess.run([sys.executable, "-m", "cl_runner.report", str(runs_dir), "--out", str(out),
                             "--format", "markdown"], check=True, capture_output=True, text=True)
    command = " ".join(["python scripts/compare_strategies.py", f"--preset {args.preset}",
                        "--data-dir DATA" if args.data_dir else "", *args.extra]).replace("  ", " ").strip()
    sections = [f"# Strategies on `experiment={args.preset}` (seed {args.seed})", "", f"`{command}`", "",
                "Times are wall-clock on the machine that ran them and vary with its load: a rough "
                "guide to cost, not a benchmark.", "", report.stdout.strip(), ""]
    if failed:
        sections += [f"Failed (see their run folders under {runs_dir}): {', '.join(failed)}", ""]
    for label in labels:
        metrics = json.loads((runs_dir / label / "metrics.json").read_text())
        settings = " ".join(STRATEGIES[label]) or "(defaults)"
        sections += [f"## {label}: `{settings}`", "", r_matrix_markdown(metrics), ""]
    (out / "comparison.md").write_text("\n".join(sections))
    print(report.stdout)
    print(f"[compare] wrote {out / 'comparison.md'}, comparison.csv, comparison.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
