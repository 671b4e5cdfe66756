"""Benchmark svd_orthogonal's gradient projection: every backend against a naive
per-matrix PyTorch loop over the same gradients, in one run (ratios from the same run,
because the machine is noisy).

    python scripts/bench_projection.py                 # all presets, k = 25/50/75 %
    python scripts/bench_projection.py --quick         # fewer rounds, 7B reduced further
    python scripts/bench_projection.py --shapes minilm,tiny_llama --fracs 0.75

Methods, per preset and k:
- loop:            for each matrix, G -= U (U^T G); G -= (G V) V^T (plain torch ops)
- list:<backend>:  cl_runner.ops.project_ on the same list (stacks and scatters inside)
- groups:<backend>: ProjectionGroups.project_grads_ (stacked buffers, complement when
                   k > dim/2): what svd_orthogonal runs each step
- groups-direct:<backend>: the same without the complement (only shown for k > dim/2)
- matmul:          torch.mm of a square matrix with the same flops as groups (capped at
                   4096^3): the machine's GEMM rate for comparison

GFLOP/s are on the flops each method executes (8 m n k for the direct two-sided form;
through a complement, 4 m n (dim - k) plus a small projection of the contracted product:
cl_runner.ops.reference.projection_flops). "vs loop" is the median over rounds of loop_time / method_time.
Writes results/bench/projection_<device>.txt and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner import ops  # noqa: E402
from bench_output import write_bench_outputs  # noqa: E402  (same folder)
from cl_runner.ops import reference  # noqa: E402

PRESETS = {
    # BERT MiniLM-L6 (hidden 384, 6 layers): q, k, v, o; intermediate; output
    "minilm": [((384, 384), 24), ((1536, 384), 6), ((384, 1536), 6)],
    # A tiny LLaMA (hidden 64, intermediate 172, 2 layers): q, k, v, o; gate, up; down
    "tiny_llama": [((64, 64), 8), ((172, 64), 4), ((64, 172), 2)],
    # LLaMA-2-7B, 32 layers: q, k, v, o; gate, up; down (224 matrices)
    "llama7b": [((4096, 4096), 128), ((11008, 4096), 64), ((4096, 11008), 32)],
    # The square (attention) matrices alone: where the complement applies on both sides.
    "minilm_attn": [((384, 384), 24)],
    "llama7b_attn": [((4096, 4096), 128)],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny_llama,minilm,minilm_attn,llama7b,llama7b_attn",
                   help="comma-separated presets: " + ",".join(PRESETS))
    p.add_argument("--fracs", default="0.25,0.5,0.75", help="preserved k / min(m, n)")
    p.add_argument("--mode", default="two_sided", choices=ops.MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; 3 quick)")
    p.add_argument("--llama-count", type=int, default=None,
                   help="matrices per 7B shape (default: all on GPU, 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None,
                   help="output file stem (default projection_<device>)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                 "bench"))
    return p.parse_args()


def header(script, device, rounds, extra=""):
    """First lines of every report: machine, load, threads, versions, command."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"# {script}  device={device} ({platform.machine()}, {os.cpu_count()} cpus, load "
        f"{load:.1f})  threads={torch.get_num_threads()}  torch {torch.__version__}  "
        f"rounds={rounds}{extra}",
        f"# backends here: {ops.available_backends(device)}; {ops.extension_status()}",
        f"# command: python {' '.join(sys.argv)}",
    ]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def executed_flops(layout, mode, complement_ok):
    """Flops of the projection for [((m, n), count, k)]: with complement_ok as
    ProjectionGroups runs it (complement on sides with k > dim/2), else the direct form."""
    total = 0
    for (m, n), count, k in layout:
        lc = complement_ok and 2 * k > m
        rc = complement_ok and 2 * k > n
        total += count * reference.projection_flops(
            m, n, m - k if lc else k, n - k if rc else k, lc, rc, mode)
    return total


def naive_loop(grads, lefts, rights, mode):
    for g, u, v in zip(grads, lefts, rights):
        if mode == "two_sided":
            g.sub_(u @ (u.T @ g))
            g.sub_((g @ v) @ v.T)
        else:
            g.sub_(u @ ((u.T @ g) @ v) @ v.T)


def timed(fn, device, inner):
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - start) / inner


