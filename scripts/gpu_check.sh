#!/usr/bin/env bash
# One-shot GPU check of cl-runner on one H100/H200, in under 10 minutes, no internet needed
# when the machine has a CUDA torch:
#
#   scripts/gpu_check.sh [--dry-run] [--only GROUPS] [--budget SECONDS] [--parallel N]
#                        [--python PATH] [--full-7b]
#
#  1 setup   Python: .venv if its torch sees CUDA; else a venv over the system's CUDA torch
#            (python3 -m venv --system-site-packages; .venv-gpu when a CPU .venv is there);
#            else `make install TORCH_SPEC=...` (a CUDA wheel: needs the index, or a wheelhouse
#            through PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR). --python PATH uses PATH as it is.
#  2 build   The extension's CUDA build as `make install` does it (pip install
#            --no-build-isolation -e .); where that cannot run (setuptools < 77 offline) the
#            same CUDAExtension is built directly. Then: the `cuda` backend must be loaded.
#  3 pytest  tests/gpu, tests/unit/test_ops.py (its cuda cases) and the plain-nvcc kernel compile; a skipped test counts as a failure.
#  4 runs    A 2-task bf16 tiny_llama run on cuda of every strategy (seq_ft, multitask,
#            svd_orthogonal (also with ops.backend=cuda), hft, ewc, classp, rewarm_replay,
#            the lines add-on) and one with trainer.sharding=fsdp; --parallel at a time.
#  5 bench   scripts/bench_projection.py (fp32 and bf16) and bench_subspace.py on the GPU,
#            7B shapes included (reduced matrix counts; --full-7b adds all 224 7B matrices).
#
# Every step has its own timeout (cut to what is left of --budget, default 570 s; a step
# with under 20 s left is SKIPped) and a failure does not stop the others. Logs:
# results/bench/gpu_check_logs/<step>.log; summary: results/bench/gpu_check.md and .json
# (gpu_check_partial.* with --only);
# benchmark tables: results/bench/gpu_*.txt|json; run folders: results/gpu_check/<time>/.
# A PASS/FAIL table is printed at the end; the exit status is 0 only if every step passed.
# --only takes groups or step names, comma-separated (e.g. --only runs,bench_subspace).
# --dry-run prints the plan and every command, and runs nothing.

# shellcheck disable=SC2317  # the sub-commands below run through `gpu_check.sh __internal`
set -u

DRY_RUN=0
ONLY=""
BUDGET=570
PARALLEL=4
PY_GIVEN=""
FULL_7B=0
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"}
# Where the strategy runs must have run (a check of metrics.json); cpu only to try the script.
DEVICE=${GPU_CHECK_DEVICE:-cuda}

RUN_BASE=(logger=none model=tiny_llama trainer.steps_per_task=10 task_stream.train_size=64
          task_stream.test_size=16 "task_stream.order=[increment,decrement]" trainer.batch_size=8
          trainer.progress_bar=false trainer.precision=bf16)
RUN_NAMES=(seq_ft multitask svd_orthogonal svd_orthogonal_cuda_ops hft ewc classp rewarm_replay lines fsdp)
run_overrides() {
  case "$1" in
    seq_ft) echo "strategy=seq_ft" ;;
    multitask | svd_orthogonal | hft | ewc | classp | rewarm_replay) echo "strategy=$1" ;;
    svd_orthogonal_cuda_ops) echo "strategy=svd_orthogonal ops.backend=cuda" ;;
    lines) echo "lines.enabled=true" ;;
    fsdp) echo "trainer.sharding=fsdp" ;;
    *) return 1 ;;
  esac
}

# --- internal sub-commands (the script calls itself under `timeout`) ---------------------

