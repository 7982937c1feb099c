#!/usr/bin/env bash
# Every GPU number the README needs, in one go (about 6-8 minutes on one recent GPU; each step is capped).
#   bash benchmarks/device_suite.sh            # writes bench_results/device/*.json and prints the tables
# 1. forward time against batch size (1 ... 100) for the default model, celeba_hq_ddpm and ADM-256
#    (random weights; float32, bfloat16, float16 autocast and ADM's own fp16 torso);
# 2. DEQ vs sequential wall-clock on the trained default model, T = 25 and 100, deblur / sr4 / inpaint, per solver;
# 3. peak memory of the DEQ solve with and without max_batch;
# 4. the projected wall-clock of the two real checkpoints (measured batched forward cost x the rounds measured
#    on the default model), labelled as a projection.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/device}
mkdir -p "$OUT"
DEV=${DEVICE:-cuda}
run() { local cap=$1; shift; echo "== $*"; timeout "$cap" "$@" || echo "!! step ended with status $? (cap ${cap}s): $*"; }

run 180 python benchmarks/models.py --device "$DEV" --models default celeba_hq_ddpm imagenet256_adm --sizes 256 \
    --batches 1 2 4 8 16 25 50 100 --dtypes float32 bfloat16 float16 adm_fp16 --repeats 3 --total-budget 150 \
    --json "$OUT/models.json"
run 200 python benchmarks/deq_vs_sequential.py --device "$DEV" --T 25 100 --tasks deblur sr4 inpaint --images 1 \
    --size 256 --solvers anderson picard sliding_window quasi_newton "quasi_newton(w=8,tol=0.2)" \
    --json "$OUT/deq_vs_sequential.json"
run 60 python benchmarks/deq_vs_sequential.py --device "$DEV" --T 100 --tasks deblur --images 4 --size 256 \
    --solvers quasi_newton --max-batch 32 --json "$OUT/deq_max_batch32.json"
run 30 python benchmarks/projection.py --models "$OUT/models.json" --rounds "$OUT/deq_vs_sequential.json" \
    --size 256 --json "$OUT/projection.json"
echo "results in $OUT"
