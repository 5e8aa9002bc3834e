#!/usr/bin/env bash
# A bundled model (tiny-moe or deep-moe) in q8_0 with Alloc-L+T plans (decode rule both) at the given budgets, from
# the profile behind the README's tables (routing statistics included): what the table scripts measure.
# usage: scripts/bundled_gguf.sh MODEL OUT.gguf BUDGET...   (e.g. deep-moe /tmp/d.gguf 0.25 0.5 0.75)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${ALLOCMOE:-$REPO/.venv/bin/allocmoe}
model=$1 out=$2
shift 2
case $model in
    tiny-moe) sens=$REPO/results/decode-rule/sensitivity.json pre=() ;;
    deep-moe) sens=$REPO/results/deep-moe-table/sensitivity.json pre=(--pre-tokenizer gpt-2) ;;
    *) echo "unknown bundled model $model (tiny-moe or deep-moe)" >&2; exit 2 ;;
esac
plans=()
for b in "$@"; do
    "$BIN" allocate "$sens" --budget "$b" --method alloc-l+t --alloc-t both -o "$out.plan-$b.json"
    plans+=(--plan "$out.plan-$b.json")
done
"$BIN" convert "$REPO/allocmoe_edge/assets/$model" "${plans[@]}" --outtype q8_0 "${pre[@]}" -o "$out"