strategy_run() {  # NAME RUN_DIR: run, then check metrics.json (R filled, ran on $DEVICE)
  local name=$1 run_dir=$2 extra
  extra=$(run_overrides "$name") || { echo "unknown run $name"; return 2; }
  # shellcheck disable=SC2086  # extra holds several overrides, none with spaces
  OMP_NUM_THREADS=2 "$PY" -m cl_runner.cli "${RUN_BASE[@]}" $extra "output_dir=$run_dir" || return $?
  "$PY" - "$run_dir" "$DEVICE" <<'EOF'
import json, pathlib, sys
run, device = pathlib.Path(sys.argv[1]), sys.argv[2]
m = json.loads((run / "metrics.json").read_text())
ran_on = str(m.get("environment", {}).get("device"))
assert ran_on.startswith(device), f"ran on {ran_on}, not on {device}"
assert len(m["R"]) == 3 and all(len(row) == 2 for row in m["R"]), f"R is {m['R']}"
print(f"OK {ran_on}: ACC={m.get('ACC')} peak memory {m.get('peak_memory_bytes')} B ({m.get('peak_memory_kind')}),"
      f" {m.get('distributed')}")
EOF
}

build_extension() {  # as make install builds it; the CUDAExtension directly where that cannot run
  local ok='import sys, cl_runner.ops as o; s = o.extension_status(); print(s); sys.exit(0 if s.endswith("(with CUDA kernels)") else 1)'
  "$PY" -c 'import torch; from torch.utils import cpp_extension as c; print("torch", torch.__version__, "CUDA", torch.version.cuda, "CUDA_HOME", c.CUDA_HOME)'
  echo "== pip install --no-build-isolation --no-deps -e ."
  if "$PY" -m pip install --no-build-isolation --no-deps -e . && "$PY" -c "$ok"; then
    return 0
  fi
  echo "== pip could not build it with the CUDA kernels: building the CUDAExtension directly"
  "$PY" - <<'EOF' || return $?
import glob, os, shutil, tempfile
from setuptools import setup
from torch.utils import cpp_extension

repo = os.getcwd()
src = [os.path.join(repo, "csrc", f) for f in ("projection.cpp", "projection_cuda.cpp", "projection_kernels.cu")]
ext = cpp_extension.CUDAExtension(  # as setup.py defines it
    "cl_runner.ops._C", src, define_macros=[("CL_RUNNER_WITH_CUDA", "1")],
    extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O3"]})
work = tempfile.mkdtemp(prefix="cl_runner_ext_")
os.chdir(work)  # away from pyproject.toml: only the extension is built
setup(name="cl_runner_ext", ext_modules=[ext],
      cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
      script_args=["build_ext", "--build-lib", os.path.join(work, "lib"), "--build-temp", os.path.join(work, "tmp")])
(built,) = glob.glob(os.path.join(work, "lib", "cl_runner", "ops", "_C*.so"))
for old in glob.glob(os.path.join(repo, "cl_runner", "ops", "_C*.so")):
    os.remove(old)
shutil.copy2(built, os.path.join(repo, "cl_runner", "ops"))
print("built", os.path.basename(built))
EOF
  "$PY" -c "$ok"
}

check_extension() {
  "$PY" - <<'EOF'
import torch
import cl_runner.ops as o
print(torch.cuda.get_device_name(0), "|", o.extension_status(), "|", o.available_backends("cuda"))
assert o.extension_status().endswith("(with CUDA kernels)"), "the CUDA kernels are not built"
assert o.available_backends("cuda")[0] == "cuda", "cuda is not the preferred backend on a GPU"
EOF
}

run_pytest() {  # every test must run: a skip on a GPU means something is missing
  local log
  log=$(mktemp)
  "$PY" -m pytest tests/gpu tests/unit/test_ops.py tests/unit/test_ops_build.py -q -rs -p no:cacheprovider 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ] && grep -q '^SKIPPED' "$log"; then
    echo "FAIL: $(grep -c '^SKIPPED' "$log") skip line(s) above: on a GPU every test must run"
    rc=3
  fi
  rm -f "$log"
  return "$rc"
}

cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; }

