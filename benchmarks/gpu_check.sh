#!/usr/bin/env bash
# One-call GPU check (docs/design.md section 7, issue 12): on a lent H100/H200 with torch, triton, transformers, nvcc,
# pybind11 and pytest preinstalled and no network, in at most 10 minutes it
#   1. builds the CUDA extension with SAT_KERNELS_FORCE_CUDA_BUILD=1 and FAILS when "cuda" or "triton" is missing from
#      sk.available_backends();
#   2. runs the CUDA extension tests, then the other GPU tests, on their own;
#   3. runs the Triton tests, bf16 first with -x --durations=20, then the every-config and int64-offset tests in bf16,
#      and fp16/fp32 last;
#   4. checks both GPU backends against the torch backend at Llama-2-7B MLP shapes (T 8192 and 8191, omission 0.5 and
#      0.6, first and second call timed, output and every gradient at the same kept set: gpu_backend_check.py);
#   5. times the training step (sat-bench train-step, 4 Llama-2-7B layers, 4 x 2048 tokens) with each backend;
#   6. writes $OUT/gpu_check.json (device, versions, git revision, every stage and result; copied to
#      benchmarks/results/gpu_check.json) and prints the short tables last.
# The microbenchmarks (sat-bench mlp, benchmarks/triton_mlp_speed.py, benchmarks/cuda_selection_speed.py) do not fit
# in the same 10 minutes: run them in a call of their own.
# Every line goes to the terminal as it is produced and to $OUT/gpu_check.log, and each stage appends its verdict to
# $OUT/stages.jsonl when it ends, so a run cut short keeps every finished result. Exit status 1 if any stage failed.
#
#   OUT=/tmp/gpu GIT_REV=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh      # all stages
#   OUT=/tmp/gpu STAGES="build llama" bash benchmarks/gpu_check.sh                       # some stages
# RESULTS: where the summary is copied (default benchmarks/results/gpu_check.json).
#
# Time. BUDGET_S (default 560) bounds the whole run: a stage gets min(its limit, what is left) and is skipped when
# less than 30 s would be left for it. Expected times come from compile counts: Triton compiles each kernel once per
# config and JIT specialisation (divisibility of its integer arguments by 16), and a bf16 compile for sm_90a took
# 0.7 s of one core on average (benchmarks/triton_static_check.py, 52 compiles in 35 s, triton 3.9, the 2-core
# development machine); the rest is process start-up and GPU work, not measured on a GPU yet.
#   build   (limit 150 s, expected  40 s): nvcc, 3 sources for sm_80 and sm_90 (35 s wall on 2 busy cores).
#   ext     (limit 120 s, expected  60 s): tests/test_cuda_ext.py, no Triton compile; fp64 references up to
#                                          2048 x 4096 x 11008 in 4 dtypes.
#   gpu     (limit  90 s, expected  30 s): the other gpu-marked tests (torch backend on CUDA), no Triton compile.
#   triton  (limit 150 s, expected  60 s): tests/test_triton.py bf16 and the host-side/static tests: about 25 compiles
#                                          (one config per kernel, 3 shape specialisations) and 16 static compiles.
#   slow    (limit 150 s, expected  90 s): every config in bf16 (about 60 compiles) and T = 196000 (8 compiles).
#   llama   (limit 150 s, expected  90 s): autotuning at T = 8192 (36 configs compiled and timed), T = 8191 (8 more
#                                          compiles), fp64 references at 8192 x 4096 x 11008.
#   train   (limit 180 s, expected 120 s): three processes (torch, triton, cuda); triton re-times its 36 configs
#                                          from the on-disk compile cache.
#   rest    (what is left):                tests/test_triton.py in fp16 and fp32 (about 40 compiles).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
rm -f "$OUT/stages.jsonl" "$OUT/backends.jsonl" "$OUT/train_step.jsonl"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${STAGES:-build ext gpu triton slow llama train rest}
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-560}))
RESERVE=20   # for the summary
log() { echo "[gpu_check +$(($(date +%s) - START))s] $*"; }

# run_stage NAME LIMIT_S EXPECTED_S COMMAND: run COMMAND (bash) under a time limit; one line in stages.jsonl.
run_stage() {
  local name=$1 limit=$2 expected=$3 cmd=$4 left status rc t0
  [[ " $STAGES " == *" $name "* ]] || return 0
  left=$((DEADLINE - RESERVE - $(date +%s)))
  if ((left < 30)); then
    log "stage $name SKIPPED: ${left} s left of BUDGET_S"
    echo "{\"stage\": \"$name\", \"status\": \"skipped\", \"seconds\": 0, \"limit_s\": 0, \"expected_s\": $expected}" \
      >> "$OUT/stages.jsonl"
    return 0
  fi
  ((limit > left)) && limit=$left
  log "stage $name (limit ${limit} s, expected ${expected} s): $cmd"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd"
  rc=$?
  case $rc in 0) status=pass ;; 124 | 137) status=timeout ;; *) status=fail ;; esac
  log "stage $name: $status (exit $rc) after $(($(date +%s) - t0)) s"
  echo "{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit," \
    "\"expected_s\": $expected}" >> "$OUT/stages.jsonl"
}

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"

PYTEST="python -m pytest -p no:cacheprovider -q -rfEs"
# Triton test selections: bf16 and the host-side/static checks first, the slow bf16 ones, then the rest (the
# interpreter tests are CI's and stay out)
FIRST="bfloat16 or no_host_sync or inductor or autotuning_runs or tensors_device or dot_precision or fp32_without \
or odd_kept_count"
SLOW="every_config or offsets_past or autotuned_first_call"
CPU_ONLY="interpreter_cases or gpu_backend_check"
run_stage build 150 40 'SAT_KERNELS_FORCE_CUDA_BUILD=1 python setup.py -q build_ext --inplace && python -c "
import sys, sat_kernels as sk
print(\"backends:\", sk.available_backends(), \"missing:\", sk.unavailable_backends())
missing = {b: sk.unavailable_backends().get(b) for b in (\"cuda\", \"triton\") if b not in sk.available_backends()}
sys.exit(f\"FAIL: GPU backends missing: {missing}\" if missing else 0)"'
run_stage ext 120 60 "$PYTEST tests/test_cuda_ext.py --durations=10"
run_stage gpu 90 30 "$PYTEST -m gpu tests --ignore=tests/test_cuda_ext.py --ignore=tests/test_triton.py --durations=10"
run_stage triton 150 60 "$PYTEST tests/test_triton.py -x --durations=20 -k '$FIRST'"
run_stage slow 150 90 "$PYTEST tests/test_triton.py -x --durations=20 --runslow -k '$SLOW'"
run_stage llama 150 90 "python benchmarks/gpu_backend_check.py --out '$OUT/backends.jsonl'"
run_stage train 180 120 "rc=0; for b in torch triton cuda; do python -m sat_kernels.bench --results-dir '$OUT' \
train-step --config llama2-7b-4l --batch 4 --seq 2048 --rate 0.5 --backend \$b || rc=1; done; exit \$rc"
run_stage rest 600 60 "$PYTEST tests/test_triton.py -x --durations=20 \
-k 'not ($FIRST) and not ($SLOW) and not ($CPU_ONLY)'"

log "summary"
python benchmarks/gpu_check_summary.py "$OUT" --copy-to "${RESULTS:-benchmarks/results/gpu_check.json}"
