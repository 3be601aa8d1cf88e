#!/usr/bin/env bash
# Time-to-quality runs (sat-train --time-to-quality), one after another, each writing
# benchmarks/results/time_to_quality/<model>_<task>_seed<seed><TAG>.json and .png.
#   bash benchmarks/time_to_quality.sh smollm2-135m:cpt:0 smollm2-135m:cpt:1 gemma3-270m:cpt:0
# Settings (environment): STEPS (dense steps, default 40), EVAL_EVERY (8), EVAL_EXAMPLES (6), SEQ (1024),
# BATCH (1 for cpt, 4 for sft), THREADS (1), PRECISION (bf16 where the CPU has avx512_bf16 or amx_bf16, else fp32),
# TAG (a suffix naming a variant, e.g. _exact_input) and EXTRA (more sat-train options, e.g. "--backward exact_input").
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=benchmarks/results/time_to_quality
if [ -z "${PRECISION:-}" ]; then
  if grep -q -m1 -E 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=bf16; else PRECISION=fp32; fi
fi
for run in "$@"; do
  IFS=: read -r model task seed <<< "$run"
  batch=${BATCH:-$([ "$task" = sft ] && echo 4 || echo 1)}
  name="${model}_${task}_seed${seed}${TAG:-}"
  echo "== $name: $(date -u +%FT%TZ)"
  OMP_NUM_THREADS=${THREADS:-1} sat-train --time-to-quality --preset ttq --model "$model" --task "$task" \
    --seed "$seed" --steps "${STEPS:-40}" --eval-every "${EVAL_EVERY:-8}" --eval-examples "${EVAL_EXAMPLES:-6}" \
    --seq-len "${SEQ:-1024}" --batch-size "$batch" --precision "$PRECISION" --threads "${THREADS:-1}" \
    --eval-batch-size 1 --output-dir "$OUT" --name "$name" --no-progress ${EXTRA:-} 2>&1 \
    | grep --line-buffered -v -E "Converting|Loading weights"
done
