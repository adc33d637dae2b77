#!/usr/bin/env bash
# bash benchmarks/gpu_head_budget.sh OUT_DIR   (on the GPU machine; about 4 minutes)
#
# P1 (the sweep against plain forwards) and the sweep point's memory of bench_scale at GPU sizes, at the default
# head budget (256 MiB) and at 4096 MiB: whether the GPU's P1 miss in the first gpu_check (2.2x) is the head's
# many small chunks (about 70 rows of 151,936 each at 256 MiB, some 1,800 chunks per pass of E = 256 x 512).
set -uo pipefail
out=${1:?output folder}
for budget in 256 4096; do
  python3 benchmarks/bench_scale.py --device cuda --autocast bf16 --threads 16 --E-seqs 256 --E-len 512 \
    --U-seqs 64 --U-len 512 --microbatch 16 --repeats 1 --only P1 memory --head-budget "$budget" \
    --time-budget 100 --out "$out/head-budget-$budget.json" 2>&1 | grep -v Warning
done
