#!/usr/bin/env bash
# The decode rule's budget controller (patch 0010) on three kinds of text, on both bundled models at 50 %:
# `allocmoe eval --decode` (one token per ubatch, as generation runs) gives mean activations per token, the
# least and the most over any 64-token window, KLD / PPL / top-1, for the controlled decode rule (the default),
# the calibrated thresholds alone ("fixed"), per-layer top-k at the same counts and uniform top-k. Texts: held-out
# prose (the calibration text's kind), this repository's Python source, random characters. Then the decode
# speed of the controlled and the fixed rule on the OLMoE-1B-7B synth (`bench --fixed-thresholds`, interleaved).
# usage: scripts/decode_control_table.sh [OUT]   (default results/decode-control; CHUNKS=8; about 25 minutes
# on 2 cores)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/results/decode-control}
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
PY=${PYTHON:-$REPO/.venv/bin/python}
ASSETS=$REPO/allocmoe_edge/assets
CHUNKS=${CHUNKS:-8}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$ASSETS/heldout.txt" "$WORK/prose.txt"
cat "$REPO"/allocmoe_edge/*.py >"$WORK/code.txt"
"$PY" -c 'import random, string, sys
r = random.Random(0)
chars = string.ascii_letters + string.digits + string.punctuation + " "
sys.stdout.write("".join(r.choice(chars) for _ in range(200000)))' >"$WORK/random.txt"
for model in tiny-moe deep-moe; do
    "$REPO/scripts/bundled_gguf.sh" "$model" "$WORK/$model.gguf" 0.5
    for text in prose code random; do
        "$BIN" eval "$WORK/$model.gguf" --text "$WORK/$text.txt" --chunks "$CHUNKS" --budgets 0.5 --decode \
            --json "$OUT/$model-$text.json" | tee "$OUT/$model-$text.md"
    done
done
"$BIN" synth --shape olmoe-1b-7b --type q4_0 -o "$WORK/olmoe-q4_0.gguf"
"$BIN" bench "$WORK/olmoe-q4_0.gguf" --budgets 1,0.5 -p 64 -n 128 --reps 5 -t 2 --latency --fixed-thresholds \
    --json "$OUT/olmoe-bench.json" | tee "$OUT/olmoe-bench.md"
