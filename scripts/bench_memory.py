"""Memory of seq_ft, svd_orthogonal, EWC and OPCM, measured and planned, in one run.

Measured: real `cl-run` runs of a ~50M-parameter LLaMA-shaped random-init model (hidden
512, MLP 1376, 16 blocks, byte tokenizer) on the synthetic stream, two tasks of a couple
of optimizer steps, at world sizes 1, 2 and 4: one process alone (trainer.sharding=none),
several under torchrun on CPUs (gloo) with trainer.sharding=fsdp. Each row gives rank 0's
peak memory (RSS high-water on CPU, torch.cuda.max_memory_allocated on GPU) and the
strategy's state, both from the run's metrics.json, next to the memory plan's numbers for
the same set-up (cl_runner.memory_plan) and the ratio to seq_ft at the same world size.
A configuration that fails is a row with the last line of its error; the others go on.

Planned: llama2_7b_chat on 8 x 80 GB (bf16, trainer.sharding=fsdp, TRACE's batch of 4 per
GPU) for the same three strategies.

    python scripts/bench_memory.py                    # about 10-20 minutes on 2 CPU cores
    python scripts/bench_memory.py --tiny --worlds 1  # tiny_llama, one process: a minute
    python scripts/bench_memory.py --model smollm2_135m --worlds 1,2 --name memory_smollm2

Writes results/bench/memory.md and memory.json (--tiny: memory_tiny.*).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)
from bench_output import write_bench_outputs  # noqa: E402  (same folder)

STRATEGIES = {
    "seq_ft": [],
    # ratio mode: k does not depend on layer importances, so the plan's k is the run's k
    "svd_orthogonal": ["strategy=svd_orthogonal", "strategy.rank.mode=ratio"],
    "ewc": ["strategy=ewc"],
    "opcm": ["strategy=opcm"],
}
# The 7B plan uses each strategy's shipped defaults (svd_orthogonal: adaptive rank).
STRATEGIES_7B = {"svd_orthogonal": ["strategy=svd_orthogonal"]}
# ~50M parameters: 16 blocks x (4 x 512^2 + 3 x 512 x 1376 + 2 x 512) + 2 x 259 x 512 + 512
BENCH_MODEL = ["model=tiny_llama", "model.architecture_config.hidden_size=512",
               "model.architecture_config.intermediate_size=1376", "model.architecture_config.num_hidden_layers=16",
               "model.architecture_config.num_attention_heads=8", "model.architecture_config.num_key_value_heads=8"]
TINY_MODEL = ["model=tiny_llama"]
RUN = ["logger=none", "trainer.progress_bar=false", "trainer.steps_per_task=2", "trainer.batch_size=4",
       "trainer.warmup_ratio=0.0", "task_stream.order=[reverse,increment]", "task_stream.train_size=32",
       "task_stream.test_size=4", "evaluation.batch_size=4", "evaluation.save_predictions=false"]
# (trainer.sharding=fsdp and world size 8 are handed to the plan directly)
PLAN_7B = ["model=llama2_7b_chat", "trainer.precision=bf16", "trainer.batch_size=4", "plan_gpu_memory_gb=80"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4", help="world sizes (processes), comma-separated")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--tiny", action="store_true", help="tiny_llama (132k parameters) instead of the ~50M model")
    p.add_argument("--model", default=None,
                   help="any model config instead (model=<name>, e.g. smollm2_135m: its pretrained weights, offline)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): hide any GPU, gloo; cuda: one GPU per process")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--mmap-threshold", type=int, default=65536, metavar="BYTES",
                   help="CPU: glibc mmaps allocations from this size on (MALLOC_MMAP_THRESHOLD_), so freed tensors "
                        "leave the resident set and the peak RSS follows live memory; 0: glibc's default")
    p.add_argument("--name", default=None, help="output file stem (default memory, --tiny: memory_tiny)")
    p.add_argument("--out", default=os.path.join(REPO, "results", "bench"))
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    p.add_argument("--replan", default=None, metavar="JSON",
                   help="run nothing: take the measured rows of an earlier output (its .json) and write the report "
                        "again with the plans of this code (e.g. after a change to the memory plan)")
    return p.parse_args()


def env_for(device: str, mmap_threshold: int = 0) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return env


def command(world: int, overrides: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "cl_runner.cli", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            "-m", "cl_runner.cli", *overrides]


def last_error_line(text: str) -> str:
    """The failing process's own last error line, not torchrun's closing report."""
    lines = [re.sub(r"^\[(rank|default)\d*\]:\s*", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
    launcher = ("torch.distributed.elastic", "ChildFailedError", "Root Cause", "traceback :", "error_file:")
    for ln in reversed(lines):
        if any(mark in ln for mark in launcher) or re.match(r"^[EWI]\d{4} ", ln):
            continue
        if re.search(r"(Error|Exception)\b|error:", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def baseline_rss(device: str, mmap_threshold: int = 0) -> Optional[int]:
    """Peak RSS of a process that only imports what a run imports (the floor under every
    CPU row)."""
    code = ("import resource, torch, transformers, accelerate, cl_runner.cli, cl_runner.training.loop; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    done = subprocess.run([sys.executable, "-c", code], env=env_for(device, mmap_threshold), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip().isdigit() else None


def measure(world: int, strategy: str, model: list[str], workdir: str, args) -> dict[str, Any]:
    sharding = "fsdp" if world > 1 else "none"
    out_dir = os.path.join(workdir, f"w{world}_{strategy}")
    overrides = [*model, *RUN, *STRATEGIES[strategy], f"output_dir={out_dir}"]
    # world 1 keeps the default (none), so the script also runs where trainer.sharding is unknown
    overrides.append("trainer.sharding=fsdp" if world > 1 else "trainer.cpu_threads=1")
    row: dict[str, Any] = {"world": world, "strategy": strategy, "sharding": sharding, "overrides": overrides}
    started = time.perf_counter()
    try:
        done = subprocess.run(command(world, overrides), cwd=workdir, env=env_for(args.device, args.mmap_threshold),
                              capture_output=True, text=True, timeout=args.timeout)
        rc, stderr = done.returncode, done.stderr + done.stdout
    except subprocess.TimeoutExpired:
        rc, stderr = None, f"timed out after {args.timeout} s"
    row["wall_s"] = time.perf_counter() - started
    metrics_path = os.path.join(out_dir, "metrics.json")
    if rc != 0 or not os.path.isfile(metrics_path):
        row["error"] = last_error_line(stderr) if rc is not None else stderr
        return row
    metrics = json.loads(open(metrics_path).read())
    row.update(peak_memory_bytes=metrics.get("peak_memory_bytes"), peak_memory_kind=metrics.get("peak_memory_kind"),
               peak_memory_bytes_per_rank=metrics.get("peak_memory_bytes_per_rank"),
               strategy_extra_bytes=metrics.get("strategy_extra_bytes"))
    return row


def run_config(overrides: list[str]):
    """The validated config `cl-run <overrides>` would run (composed with Hydra's API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cl_runner.config.validate import validate
    from cl_runner.config.paths import package_configs

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(package_configs()), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


def longest_training_sequence(overrides: list[str]) -> Optional[int]:
    """Tokens of the bench stream's longest training example as the run batches it (bos +
    prompt + answer + eos, the model's tokenizer): the width its batches pad to, where the
    plan counts activations at model.max_length. None when the tokenizer is not at hand."""
    from cl_runner.models.batching import Collator
    from cl_runner.streams.build import build_stream

    cfg = run_config(overrides)
    try:
        if cfg.model.tokenizer == "byte":
            from cl_runner.models.tokenizers import ByteTokenizer

            tok = ByteTokenizer()
        else:
            from transformers import AutoTokenizer

            from cl_runner.models.build import resolve_gguf_file
            from cl_runner.models.gguf_cache import converted_folder
            from cl_runner.models.tokenizers import HFTokenizer

            if cfg.model.get("gguf_file"):
                import torch
                from transformers import AutoModelForCausalLM

                folder = converted_folder(resolve_gguf_file(cfg.model), cfg.model.cache_dir, AutoModelForCausalLM,
                                          dict(dtype=torch.float32))
            else:
                folder = cfg.model.path
            tok = HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - the plan at max_length still stands
        print(f"[bench_memory] no tokenizer for the sequence length ({type(err).__name__}: {err})", flush=True)
        return None
    stream = build_stream(cfg.task_stream, cfg.model.kind, cfg.seed)
    collate = Collator(cfg.model.kind, tok, cfg.model.max_length)
    return max(int(collate(task.train)["input_ids"].shape[1]) for task in stream)


def plan_for(overrides: list[str], world: int, sharding: str):
    from cl_runner.memory_plan import build_plan

    return build_plan(run_config(overrides), world_size=world, sharding=sharding)


PLAN_TOLERANCE = 0.2


def compare_plan(plan_total: Optional[int], measured: Optional[int], leaves_out: list[str]) -> dict[str, Any]:
    """The plan's total per rank against a measured peak (on a CPU: above the floor):
    ratio plan / measured, within PLAN_TOLERANCE or not, and (when not) what the plan's
    notes say it leaves out."""
    if not plan_total or not measured:
        return {"plan_ratio": None, "plan_within": None, "plan_leaves_out": []}
    r = plan_total / measured
    within = abs(r - 1.0) <= PLAN_TOLERANCE
    return {"plan_ratio": r, "plan_within": within, "plan_leaves_out": [] if within else list(leaves_out)}


def not_counted(plan) -> list[str]:
    """The plan's notes that name what it leaves out."""
    notes = list(plan.assumptions) + [r.note for r in plan.rows]
    return [n[n.index("not counted"):] for n in notes if "not counted" in n]


def mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f} MiB"


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2 ** 30:,.2f} GiB"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        sys.exit(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    model = [f"model={args.model}"] if args.model else TINY_MODEL if args.tiny else BENCH_MODEL
    from cl_runner.memory_plan import format_plan, model_facts
    from cl_runner.memory_plan import gib as size

    facts = model_facts(run_config(["logger=none", *model]).model)
    weight_bytes = facts.params * 4
    print(f"bench model: {' '.join(model)} -> {facts.params:,} parameters ({size(weight_bytes)} in float32)",
          flush=True)
    earlier = None
    if args.replan:
        with open(args.replan) as f:
            earlier = json.load(f)
        base = earlier.get("baseline_rss_bytes")
    else:
        base = baseline_rss(args.device, args.mmap_threshold) if args.device == "cpu" else None
    seq_len = longest_training_sequence(["logger=none", *model, *RUN])

    workdir = tempfile.mkdtemp(prefix="bench_memory_")
    rows: list[dict[str, Any]] = []
    measured_rows = {(r["world"], r["strategy"]): r for r in earlier["rows"]} if earlier else {}
    try:
        for world in worlds:
            for strategy in strategies:
                if earlier is not None:
                    row = measured_rows.get((world, strategy))
                    if row is None:
                        continue
                    row = {k: v for k, v in row.items() if not k.startswith("plan")}
                else:
                    print(f"[bench_memory] world {world} {strategy} ...", flush=True)
                    row = measure(world, strategy, model, workdir, args)
                try:
                    plan = plan_for(["logger=none", *model, *RUN, *STRATEGIES[strategy]], world, row["sharding"])
                    row["plan_state_bytes"] = plan.bytes_of("strategy state")
                    row["plan_static_per_rank"] = sum(plan.bytes_of(n) for n in (
                        "parameters", "gradients", "optimizer state", "strategy state"))
                    row["plan_total_per_rank"] = plan.per_rank_total
                    measured = row.get("peak_memory_bytes")
                    if measured is not None and base and row.get("peak_memory_kind") == "cpu_max_rss":
                        measured -= base
                    row["measured_for_plan"] = measured
                    row.update(compare_plan(plan.per_rank_total, measured, not_counted(plan)))
                    if seq_len is not None:
                        # The same plan with activations at the run's real sequence length.
                        at_seq = plan_for(["logger=none", *model, *RUN, *STRATEGIES[strategy],
                                           f"model.max_length={seq_len}"], world, row["sharding"])
                        row["plan_seq_len"] = seq_len
                        row["plan_total_at_seq"] = at_seq.per_rank_total
                        row["plan_ratio_at_seq"] = at_seq.per_rank_total / measured if measured else None
                except Exception as err:  # noqa: BLE001 - a plan failure is a row note, not the end
                    row["plan_error"] = f"{type(err).__name__}: {err}"
                print(f"  -> {row.get('error') or mib(row.get('peak_memory_bytes'))}", flush=True)
                rows.append(row)
    finally:
        if args.keep:
            print(f"run folders kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    seq = {r["world"]: r.get("peak_memory_bytes") for r in rows if r["strategy"] == "seq_ft"}
    kind = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), None)
    peak_label = "peak GPU allocated" if kind == "cuda_allocated" else "peak RSS"
    lines = ["# Memory: seq_ft, svd_orthogonal, EWC, OPCM (measured, and planned for 7B)", "",
             f"Generated by `python scripts/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`.", "",
             "## Measured", "",
             f"Model: `{' '.join(model)}`: {facts.params:,} parameters ({size(weight_bytes)} of float32 weights). "
             f"Run: `{' '.join(RUN)}`; world 1 = one process (trainer.sharding=none), world > 1 = torchrun "
             f"(trainer.sharding=fsdp), {args.device.upper()}" + (" (gloo)." if args.device == "cpu" else ".")
             + (f" glibc mmaps allocations from {args.mmap_threshold} B on (MALLOC_MMAP_THRESHOLD_): freed tensors "
                "leave the resident set." if args.device == "cpu" and args.mmap_threshold else ""),
             f"{peak_label} is rank 0's, from metrics.json; strategy state is `strategy_extra_bytes` (rank 0). "
             "Plan: the memory plan's parameters + gradients + optimizer + strategy state per rank "
             "(activations and transients left out).", ""]
    if base:
        lines += [f"Floor: a process that only imports torch, transformers, accelerate and cl_runner peaks at "
                  f"{mib(base)} RSS; every CPU row includes it.", ""]
    lines += [f"| world | strategy | sharding | {peak_label} | vs seq_ft | strategy state | state / weights | "
              "plan: state | plan: static per rank | wall | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak, state = r.get("peak_memory_bytes"), r.get("strategy_extra_bytes")
        note = r.get("error") or r.get("plan_error") or ""
        note = ("FAILED: " + note) if r.get("error") else note
        lines.append(f"| {r['world']} | {r['strategy']} | {r['sharding']} | {mib(peak)} | {ratio(peak, seq.get(r['world']))} "
                     f"| {mib(state) if state is not None else '-'} | "
                     f"{'-' if state is None else f'{state / weight_bytes:.2f}'} | {mib(r.get('plan_state_bytes'))} | "
                     f"{mib(r.get('plan_static_per_rank'))} | {r['wall_s']:.0f} s | {note.replace('|', '/')} |")

    above = "peak RSS above the floor" if kind != "cuda_allocated" else peak_label
    lines += ["", "## Plan against measured", "",
              f"The plan's total per rank (every row, activations and working sets included) against the {above}; "
              f"within {PLAN_TOLERANCE:.0%} or not, and if not, what the plan says it leaves out.", "",
              f"| world | strategy | sharding | plan: total per rank | measured ({above}) | plan / measured | "
              "within 20% | the plan leaves out | plan at the run's sequence length | its plan / measured | "
              "within 20% |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    left_out: list[str] = []  # each note once, below the table; rows cite its number
    for r in rows:
        within = {True: "yes", False: "no", None: "-"}[r.get("plan_within")]
        cites = []
        for note in r.get("plan_leaves_out") or []:
            if note not in left_out:
                left_out.append(note)
            cites.append(f"[{left_out.index(note) + 1}]")
        out = " ".join(cites) or ("FAILED run" if r.get("error") else "")
        plan_ratio = "-" if r.get("plan_ratio") is None else f"{r['plan_ratio']:.2f}"
        seq_ratio = r.get("plan_ratio_at_seq")
        seq_within = "-" if seq_ratio is None else ("yes" if abs(seq_ratio - 1) <= PLAN_TOLERANCE else "no")
        lines.append(f"| {r['world']} | {r['strategy']} | {r['sharding']} | {mib(r.get('plan_total_per_rank'))} | "
                     f"{mib(r.get('measured_for_plan'))} | {plan_ratio} | {within} | {out} | "
                     f"{mib(r.get('plan_total_at_seq'))} | {'-' if seq_ratio is None else f'{seq_ratio:.2f}'} | "
                     f"{seq_within} |")
    if left_out:
        lines += [""] + [f"[{i + 1}] {note}" for i, note in enumerate(left_out)]
    # What a strategy adds to seq_ft's memory, planned and measured: the number a user
    # compares strategies by; a cost common to every run (loading, allocator) drops out.
    base_rows = {r["world"]: r for r in rows if r["strategy"] == "seq_ft"}
    key = "plan_total_at_seq" if seq_len is not None else "plan_total_per_rank"
    increments = []
    for r in rows:
        b = base_rows.get(r["world"])
        if r["strategy"] == "seq_ft" or b is None or r.get("measured_for_plan") is None \
                or b.get("measured_for_plan") is None or r.get(key) is None or b.get(key) is None:
            continue
        measured_inc, plan_inc = r["measured_for_plan"] - b["measured_for_plan"], r[key] - b[key]
        r["increment_measured"], r["increment_planned"] = measured_inc, plan_inc
        within_inc = measured_inc > 0 and abs(plan_inc / measured_inc - 1) <= PLAN_TOLERANCE
        increments.append(f"| {r['world']} | {r['strategy']} | {r['sharding']} | {mib(plan_inc)} | {mib(measured_inc)} "
                          f"| {'-' if measured_inc <= 0 else f'{plan_inc / measured_inc:.2f}'} | "
                          f"{'yes' if within_inc else 'no'} |")
    if increments:
        lines += ["", "What each strategy adds to seq_ft at the same world size (the plan" +
                  (" at the run's sequence length" if seq_len is not None else "") + " against the measured peaks):",
                  "", "| world | strategy | sharding | planned increment | measured increment | planned / measured | "
                  "within 20% |", "|---|---|---|---|---|---|---|", *increments]
    if seq_len is not None:
        lines += ["", f"The plan counts activations at model.max_length tokens a sequence; the run's batches pad "
                      f"to their longest example, {seq_len} tokens here. The last three columns are the plan made "
                      f"with model.max_length={seq_len}, what a user sizing a run on data of that length gets."]

    lines += ["", "## Planned: llama2_7b_chat on 8 x 80 GB", "",
              f"`cl-run dry_run=true {' '.join(PLAN_7B)} trainer.sharding=fsdp plan_world_size=8 strategy=<s>` "
              "(per rank; svd_orthogonal at its default "
              "adaptive rank, k = trr x min(m, n) for a layer of mean importance).", "",
              "| strategy | parameters | gradients | optimizer | strategy state | strategy working set | "
              "FSDP gathered | activations (rough) | total per rank | vs seq_ft | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    plans: dict[str, Any] = {}
    for strategy in strategies:
        try:
            plans[strategy] = plan_for(["logger=none", *PLAN_7B, *STRATEGIES_7B.get(strategy, STRATEGIES[strategy])],
                                       8, "fsdp")
        except Exception as err:  # noqa: BLE001 - OPCM refuses fsdp: a line, not the end
            lines.append(f"| {strategy} | " + " | ".join(["-"] * 9) + f" | not planned: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200].replace('|', '/')} |")
    for strategy, plan in plans.items():
        total = plan.per_rank_total
        lines.append(f"| {strategy} | " + " | ".join(gib(plan.bytes_of(n)) for n in (
            "parameters", "gradients", "optimizer state", "strategy state", "strategy working set",
            "FSDP gathered units", "activations")) + f" | {gib(total)} | "
            f"{ratio(total, plans['seq_ft'].per_rank_total if 'seq_ft' in plans else None)} | {plan.verdict()} |")
    if "svd_orthogonal" in plans:
        lines += ["", "The svd_orthogonal plan in full:", "", "```", format_plan(plans["svd_orthogonal"]), "```"]
    print("\n".join(lines))
    results = {"model_overrides": model, "params": facts.params, "run_overrides": RUN, "device": args.device,
               "baseline_rss_bytes": base, "rows": rows, "sequence_length": seq_len,
               "plan_7b": {s: p.as_dict() for s, p in plans.items()}}
    default = f"memory_{args.model}" if args.model else "memory_tiny" if args.tiny else "memory"
    write_bench_outputs(args.out, args.name or default, lines, results,
                        suffix=".md")


if __name__ == "__main__":
    main()