setup_python() {  # sets PY; the chosen route is logged
  local venv=.venv
  if [ -n "$PY_GIVEN" ]; then
    PY=$PY_GIVEN
    echo "using --python $PY as it is"
    return 0
  fi
  if cuda_torch .venv/bin/python; then
    PY=.venv/bin/python
    echo "using .venv (its torch sees CUDA)"
    return 0
  fi
  [ -e .venv ] && venv=.venv-gpu  # a CPU .venv stays as it is
  PY=$venv/bin/python
  if cuda_torch "$PY"; then
    echo "using $venv (its torch sees CUDA)"
  elif cuda_torch python3; then
    echo "venv $venv over the system's CUDA torch: python3 -m venv --system-site-packages $venv"
    python3 -m venv --system-site-packages "$venv" || return 1
  else
    echo "no CUDA torch here: make install VENV=$venv TORCH_SPEC=\"$TORCH_SPEC\""
    timeout 480 make install VENV="$venv" TORCH_SPEC="$TORCH_SPEC" || return 1
  fi
  cuda_torch "$PY" || { echo "$PY: torch does not see a GPU"; return 1; }
}

check_dependencies() {  # what cl-run and the tests import; installed from the pins if missing
  local imports="transformers, accelerate, datasets, hydra, omegaconf, wandb, tqdm, matplotlib, rouge_score, rapidfuzz, psutil, numpy, safetensors, pytest"
  "$PY" -c "import $imports" && return 0
  echo "== missing packages: pip install -c <constraints.txt without torch> -e '.[dev]' (needs the index or PIP_FIND_LINKS)"
  local pins
  pins=$(mktemp)
  { grep -v '^torch[=<>!~ ;]' constraints.txt
    "$PY" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])"; } > "$pins"
  "$PY" -m pip install -q --retries 1 --timeout 15 -c "$pins" "setuptools>=77" wheel ninja
  "$PY" -m pip install -q --retries 1 --timeout 15 -c "$pins" --no-build-isolation -e ".[dev]"
  rm -f "$pins"
  "$PY" -c "import $imports"
}

if [ "${1:-}" = "__internal" ]; then
  PY=${GPU_CHECK_PY:?}
  cd "$(dirname "$0")/.." || exit 2
  shift
  "$@"
  exit $?
fi

# --- options -----------------------------------------------------------------------------

usage() { sed -n '2,/^$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --parallel) PARALLEL=${2:?--parallel needs a number}; shift ;;
    --python) PY_GIVEN=${2:?--python needs a path}; shift ;;
    --full-7b) FULL_7B=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET$PARALLEL" in *[!0-9]*) echo "gpu_check.sh: --budget and --parallel take whole numbers" >&2; exit 2 ;; esac
[ "$PARALLEL" -ge 1 ] || PARALLEL=1

cd "$(dirname "$0")/.." || exit 2
SELF=scripts/gpu_check.sh
OUT=results/bench
LOGS=$OUT/gpu_check_logs
RUNS=results/gpu_check/$(date +%Y%m%d-%H%M%S)
START=$SECONDS
STEPS=()
STATE=$(mktemp -d)  # <step>.status: "RESULT SECONDS" (steps in the background write them too)
trap 'rm -rf "$STATE"' EXIT
[ "$DRY_RUN" = 1 ] || mkdir -p "$LOGS"  # each step overwrites its own log

wanted() {  # STEP GROUP: selected by --only (or no --only)
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"* | *",$2,"*) return 0 ;; esac
  return 1
}

record() {  # NAME STATUS SECONDS
  echo "$2 $3" > "$STATE/$1.status"
}

step() {  # NAME TIMEOUT CMD...: run CMD under timeout, log it, record PASS/FAIL/TIMEOUT/SKIP
  local name=$1 limit=$2 left t0 rc status
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if [ "$DRY_RUN" = 1 ]; then
    printf '[dry-run] %-26s %4ss  %s\n' "$name" "$limit" "$(printf '%q ' "$@")"
    record "$name" DRY 0
    return 0
  fi
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIP (time budget spent)" | tee "$LOGS/$name.log"
    record "$name" SKIP 0
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s)"
  t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  record "$name" "$status" $((SECONDS - t0))
  echo "   $name: $status ($((SECONDS - t0))s)"
  [ "$status" = PASS ] || tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
  return "$rc"
}

