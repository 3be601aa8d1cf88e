#!/usr/bin/env bash
# The CPU speed tables of docs/benchmarks.md in one run: MLP, LoRA MLP and attention ops (fp32 and bf16, both forward
# modes, each against the package at BASELINE timed in the same rounds) and the training step (fp32 and bf16
# autocast). One thread, arms interleaved. Writes JSON under benchmarks/results/cpu_speed/<cpu tag>/ and prints the
# tables. About 60-80 minutes on one core of an AMD EPYC with AVX512-BF16.
#
#   BASELINE=963a742 bash benchmarks/cpu_speed_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
BASELINE=${BASELINE:-963a742}
ISA=$(grep -m1 -o -E 'amx_bf16|avx512_bf16' /proc/cpuinfo || echo no_bf16)
OUT=benchmarks/results/cpu_speed/${ISA}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "## $*"; "$@"; }
run python benchmarks/cpu_mlp_speed.py --baseline "$BASELINE" --repeats 9 --rates 0.25 0.5 0.75 \
  --shapes 2048x576x1536 2048x640x2048 1024x1024x2816 --out "$OUT/mlp.json"
run python benchmarks/cpu_mlp_speed.py --baseline "$BASELINE" --repeats 3 --shapes 1024x4096x11008 \
  --out "$OUT/mlp_llama2_7b.json"
run python benchmarks/cpu_mlp_speed.py --baseline "$BASELINE" --repeats 9 --lora-rank 16 \
  --shapes 2048x576x1536 1024x1024x2816 --out "$OUT/mlp_lora_r16.json"
for dtype in bfloat16 float32; do
  run python benchmarks/attention_speed.py --baseline "$BASELINE" --threads 1 --repeats 7 --dtype $dtype \
    --seqs 512 1024 --forward sparse dense --out "$OUT/attention_smollm2_$dtype.json"
  run python benchmarks/attention_speed.py --baseline "$BASELINE" --threads 1 --repeats 3 --dtype $dtype \
    --llama7b --seqs 1024 --forward sparse dense --out "$OUT/attention_llama2_7b_$dtype.json"
done
run sat-bench --threads 1 --results-dir "$OUT" train-step --config smollm2-135m --batch 1 --seq 2048 --steps 5 \
  --rate 0.5 --autocast bf16 --ladder
run sat-bench --threads 1 --results-dir "$OUT" train-step --config smollm2-135m --batch 1 --seq 2048 --steps 5 \
  --rate 0.5 --ladder
