#!/usr/bin/env bash
# One-call GPU check (DESIGN.md section 7): install offline, run the GPU tests, benchmark at Llama shapes, and write
# everything under $OUT (default ./gpu_out). Meant for a lent H100/H200 with torch, triton, transformers, nvcc,
# pybind11 and ninja preinstalled. The short table is printed last.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh                 # both stages: up to about 13 minutes
#   OUT=/tmp/gpu STAGES=tests bash benchmarks/gpu_check.sh    # one stage per call when a call is limited to 10 min
#   OUT=/tmp/gpu STAGES=bench bash benchmarks/gpu_check.sh
# Stage time limits (timeouts below) are estimates: Triton compiles many configs on first use at each shape.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

log "install (no network)"
MAX_JOBS=${MAX_JOBS:-8} pip install --no-build-isolation --no-deps -q -e . > "$OUT/install.log" 2>&1 \
  || { log "install failed"; tail -30 "$OUT/install.log"; }
python -c "import sat_kernels as sk; print('backends:', sk.available_backends(), 'missing:', sk.unavailable_backends())" \
  | tee -a "$OUT/gpu.txt"

STAGES=${STAGES:-tests bench}
if [[ " $STAGES " == *" tests "* ]]; then
log "GPU tests"
timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit code $?" >> "$OUT/gpu_tests.log"
tail -5 "$OUT/gpu_tests.log"
fi

if [[ " $STAGES " == *" bench "* ]]; then
log "MLP microbenchmarks"
timeout 150 python -m sat_kernels.bench --results-dir "$OUT" mlp --shapes llama2-7b --tokens 8192 \
  --rates 0.0 0.5 0.75 --dtype bf16 > "$OUT/mlp_llama2_7b.md" 2> "$OUT/mlp_llama2_7b.err"
log "Triton GEMM-level benchmark"
timeout 180 python benchmarks/triton_mlp_speed.py --out "$OUT/triton_mlp_speed.json" \
  > "$OUT/triton_mlp_speed.md" 2> "$OUT/triton_mlp_speed.err"
log "CUDA selection benchmark"
timeout 60 python benchmarks/cuda_selection_speed.py --out "$OUT/cuda_selection_speed.json" \
  > "$OUT/cuda_selection_speed.md" 2> "$OUT/cuda_selection_speed.err"
log "training step"
timeout 90 python -m sat_kernels.bench --results-dir "$OUT" train-step --config llama2-7b-4l --batch 4 --seq 2048 \
  --rate 0.5 > "$OUT/train_step.md" 2> "$OUT/train_step.err"
fi

python -m sat_kernels.bench --results-dir "$OUT" plot > /dev/null 2>&1
log "done; files in $OUT"
echo
cat "$OUT/gpu.txt"
[ -f "$OUT/gpu_tests.log" ] && tail -3 "$OUT/gpu_tests.log"
[ -f "$OUT/mlp_llama2_7b.md" ] && grep -E "^\| (smollm2|llama)|^\| shape" "$OUT/mlp_llama2_7b.md" | grep -E "shape|full" \
  | cut -d'|' -f2-12
[ -f "$OUT/train_step.md" ] && grep -E "^\|" "$OUT/train_step.md" | cut -d'|' -f2-12
true