describe() {  # what an internal sub-command runs, for --dry-run
  case "$1" in
    strategy_run) echo "$PY -m cl_runner.cli ${RUN_BASE[*]} $(run_overrides "$2") output_dir=$3  (then: metrics.json R 3x2, ran on $DEVICE)" ;;
    build_extension) echo "$PY -m pip install --no-build-isolation --no-deps -e .  (else the CUDAExtension built directly); extension_status must say 'with CUDA kernels'" ;;
    check_extension) echo "$PY: extension_status() ends '(with CUDA kernels)', available_backends('cuda')[0] == 'cuda'" ;;
    run_pytest) echo "$PY -m pytest tests/gpu tests/unit/test_ops.py tests/unit/test_ops_build.py -q -rs  (a skip fails)" ;;
    check_dependencies) echo "$PY -c 'import transformers, accelerate, ...'  (missing: pip install -c constraints.txt -e .[dev])" ;;
    *) echo "$*" ;;
  esac
}

internal() {  # NAME TIMEOUT SUBCOMMAND ARGS...: a function above, under timeout
  local name=$1 limit=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    printf '[dry-run] %-26s %4ss  %s\n' "$name" "$limit" "$(describe "$@")"
    record "$name" DRY 0
    return 0
  fi
  step "$name" "$limit" env GPU_CHECK_PY="$PY" GPU_CHECK_DEVICE="$DEVICE" bash "$SELF" __internal "$@"
}

seq_step() {  # step|internal NAME ...: a step run now, in order
  STEPS+=("$2")
  "$@"
}

echo "# cl-runner GPU check: budget ${BUDGET}s, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname)"
if [ "$DRY_RUN" = 1 ]; then
  PY=${PY_GIVEN:-python}
  echo "[dry-run] setup: --python if given; else .venv if its torch sees CUDA; else a venv over the system's CUDA torch (.venv, or .venv-gpu beside a CPU .venv); else make install TORCH_SPEC=\"$TORCH_SPEC\""
  STEPS+=(setup); record setup DRY 0
elif wanted setup setup || [ -z "$PY_GIVEN" ]; then
  STEPS+=(setup)
  t0=$SECONDS
  if setup_python > "$LOGS/setup.log" 2>&1; then record setup PASS $((SECONDS - t0)); else record setup FAIL $((SECONDS - t0)); fi
  echo "== setup: $(cut -d' ' -f1 < "$STATE/setup.status"), python $PY"
else
  PY=$PY_GIVEN
fi
if [ "$DRY_RUN" = 0 ]; then  # an absolute path: the sub-commands run it from elsewhere too
  case "$PY" in
    /*) ;;
    */*) PY=$(pwd)/$PY ;;
    *) PY=$(command -v "$PY" || echo "$PY") ;;
  esac
fi
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if command -v nvcc > /dev/null; then
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  export CUDA_HOME
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

wanted dependencies setup && seq_step internal dependencies 300 check_dependencies
wanted gpu setup && seq_step step gpu 60 nvidia-smi

# --- 2 build, 3 pytest --------------------------------------------------------------------------

wanted build_extension build && seq_step internal build_extension 300 build_extension
wanted check_extension build && seq_step internal check_extension 60 check_extension
wanted pytest_gpu pytest && seq_step internal pytest_gpu 240 run_pytest

# --- 4 runs: every strategy, 2 tasks, bf16, on the GPU -------------------------------------

for name in "${RUN_NAMES[@]}"; do
  wanted "run_$name" runs || continue
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
  STEPS+=("run_$name")
  internal "run_$name" 240 strategy_run "$name" "$RUNS/$name" &
  [ "$DRY_RUN" = 1 ] && wait
done
wait

# --- 5 benchmarks (alone on the GPU) ---------------------------------------------------------

bench() { seq_step step "$1" "$2" env OMP_NUM_THREADS=4 "$PY" "${@:3}"; }
wanted bench_projection bench && bench bench_projection 200 scripts/bench_projection.py --device cuda --quick \
  --name gpu_projection
