"""Run every strategy on one experiment preset, one after another, then compare them with
cl-report: the table a user wants before choosing a strategy ("which one forgets least,
at what cost?").

    python scripts/compare_strategies.py --data-dir ../shared/data/cl_benchmark
    python scripts/compare_strategies.py --preset minilm_cl_benchmark --only seq_ft svd_r25
    python scripts/compare_strategies.py --data-dir DATA --seeds 0 1 2   # mean ± 95% CI, differences from seq_ft

Each run is a plain `cl-run` in its own folder under RUNS/ (default
results/compare/<preset>/, git-ignored: it holds checkpoints); a run whose folder already
has metrics.json is skipped and a stopped one is resumed, so a comparison continues where
it left off. With --seeds each strategy runs once per seed (folders <label>_s<seed>;
calls with other seeds or --only lists add to the same RUNS, and the report covers them
all), and cl-report groups the seeds: mean ± 95% CI per strategy and, with --baseline
(default seq_ft), the paired difference from it, which differences lie outside their
interval, and each strategy's time per training step and peak memory as ratios to it.
OUT/comparison.md (the cl-report tables and each run's R matrix), comparison.csv,
comparison_seeds.csv, comparison.png and forgetting_curves.png (default OUT:
results/reproduce/<preset>/, committed) are rewritten at the end.

A batch of runs made later, at another commit, with its own baseline runs, goes beside an
earlier comparison whose run folders are gone with --section NAME: the report is written to
OUT/NAME/ and its summary tables are set into OUT/comparison.md as a section of their own
(replaced on the next --section NAME call), leaving the earlier report above untouched.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

# label -> overrides. The strategy settings are the ones measured on MiniLM (docs/results.md,
# results/reproduce/minilm_quick): defaults unless a default is known not to fit a 22M encoder.
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
    # The infinite schedule: constant lr after task 1, an anneal (through the strategy's step
    # path, with replay) evaluated before each row of R.
    "rewarm_replay_infinite": ["strategy=rewarm_replay", "lr_schedule.curve=infinite"],
    # Continual merging: every task fine-tunes from the pretrained weights, then is merged.
    "opcm": ["strategy=opcm"],
    "continual_task_arithmetic": ["strategy=continual_task_arithmetic"],
    "continual_ties": ["strategy=continual_ties"],
    # LoRA (r 8, alpha 32, q/v; docs/adapters.md) at O-LoRA's scripts' lr 1e-3: an adapter
    # trains at a larger lr than full fine-tuning. Not yet measured on MiniLM.
    "lora_seq_ft": ["model.adapter=lora", "trainer.lr=1e-3"],
    "olora": ["strategy=olora", "trainer.lr=1e-3"],
    # The comparison tables' rows (issue 19), at their defaults; OGD on the LoRA factors as
    # TRACE runs it (its basis over the full model would be 150 x 22M fp32 per task).
    "lwf": ["strategy=lwf"],
    "gem": ["strategy=gem"],
    "agem": ["strategy=agem"],
    # The same at a memory batch of a training batch's size (16 examples per past task for GEM,
    # 16 in all for A-GEM): at the defaults (256) each step costs ~16x a training step on MiniLM.
    "gem_mb16": ["strategy=gem", "strategy.memory_batch_size=16"],
    "agem_ref16": ["strategy=agem", "strategy.ref_batch_size=16"],
    "ogd_lora": ["strategy=ogd", "model.adapter=lora", "trainer.lr=1e-3"],
    "gpm": ["strategy=gpm"],
    "inc_lora": ["strategy=inc_lora", "trainer.lr=1e-3"],
    "per_task_ft": ["strategy=per_task_ft"],
    # Issue 20's rows. The prompt methods train soft prompts (and the classifier head) on the
    # frozen encoder at a prompt-tuning lr: at the preset's 2e-4 they stay at chance here.
    "l2p": ["strategy=l2p", "trainer.lr=3e-2"],
    "prog_prompt": ["strategy=prog_prompt", "trainer.lr=3e-2"],
    # MbPA++ sized for a 2-core CPU: the paper's K 32, L 30, lr 1e-3, lambda 1e-3, but one local
    # adaptation per scored task (on the neighbours of its 500 test examples' mean key) instead
    # of one per example (500 x 30 steps of batch 32 a task, ~12 h a run here; 4 a task took
    # 17 min a row), and replay of 16 stored examples every 250 new ones (the paper's 1% would
    # replay 5 examples a task).
    # LFPT5 generates its replay, which an encoder classifier cannot: run it on SmolLM2
    # (--preset smollm2_quick), 20 virtual tokens instead of 300 (300 would more than double
    # every sequence on a 2-core CPU), at a prompt-tuning lr; samples of at most 96 tokens, one
    # round of sampling a task (each sampled token is a decoding step: 255-token samples in
    # three rounds took ~8 min a task start here).
    "lfpt5_p20": ["strategy=lfpt5", "model.prompt.length=20", "trainer.lr=1e-2", "strategy.max_sample_tokens=96",
                  "strategy.generation_rounds=1"],
    "mbpa_cpu": ["strategy=mbpa", "strategy.share_neighbours=500", "strategy.replay_every_examples=250",
                 "strategy.replay_examples=16"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minilm_quick",
                        help="experiment preset (default: minilm_quick; 'none' = the default config)")
    parser.add_argument("--data-dir", type=Path, default=None, help="task_stream.data_dir (the CL_Benchmark root)")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: results/compare/<preset>)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: results/reproduce/<preset>)")
    parser.add_argument("--only", nargs="+", choices=sorted(STRATEGIES), help="run just these labels")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a single-seed comparison")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every strategy once per seed (folders <label>_s<seed>)")
    parser.add_argument("--baseline", default="seq_ft",
                        help="cl-report --baseline when several seeds ran (default: seq_ft; 'none': no differences)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite OUT from the finished runs in RUNS (after runs made by several calls)")
    parser.add_argument("--section", default=None,
                        help="write the report to OUT/SECTION/ and set its tables into OUT/comparison.md as a "
                             "section of their own (a later batch beside an earlier comparison)")
    parser.add_argument("extra", nargs="*", help="more cl-run overrides for every run (after --: ... -- trainer.cpu_threads=1)")
    return parser.parse_args(argv)


def run_folder(runs_dir: Path, label: str, seed: int, several: bool) -> Path:
    """<label> for a plain --seed comparison, <label>_s<seed> under --seeds."""
    return runs_dir / (f"{label}_s{seed}" if several else label)


def run_one(label: str, overrides: list[str], args: argparse.Namespace, runs_dir: Path, seed: int,
            several: bool = False) -> bool:
    """True when the run has its metrics.json (now or from before)."""
    folder = run_folder(runs_dir, label, seed, several)
    label = folder.name
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
        command = cl_run + preset + data + [f"seed={seed}", "logger=none", "trainer.progress_bar=false",
                                            f"output_dir={folder}", *overrides, *args.extra]
    print(f"[compare] {label}: cl-run {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command).returncode
    # One failing strategy must not cost the others their runs.
    status = "done" if code == 0 else f"FAILED (exit code {code}); the comparison goes on without it"
    print(f"[compare] {label}: {status}, {time.perf_counter() - started:.0f} s", flush=True)
    return code == 0


def finished_runs(runs_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder) of every run in RUNS with its metrics.json: folders <label> and
    <label>_s<seed>, in the order of STRATEGIES, then by seed."""
    found = []
    for label in STRATEGIES:
        seeded = [f for f in runs_dir.glob(f"{label}_s*") if re.fullmatch(rf"{re.escape(label)}_s\d+", f.name)]
        for folder in [runs_dir / label, *sorted(seeded, key=lambda f: int(f.name.rsplit("_s", 1)[1]))]:
            if (folder / "metrics.json").is_file():
                found.append((label, folder))
    return found


