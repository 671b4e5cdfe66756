"""Benchmark the per-task subspaces of svd_orthogonal (top-k SVD of every target weight):
a naive per-matrix loop of torch.linalg.svd against cl_runner.ops.top_k_bases (batched
exact, and randomized with its reported error), in one run.

    python scripts/bench_subspace.py                       # tiny_llama, minilm, llama7b
    python scripts/bench_subspace.py --quick --shapes minilm --threads 1

Exact SVD time does not depend on k, so it is timed once per preset; the randomized
method is timed per k (25/50/75 %; for k + oversample close to min(m, n) it falls back
to exact). Errors: relative Frobenius residual ||W - U U^T W||_F / ||W||_F of the
randomized bases over the optimal (exact) one, and the spectral suboptimality bound.
Writes results/bench/subspace_<device>.txt and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cl_runner import ops  # noqa: E402
from bench_output import write_bench_outputs  # noqa: E402  (same folder)
from bench_projection import PRESETS, header, sync  # noqa: E402  (same folder)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny_llama,minilm,llama7b")
    p.add_argument("--fracs", default="0.25,0.5,0.75")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 quick)")
    p.add_argument("--llama-count", type=int, default=None,
                   help="matrices per 7B shape (default: all on GPU, 1 on CPU)")
    p.add_argument("--llama-full", action="store_true",
                   help="on CPU also time the exact SVD and k > 25%% for the 7B shapes "
                        "(tens of minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None,
                   help="output file stem (default subspace_<device>)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                 "bench"))
    return p.parse_args()


def naive_loop(weights, ks):
    out = []
    for w, k in zip(weights, ks):
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        out.append((u[:, :k], vh[:k].T))
    return out


def timed(fn, device, rounds):
    samples = []
    result = None
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (1 if args.quick else 3)
    llama_count = args.llama_count
    if llama_count is None:
        llama_count = 1 if device.type == "cpu" else (8 if args.quick else 0)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    for line in header("bench_subspace", device, rounds):
        say(line)
    results = {"device": str(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cases": []}
    gen = torch.Generator().manual_seed(0)
    for preset in args.shapes.split(","):
        base = PRESETS[preset]
        if preset == "llama7b" and llama_count:
            base = [(shape, min(count, llama_count)) for shape, count in base]
            say(f"\n## llama7b REDUCED to {llama_count} matrix/matrices per shape "
                "(full model: 128 + 64 + 32)")
        # Weights with a decaying spectrum (like trained layers), so errors mean something.
        weights = []
        for (m, n), count in base:
            r = min(m, n)
            decay = torch.logspace(0, -2, r)
            for _ in range(count):
                qa, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
                qb, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
                weights.append(((qa * decay) @ qb.T).to(device))
        desc = ", ".join(f"{m}x{n} x{c}" for (m, n), c in base)
        say(f"\n## {preset}  [{desc}]")
        case = {"preset": preset, "layout": base, "rows": []}
        skip_exact = (preset == "llama7b" and device.type == "cpu" and not args.llama_full)
        ks_mid = [min(w.shape) // 2 for w in weights]
        if skip_exact:
            say("(on CPU the 7B shapes get only the randomized method at the smallest k: "
                "pass --llama-full for exact SVD and every k)")
            t_loop = t_exact = None
        else:
            t_loop, _ = timed(lambda: naive_loop(weights, ks_mid), device, rounds)
            t_exact, _ = timed(lambda: ops.top_k_bases(weights, ks_mid), device, rounds)
            say(f"{'exact, per-matrix loop':<34}{t_loop * 1e3:>11.1f} ms")
            say(f"{'exact, top_k_bases (batched)':<34}{t_exact * 1e3:>11.1f} ms"
                f"   {t_loop / t_exact:5.2f}x vs loop")
            case["rows"].append({"method": "loop", "ms": t_loop * 1e3})
            case["rows"].append({"method": "exact", "ms": t_exact * 1e3,
                                 "vs_loop": t_loop / t_exact})
        say(f"{'randomized (k, oversample, power)':<34}{'ms':>11}{'vs loop':>10}"
            f"{'resid_F':>10}{'vs opt':>9}{'spec_sub':>10}")
        fracs = [float(f) for f in args.fracs.split(",")]
        for frac in fracs[:1] if skip_exact else fracs:
            ks = [int(round(frac * min(w.shape))) for w in weights]
            def randomized(stats=False):
                return ops.top_k_bases(weights, ks, method="randomized",
                                       oversample=args.oversample,
                                       power_iters=args.power_iters, return_stats=stats)

            heavy = skip_exact  # 7B on CPU: about a minute per call, one round
            t_rand, _ = timed(randomized, device, 1 if heavy else rounds)  # without stats
            _, stats = randomized(stats=True)
            if skip_exact:
                opt = None
            else:
                _, opt = ops.top_k_bases(weights, ks, return_stats=True)
            resid = max(stats.residual_fro)
            vs_opt = (max(a / max(b, 1e-12) for a, b in zip(stats.residual_fro,
                                                             opt.residual_fro))
                      if opt else float("nan"))
            sub = max(stats.spectral_suboptimality)
            note = "" if all(stats.randomized) else (
                "  (exact fallback: k + oversample > r/2)" if not any(stats.randomized)
                else "  (partly exact fallback)")
            ratio = f"{t_loop / t_rand:9.2f}x" if t_loop else f"{'-':>10}"
            say(f"{'k=' + str(int(frac * 100)) + '%':<34}{t_rand * 1e3:>11.1f}{ratio}"
                f"{resid:>10.2e}{vs_opt:>9.3f}{sub:>10.3f}{note}")
            case["rows"].append({"method": "randomized", "frac": frac, "ms": t_rand * 1e3,
                                 "vs_loop": (t_loop / t_rand) if t_loop else None,
                                 "residual_fro_max": resid, "vs_optimal_max": vs_opt,
                                 "spectral_suboptimality_max": sub})
        results["cases"].append(case)
    say("\nresid_F: worst relative Frobenius residual of the randomized bases; vs opt: "
        "worst ratio to the exact SVD's residual (1.000 = optimal); spec_sub: worst "
        "spectral suboptimality bound (residual / sketch's s_{k+1}).")
    write_bench_outputs(args.out, args.name or f"subspace_{device.type}", lines, results)


if __name__ == "__main__":
    main()