wanted bench_projection_bf16 bench && bench bench_projection_bf16 120 scripts/bench_projection.py --device cuda \
  --quick --dtype bfloat16 --shapes tiny_llama,minilm,llama7b,llama7b_attn --name gpu_projection_bf16
wanted bench_subspace bench && bench bench_subspace 150 scripts/bench_subspace.py --device cuda --quick \
  --llama-count 2 --name gpu_subspace
if [ "$FULL_7B" = 1 ]; then
  wanted bench_projection_7b_full bench && bench bench_projection_7b_full 400 scripts/bench_projection.py \
    --device cuda --dtype bfloat16 --shapes llama7b,llama7b_attn --fracs 0.25,0.5 --rounds 3 --llama-count 0 \
    --name gpu_projection_7b_full
fi

# --- summary ---------------------------------------------------------------------------------

TOTAL=$((SECONDS - START))
ALL_PASS=1
TABLE=$(mktemp)
printf '%-28s %-8s %6s  %s\n' step result seconds note
for name in ${STEPS[@]+"${STEPS[@]}"}; do
  read -r status secs < "$STATE/$name.status" 2> /dev/null || { status=MISSING; secs=0; }
  note=""
  [ -f "$LOGS/$name.log" ] && [ "$DRY_RUN" = 0 ] && note=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-110)
  [ "$status" = SKIP ] && note="not run: under 20 s of the --budget left"
  [ "$status" = TIMEOUT ] && note="timed out; $note"
  [ "$status" = PASS ] || ALL_PASS=0
  printf '%-28s %-8s %6s  %s\n' "$name" "$status" "$secs" "$note"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$note" >> "$TABLE"
done
echo "total ${TOTAL}s of a ${BUDGET}s budget; logs in $LOGS/"
if [ "$DRY_RUN" = 0 ]; then
  SUMMARY_PY=$PY
  "$SUMMARY_PY" -c 'import json' 2> /dev/null || SUMMARY_PY=python3
  GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2> /dev/null | head -n 1)
  SUMMARY=gpu_check
  [ -n "$ONLY" ] && SUMMARY=gpu_check_partial  # a rerun of some steps keeps the full run's summary
  "$SUMMARY_PY" - "$TABLE" "$OUT" "$SUMMARY" "$TOTAL" "$BUDGET" "${GPU_NAME:-no nvidia-smi}" "$PY" <<'EOF'
import datetime, platform, subprocess, sys
sys.path.insert(0, "scripts")
from bench_output import write_bench_outputs

table, out, name, total, budget, gpu, py = sys.argv[1:8]
rows = [line.rstrip("\n").split("\t") for line in open(table) if line.strip()]
try:
    torch = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
except OSError:
    torch = "?"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = ["# GPU check (scripts/gpu_check.sh)", "",
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}, GPU {gpu}, "
         f"torch {torch}, commit {commit}; {total} s of a {budget} s budget. Logs: results/bench/gpu_check_logs/.",
         "", "| step | result | seconds | last line of its log |", "| --- | --- | --- | --- |"]
lines += [f"| {n} | {s} | {t} | {note.replace('|', '/')} |" for n, s, t, note in (r + [""] * (4 - len(r)) for r in rows)]
write_bench_outputs(out, name, lines, {"gpu": gpu, "torch": torch, "commit": commit, "total_s": int(total),
                                              "budget_s": int(budget),
                                              "steps": [dict(zip(("step", "result", "seconds", "note"), r)) for r in rows]},
                    suffix=".md")
EOF
fi
rm -f "$TABLE"
PARTIAL=""
[ -n "$ONLY" ] && PARTIAL=" (only: $ONLY)"
if [ "$ALL_PASS" = 1 ] && [ "$DRY_RUN" = 0 ]; then echo "GPU CHECK: PASS$PARTIAL"; exit 0; fi
[ "$DRY_RUN" = 1 ] && { echo "(dry run: nothing was run)"; exit 0; }
echo "GPU CHECK: FAIL$PARTIAL"
exit 1
