#!/usr/bin/env bash
# Decode and prefill speed of the per-token rules at 50 % on the synthetic OLMoE-1B-7B (q4_0, 16 layers, 64 experts
# top-8): full budget, the uniform-split plan with Alloc-T (the controlled decode rule one token at a time) and
# without, uniform top-k, SER and top-p (values calibrated on the file's own routing of assets/calib.txt), in one
# interleaved `allocmoe bench --latency` run. Run it alone: speeds are noisy.
# usage: scripts/peers_speed.sh [OUT]   (default results/peers; about 10 minutes on 2 cores)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/results/peers}
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" synth --shape olmoe-1b-7b --type q4_0 -o "$WORK/olmoe-q4_0.gguf"
"$BIN" bench "$WORK/olmoe-q4_0.gguf" --budgets 1,0.5 -p 64 -n 128 --reps 5 -t 2 --latency \
    --peers "$REPO/allocmoe_edge/assets/calib.txt" --json "$OUT/olmoe-bench.json" | tee "$OUT/olmoe-bench.md"
