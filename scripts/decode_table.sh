#!/usr/bin/env bash
# Alloc-T's decode rule against per-layer top-k with the same counts, in the decode protocol (one
# token per ubatch, as generation runs), on a Hugging Face MoE checkpoint: profile (which records
# the routing statistics), Alloc-L+T plans at 25/50/75 % with decode thresholds, a q8_0 GGUF with
# all three, `allocmoe eval --decode` on the held-out text and, off distribution, on other text.
# usage: scripts/decode_table.sh [MODEL_DIR] [OUT]   (defaults: the bundled tiny-moe, results/decode-rule)
# About 25 minutes on 2 cores for the bundled model.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${1:-$REPO/allocmoe_edge/assets/tiny-moe}
OUT=${2:-$REPO/results/decode-rule}
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
ASSETS=$REPO/allocmoe_edge/assets
mkdir -p "$OUT"
"$BIN" profile "$MODEL" --calib "$ASSETS/calib.txt" --max-tokens 8192 -o "$OUT/sensitivity.json"
plans=()
for b in 0.25 0.5 0.75; do
    "$BIN" allocate "$OUT/sensitivity.json" --budget "$b" --method alloc-l+t --alloc-t both -o "$OUT/plan-$b.json"
    plans+=(--plan "$OUT/plan-$b.json")
done
"$BIN" convert "$MODEL" "${plans[@]}" --outtype q8_0 -o "$OUT/model.budget.gguf"
"$BIN" inspect "$OUT/model.budget.gguf" | tee "$OUT/inspect.txt"
"$BIN" eval "$OUT/model.budget.gguf" --text "$ASSETS/heldout.txt" --chunks 32 --decode --json "$OUT/eval-decode.json" \
    | tee "$OUT/eval-decode.md"
# off distribution: this repository's Python source, a register the model never saw
cat "$REPO"/allocmoe_edge/*.py >"$OUT/code.txt"
"$BIN" eval "$OUT/model.budget.gguf" --text "$OUT/code.txt" --chunks 16 --budgets 0.5,0.75 --decode \
    --json "$OUT/eval-decode-code.json" | tee "$OUT/eval-decode-code.md"
rm -f "$OUT/model.budget.gguf" "$OUT/code.txt"
