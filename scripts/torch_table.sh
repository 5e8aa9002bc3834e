#!/usr/bin/env bash
# The quality table of a bundled model (issues #4 and #15): uniform, Alloc-T alone (uniform+t), Alloc-L,
# Alloc-L+T and refine at each budget, on all of the held-out text, with the torch backend (the bf16
# checkpoint's weights in float32: CPU bf16 matmuls are several times slower) and the llama backend (the
# same plans in one f32 GGUF, patched llama.cpp); plus the DP's
# additivity: each Alloc-L plan's predicted calibration KLD (sum of isolated layer costs) against its
# measured one (`refine --steps 0`, Alloc-T off). scripts/method_table.py writes the summary table.md.
# Plans use Alloc-T's batch rule (--alloc-t batch: what a chunk of 256 tokens runs in either backend).
# Usage: scripts/torch_table.sh [MODEL [OUT_DIR]]   MODEL: tiny-moe (default; OUT results/torch-table) or
# deep-moe (OUT results/deep-moe-table). tiny-moe: about 15 min on 2 cores; deep-moe: about an hour.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tiny-moe}
BIN=${ALLOCMOE_BIN:-.venv/bin/allocmoe}
PY=${ALLOCMOE_PYTHON:-.venv/bin/python}
A=allocmoe_edge/assets
case $MODEL in
  tiny-moe) OUT=${2:-results/torch-table}; BUDGETS="0.25 0.5 0.75" ;;  # 12.5 % is below 1 expert per layer
  deep-moe) OUT=${2:-results/deep-moe-table}; BUDGETS="0.125 0.25 0.5 0.75" ;;
  *) echo "unknown bundled model $MODEL (tiny-moe or deep-moe)" >&2; exit 2 ;;
esac
PRE=$("$PY" -c "from allocmoe_edge.assets import pre_tokenizer; print(pre_tokenizer('$MODEL') or '')")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
F32="$WORK/$MODEL-f32"
"$PY" -c "from allocmoe_edge.demo import float32_copy; float32_copy('$A/$MODEL', '$F32')"
mkdir -p "$OUT"
"$BIN" profile "$F32" --calib "$A/calib.txt" --max-tokens 8192 -o "$OUT/sensitivity.json"
plans=()
for b in $BUDGETS; do
  p=$(printf '%g' "$("$PY" -c "print(100 * $b)")")
  "$BIN" allocate "$OUT/sensitivity.json" --budget "$b" --method alloc-l+t --alloc-t batch \
    -o "$OUT/alloc-l+t-$p.json"
  "$BIN" allocate "$OUT/sensitivity.json" --budget "$b" --method uniform+t --alloc-t batch \
    -o "$OUT/uniform+t-$p.json"
  "$BIN" allocate "$OUT/sensitivity.json" --budget "$b" --method alloc-l -o "$OUT/alloc-l-$p.json"
  "$BIN" refine "$F32" --plan "$OUT/alloc-l+t-$p.json" --calib "$A/calib.txt" --max-tokens 8192 \
    --steps 12 -o "$OUT/refined-$p.json" | tee "$OUT/refine-$p.txt"
  "$BIN" refine "$F32" --plan "$OUT/alloc-l-$p.json" --calib "$A/calib.txt" --max-tokens 8192 \
    --steps 0 -o "$OUT/additivity-$p.json" | tee "$OUT/additivity-$p.txt"
  plans+=(--plan "$OUT/alloc-l+t-$p.json" --plan "$OUT/uniform+t-$p.json" --plan "$OUT/refined-$p.json")
done
"$BIN" eval "$F32" --backend torch --text "$A/heldout.txt" "${plans[@]}" --json "$OUT/eval.json" \
  | tee "$OUT/torch.md"
"$BIN" convert "$A/$MODEL" "${plans[@]}" --outtype f32 ${PRE:+--pre-tokenizer "$PRE"} -o "$WORK/$MODEL-f32.gguf"
"$BIN" eval "$WORK/$MODEL-f32.gguf" --text "$A/heldout.txt" --json "$OUT/eval-llama.json" | tee "$OUT/llama.md"
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- allocmoe_edge scripts || echo "-dirty")
{ echo "Reproduced by \`scripts/torch_table.sh $MODEL\` at commit $commit."; echo
  "$PY" scripts/method_table.py "$OUT"; } | tee "$OUT/table.md"
