#!/usr/bin/env bash
# The per-token rules side by side (issue 21, part 3), on both bundled models at 25 / 50 / 75 %: Alloc-L+T plans
# (the decode rule with its budget controller, and its "fixed" twin: the calibrated thresholds alone), per-layer
# top-k at the same counts (Alloc-L), uniform top-k, and SER and top-p at full budget, each value calibrated on the
# text the profiles calibrated on (assets/calib.txt, 8192 tokens) to the budget's mean activations.
# `allocmoe eval --decode --peers` (one token per ubatch, as generation runs) on held-out prose (in-domain) and this
# repository's Python source (off-domain). Off-domain, SER and top-p spend what their prose calibration says on
# prose only, so the Python source is evaluated again with them calibrated on other Python source (the tests'):
# that pair is at equal activations with the controlled decode rule, which holds its budget on any text.
# scripts/peers_summary.py makes the one table (summary.md).
# usage: scripts/peers_table.sh [OUT]   (default results/peers; CHUNKS=8; about 45 minutes on 2 cores)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/results/peers}
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
PY=${PYTHON:-$REPO/.venv/bin/python}
ASSETS=$REPO/allocmoe_edge/assets
CHUNKS=${CHUNKS:-8}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$ASSETS/heldout.txt" "$WORK/prose.txt"
cat "$REPO"/allocmoe_edge/*.py >"$WORK/code.txt"
cat "$REPO"/tests/*.py >"$WORK/code-calib.txt"
for model in tiny-moe deep-moe; do
    "$REPO/scripts/bundled_gguf.sh" "$model" "$WORK/$model.gguf" 0.25 0.5 0.75
    for text in prose code; do
        "$BIN" eval "$WORK/$model.gguf" --text "$WORK/$text.txt" --chunks "$CHUNKS" --decode \
            --peers "$ASSETS/calib.txt" --json "$OUT/$model-$text.json" | tee "$OUT/$model-$text.md"
    done
    "$BIN" eval "$WORK/$model.gguf" --text "$WORK/code.txt" --chunks "$CHUNKS" --decode \
        --peers "$WORK/code-calib.txt" --json "$OUT/$model-code-codecal.json" | tee "$OUT/$model-code-codecal.md"
done
"$PY" "$REPO/scripts/peers_summary.py" "$OUT" | tee "$OUT/summary.md"
