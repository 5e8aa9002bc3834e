#!/usr/bin/env bash
# Decode and prefill speed of the per-token rules at 50 % on the bundled deep-moe (q8_0, 8 layers, 32 experts top-8,
# the file of scripts/peers_table.sh): full budget, the Alloc-L+T plan (the controlled decode rule one token at a
# time, the batch rule in prefill) and Alloc-L alone, uniform top-k, SER and top-p (values calibrated on
# assets/calib.txt), in one interleaved `allocmoe bench --latency` run. Run it alone: speeds are noisy.
# (The synthetic files' random routers are too peaked for SER and top-p: every token's top weight is about 1,
# so no value reaches a 50 % budget and `--peers` refuses them.)
# usage: scripts/peers_speed.sh [OUT]   (default results/peers; about 10 minutes on 2 cores)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/results/peers}
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
ASSETS=$REPO/allocmoe_edge/assets
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$REPO/scripts/bundled_gguf.sh" deep-moe "$WORK/deep-moe.gguf" 0.25 0.5 0.75
"$BIN" bench "$WORK/deep-moe.gguf" --budgets 1,0.5 -p 64 -n 128 --reps 5 -t 2 --latency \
    --peers "$ASSETS/calib.txt" --json "$OUT/deep-moe-bench.json" | tee "$OUT/deep-moe-bench.md"
