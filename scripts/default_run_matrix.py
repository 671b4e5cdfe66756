"""The default run (`cl-run`, no overrides) over seeds x CPU thread counts: does every task
learn, with margin, and does seq_ft forget, whatever the seed and float summation order?

Each cell is a separate `cl-run` process with `seed=S trainer.cpu_threads=N` (tracker off,
no progress bar), run one at a time: time it alone on the machine. Prints, per cell, the
diagonal of R, BWT, the step by which each task's training loss stayed under 0.05 (out of
its steps), and the wall time; writes results/bench/default_run_matrix.{md,json}.

    python scripts/default_run_matrix.py                       # seeds 0 1 2 x threads 1 2 4
    python scripts/default_run_matrix.py --seeds 0 --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_output import write_bench_outputs  # noqa: E402

FLOOR = 0.05


def floor_step(curve: list[list[float]]) -> int | None:
    """First recorded step after which the loss stays below FLOOR."""
    for i, (step, _) in enumerate(curve):
        if all(loss < FLOOR for _, loss in curve[i:]):
            return int(step)
    return None


def run_cell(seed: int, threads: int, workdir: Path) -> dict:
    out = workdir / f"s{seed}_t{threads}"
    cmd = [sys.executable, "-m", "cl_runner.cli", f"seed={seed}", f"trainer.cpu_threads={threads}", "logger=none",
           "trainer.progress_bar=false", f"output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"seed": seed, "threads": threads, "error": done.stderr.strip().splitlines()[-1:], "wall_s": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    R = metrics["R"]
    curves = metrics["train_loss_curves"]
    return {"seed": seed, "threads": threads, "diagonal": [R[j + 1][j] for j in range(len(R) - 1)],
            "BWT": metrics["BWT"], "ACC": metrics["ACC"], "wall_s": wall,
            "floor_steps": {name: floor_step(c) for name, c in curves.items()},
            "steps": {name: int(c[-1][0]) for name, c in curves.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                cell = run_cell(seed, threads, Path(tmp))
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    lines = ["# The default run over seeds x CPU threads", "",
             f"`python scripts/default_run_matrix.py --seeds {' '.join(map(str, args.seeds))} --threads "
             f"{' '.join(map(str, args.threads))}` (each cell one `cl-run seed=S trainer.cpu_threads=N`, run alone)", "",
             f"Loss floor: the step after which each task's training loss stays under {FLOOR}.", "",
             "| seed | threads | diagonal of R | BWT | loss floor at step (of steps) | wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['seed']} | {c['threads']} | failed: {c['error']} | | | {c['wall_s']:.0f} s |")
            continue
        floors = ", ".join(f"{n} {c['floor_steps'][n]}/{c['steps'][n]}" for n in c["floor_steps"])
        diag = ", ".join(f"{d:.2f}" for d in c["diagonal"])
        lines.append(f"| {c['seed']} | {c['threads']} | {diag} | {c['BWT']:+.3f} | {floors} | {c['wall_s']:.0f} s |")
    print("\n".join(lines))
    write_bench_outputs(args.out, "default_run_matrix", lines, {"cells": cells}, suffix=".md")


if __name__ == "__main__":
    main()
