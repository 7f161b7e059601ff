#!/usr/bin/env bash
# The GPU measurements of "DP training near the non-private floor", as ONE command:
#
#   bash benchmarks/gpu_dp_step.sh                 # on a CUDA machine (H100/H200): ~10 min
#   DEVICE=cpu SIZE=tiny BATCH=4 ROUNDS=1 E2E_STEPS=0 bash benchmarks/gpu_dp_step.sh  # smoke
#
# 1. clipping_overhead.py: the `base` Conformer (29M) at batch 64, bf16 autocast, privasr's
#    per-example step (seeded and secure noise) vs a non-private step vs Opacus hooks / ghost,
#    side by side in one run (one worker process per variant), peak CUDA memory, and a torch
#    profile of the per-example and non-private steps with the kernels that dominate the GPU
#    time -> $OUT/clipping_overhead_${DEVICE}_${SIZE}_bf16.json
#    (BENCH_ARGS: more options for it, e.g. --no-memory)
# 2. e2e_throughput.py: audio-seconds trained per second, DP recipe vs non-private recipe,
#    through `privasr train` (skipped with E2E_STEPS=0) -> $OUT/e2e_throughput_${DEVICE}.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-base}
BATCH=${BATCH:-64}
ROUNDS=${ROUNDS:-15}
WARMUP=${WARMUP:-3}
E2E_STEPS=${E2E_STEPS:-100}
OUT=${OUT:-benchmarks/results}
THREADS=${THREADS:-$(nproc)}

"$PY" benchmarks/clipping_overhead.py --device "$DEVICE" --size "$SIZE" --batch "$BATCH" --bf16 \
    --rounds "$ROUNDS" --warmup "$WARMUP" --threads "$THREADS" --profile \
    --variants nonprivate per_example per_example_secure opacus_hooks opacus_ghost \
    --out "$OUT/clipping_overhead_${DEVICE}_${SIZE}_bf16.json" ${BENCH_ARGS:-}

if [ "$E2E_STEPS" -gt 0 ]; then
    "$PY" benchmarks/e2e_throughput.py --steps "$E2E_STEPS" --repeats 2 --threads "$THREADS" \
        --work "runs/e2e_throughput_${DEVICE}" --out "$OUT/e2e_throughput_${DEVICE}.json" \
        "device=$DEVICE" "bf16=$( [ "$DEVICE" = cuda ] && echo true || echo false )"
fi
