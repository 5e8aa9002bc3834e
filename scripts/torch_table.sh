#!/usr/bin/env bash
# The torch-backend quality table of the bundled model (issue #4 item 6): uniform, Alloc-T alone
# (uniform+t), Alloc-L, Alloc-L+T and refine at 25/50/75/100 % budget on the held-out text.
# Usage: scripts/torch_table.sh [OUT_DIR]   (default results/torch-table; about 12 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/torch-table}
BIN=${ALLOCMOE_BIN:-.venv/bin/allocmoe}
A=allocmoe_edge/assets
mkdir -p "$OUT"
"$BIN" profile "$A/tiny-moe" --calib "$A/calib.txt" --max-tokens 8192 -o "$OUT/sensitivity.json"
plans=()
for b in 25 50 75; do
  "$BIN" allocate "$OUT/sensitivity.json" --budget "0.$b" --method alloc-l+t -o "$OUT/alloc-l+t-$b.json"
  "$BIN" allocate "$OUT/sensitivity.json" --budget "0.$b" --method uniform+t -o "$OUT/uniform+t-$b.json"
  "$BIN" refine "$A/tiny-moe" --plan "$OUT/alloc-l+t-$b.json" --calib "$A/calib.txt" --max-tokens 8192 \
    --steps 12 -o "$OUT/refined-$b.json" | tee "$OUT/refine-$b.txt"
  plans+=(--plan "$OUT/alloc-l+t-$b.json" --plan "$OUT/uniform+t-$b.json" --plan "$OUT/refined-$b.json")
done
"$BIN" eval "$A/tiny-moe" --backend torch --text "$A/heldout.txt" "${plans[@]}" --json "$OUT/eval.json" \
  | tee "$OUT/table.md"