def r_matrix_markdown(metrics: dict) -> str:
    tasks = metrics["tasks"]
    lines = ["| after \\ task | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for i, row in enumerate(metrics["R"]):
        name = "before" if i == 0 else tasks[i - 1]
        lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def section_markers(name: str) -> tuple[str, str]:
    return (f"<!-- section {name}: written by scripts/compare_strategies.py --section {name} -->",
            f"<!-- end of section {name} -->")


def set_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the section's markers in `path` (appended when it has none)."""
    begin, end = section_markers(name)
    block = f"{begin}\n\n{text.strip()}\n\n{end}\n"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in current and end in current:
        head, _, rest = current.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + block + tail.lstrip("\n")
    else:
        new = current.rstrip("\n") + ("\n\n" if current else "") + block
    path.write_text(new, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    top = args.out or Path("results") / "reproduce" / args.preset
    out = top / args.section if args.section else top
    runs_dir = args.runs or Path("results") / "compare" / args.preset
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or [args.seed]
    several = args.seeds is not None  # --seeds names folders <label>_s<seed>, even for one seed
    failed = [] if args.report_only else [
        run_folder(runs_dir, label, seed, several).name for label in (args.only or list(STRATEGIES))
        for seed in seeds if not run_one(label, STRATEGIES[label], args, runs_dir, seed, several)]
    # The report covers every finished run in RUNS, also those of earlier --only or --seeds calls.
    finished = finished_runs(runs_dir)
    if not finished:
        print("[compare] no finished run; nothing to compare", file=sys.stderr)
        return 1
    metrics_of = {f: json.loads((f / "metrics.json").read_text()) for _, f in finished}

    baseline = []
    seeded = several or any(f.name != label for label, f in finished)  # <label>_s<seed> folders
    if seeded and args.baseline != "none" and any(label == args.baseline for label, _ in finished):
        baseline = ["--baseline", args.baseline]
    report = subprocess.run([sys.executable, "-m", "cl_runner.reporting.report", str(runs_dir), "--out", str(out),
                             "--format", "markdown", *baseline], check=True, capture_output=True, text=True)
    found_seeds = sorted({m.get("seed") for m in metrics_of.values()}, key=lambda s: (s is None, s))
    seed_text = f"seed{'s' if len(found_seeds) > 1 else ''} {', '.join(map(str, found_seeds))}"
    command = " ".join(["python scripts/compare_strategies.py", f"--preset {args.preset}",
                        "--data-dir DATA" if args.data_dir else "",
                        f"--seeds {' '.join(map(str, seeds))}" if several and not args.report_only else "",
                        "--report-only" if args.report_only else "",
                        f"--section {args.section}" if args.section else "",
                        f"-- {' '.join(args.extra)}" if args.extra and not args.report_only else ""])
    sections = [f"# Strategies on `experiment={args.preset}` ({seed_text})", "",
                f"Report written by `{' '.join(command.split())}`; each run's own cl-run command is in "
                "its folder's environment.json. Times are wall-clock on the machine that ran them and vary "
                "with its load: compare the runs of one comparison, not across machines.", "",
                report.stdout.strip(), ""]
    if failed:
        sections += [f"Failed (see their run folders under {runs_dir}): {', '.join(failed)}", ""]
    for label, folder in finished:
        settings = " ".join(STRATEGIES[label]) or "(defaults)"
        sections += [f"## {folder.name}: `{settings}`", "", r_matrix_markdown(metrics_of[folder]), ""]
    (out / "comparison.md").write_text("\n".join(sections))
    if args.section:
        # The summary tables go into the top comparison.md; the R matrices stay in OUT/SECTION/.
        set_section(top / "comparison.md", args.section, "\n".join([
            f"# Section `{args.section}`: {seed_text}, {len(finished)} runs", "",
            f"Written by `{' '.join(command.split())}`; every run's R matrix, the "
            f"plots and the CSVs are in [{args.section}/]({args.section}/comparison.md). Its differences and ratios "
            "are against this section's own baseline runs.", "", report.stdout.strip()]))
    print(report.stdout)
    print(f"[compare] wrote {out / 'comparison.md'}, comparison.csv, comparison_seeds.csv, comparison.png, "
          "forgetting_curves.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