def bench_case(preset, layout, mode, device, dtype, rounds, backends, heavy=False):
    """layout: [((m, n), count, k)]; returns {method: {...}}. `heavy` (seconds per call):
    no warm-up call, no list:* methods, and only the preferred backend."""
    gen = torch.Generator().manual_seed(0)
    named, grads, lefts, rights, bases = [], [], [], [], {}
    for (m, n), count, k in layout:
        # One random orthonormal basis per side and shape (timing does not depend on
        # which), with its complement where the groups will use it (k > dim/2).
        side_bases = []
        for dim in (m, n):
            q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
            comp = ops.orthonormal_complement(q) if 2 * k > dim else None
            side_bases += [q.to(device, dtype),
                           None if comp is None else comp.to(device, dtype)]
        u, u_c, v, v_c = side_bases
        for i in range(count):
            name = f"{m}x{n}.{i}"
            p = torch.nn.Parameter(torch.zeros(m, n, device=device, dtype=dtype))
            named.append((name, p))
            bases[name] = (u, v, u_c, v_c)
            grads.append(torch.randn(m, n, generator=gen).to(device, dtype))
            lefts.append(u)
            rights.append(v)
    for name, p in named:
        p.grad = None

    methods = {"loop": lambda: naive_loop(grads, lefts, rights, mode)}
    if heavy:
        backends = backends[:1]
    for b in ([] if heavy else backends):
        methods[f"list:{b}"] = (lambda b=b: ops.project_(grads, lefts, rights, mode,
                                                          backend=b))
    groups_all = {}
    any_complement = any(2 * k > min(m, n) for (m, n), _, k in layout)
    for b in backends:
        for label, use_c in (("groups", "auto"), ("groups-direct", "never")):
            if label == "groups-direct" and not any_complement:
                continue
            g = ProjectionGroups(named, mode, backend=b, use_complement=use_c,
                                     check_orthonormal=False)
            g.set_bases({n: bases[n] for n, _ in named})
            g.attach_grads()
            for (_, p), src in zip(named, grads):
                p.grad.copy_(src)
            groups_all[f"{label}:{b}"] = g
            methods[f"{label}:{b}"] = g.project_grads_
    flops_groups = executed_flops(layout, mode, True)
    side = int(min(4096, max(32, (flops_groups / 2) ** (1 / 3))))
    a = torch.randn(side, side, device=device, dtype=dtype)
    bmat = torch.randn(side, side, device=device, dtype=dtype)
    methods["matmul"] = lambda: torch.mm(a, bmat)
    flops = {"loop": executed_flops(layout, mode, False), "matmul": 2 * side ** 3}
    for name in methods:
        if name.startswith("list:") or name.startswith("groups-direct"):
            flops[name] = flops["loop"]
        elif name.startswith("groups:"):
            flops[name] = flops_groups

    # Calibrate: one warm-up call each, then enough inner calls for ~20 ms per sample.
    inner = {}
    for name, fn in methods.items():
        t = 1.0 if heavy else timed(fn, device, 1)
        inner[name] = max(1, min(200, int(0.02 / max(t, 1e-7))))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():  # interleaved, so drift hits all alike
            samples[name].append(timed(fn, device, inner[name]))
    out = {}
    for name in methods:
        t = statistics.median(samples[name])
        ratios = [lt / mt for lt, mt in zip(samples["loop"], samples[name])]
        out[name] = {"ms": t * 1e3, "gflops": flops[name] / t / 1e9,
                     "flops": flops[name], "vs_loop": statistics.median(ratios)}
    for name in methods:
        out[name]["of_matmul"] = out[name]["gflops"] / out["matmul"]["gflops"]
    out["matmul"]["side"] = side
    del groups_all
    return out


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (3 if args.quick else 7)
    llama_count = args.llama_count
    if llama_count is None:
        llama_count = 1 if device.type == "cpu" else (8 if args.quick else 0)
    backends = ops.available_backends(device)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    for line in header("bench_projection", device, rounds,
                       f"  mode={args.mode}  dtype={args.dtype}"):
        say(line)
    results = {"device": str(device), "torch": torch.__version__, "mode": args.mode,
               "dtype": args.dtype, "threads": torch.get_num_threads(), "cases": []}
    for preset in args.shapes.split(","):
        base = PRESETS[preset]
        if preset.startswith("llama7b") and llama_count:
            base = [(shape, min(count, llama_count)) for shape, count in base]
            say(f"\n## {preset} REDUCED to {llama_count} matrix/matrices per shape "
                f"(full model: 128 + 64 + 32); ratios and GFLOP/s carry over, totals do not;"
                f" one timed round, no warm-up, list:* methods and other backends skipped")
        for frac in [float(f) for f in args.fracs.split(",")]:
            layout = [(shape, count, int(round(frac * min(shape)))) for shape, count in base]
            heavy = device.type == "cpu" and executed_flops(layout, args.mode, False) > 5e10
            res = bench_case(preset, layout, args.mode, device, dtype,
                             1 if heavy else rounds, backends, heavy)
            desc = ", ".join(f"{m}x{n} x{c} k={k}" for (m, n), c, k in layout)
            say(f"\n## {preset}  k={int(frac * 100)}%  [{desc}]")
            say(f"{'method':<22}{'ms':>11}{'GFLOP/s':>10}{'of matmul':>11}{'vs loop':>9}")
            for name, r in res.items():
                extra = f"  (matmul {r['side']}^2)" if name == "matmul" else ""
                say(f"{name:<22}{r['ms']:>11.3f}{r['gflops']:>10.1f}{r['of_matmul']:>10.0%}"
                    f"{r['vs_loop']:>8.2f}x{extra}")
            results["cases"].append({"preset": preset, "frac": frac, "layout": layout,
                                     "results": res})
    write_bench_outputs(args.out, args.name or f"projection_{device.type}", lines, results)


if __name__ == "__main__":
    main()
