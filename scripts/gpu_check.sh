#!/usr/bin/env bash
# The device check: one prepared run on the GPU machine (an H200, 16 cores, no network) in under
# 10 minutes. Here: `python scripts/device_carry.py` lays out .carry/; there, with .carry carried:
#     bash scripts/gpu_check.sh OUT
# Steps (STEPS="lib synth diag tests mem bench" by default; each under its own time limit):
#   lib    the CUDA (sm_90) libllama of the patched tree through `allocmoe build-runtime --library-only`,
#          cached by sdist, patch series and options: a carried or earlier build is reused, not rebuilt
#   synth  (background) DeepSeek-V2-Lite (27 blocks) and Qwen3-30B-A3B ($QWEN3_LAYERS blocks) in q4_0,
#          random weights, with uniform-split plans at 75/50/25 % (Alloc-T enabled: batch rule and decode
#          thresholds calibrated on random tokens)
#   diag   .carry/gpu-diag/diag.sh when carried: one mul_mat_id with distinct / repeated ids per column,
#          and a 3-block DeepSeek-V2-Lite with Alloc-T at T = 8, 64, 512 against the CPU under several
#          CUDA settings (launch blocking, no PDL, no graphs, no fusion, compute-sanitizer)
#   tests  with every layer offloaded: llama.cpp against transformers (per-layer counts, Alloc-T's batch and
#          decode rules, ids packing) and tests/test_gpu.py (GPU against CPU on the same ubatch: batch rule,
#          decode rule through mmvq and mmq with skipped ids; splits, CUDA graphs, --cpu-moe)
#   mem    the compute buffers a context reserves (CUDA0, CUDA_Host) with and without Alloc-T, ubatch 512 / 2048
#   bench  `allocmoe bench --latency` (pp512, pp2048, tg128, 5 interleaved reps): DeepSeek-V2-Lite fully
#          offloaded; Qwen3-30B-A3B with its routed experts in system memory (--cpu-moe); graph nodes
#          per decoded token (the kernels a launch-bound decode pays for)
# OUT gets at most 8 files (the device tool's limit): summary.txt, diag.txt, tests.log, bench-*.json,
# bench-*.md, logs.tgz (everything else).
# Options: STEPS, QWEN3_LAYERS=24, REPS=5, PROMPTS=512,2048, NGEN=128, DEADLINE=570, WORK=/tmp/allocmoe-gpu,
# LAYERS (truncate DeepSeek: quick runs); a rehearsal of the plumbing on a machine without a GPU:
# LIB=<a CPU libllama folder> NGL=0 LAYERS=2 QWEN3_LAYERS=2 PROMPTS=16,32 NGEN=8 REPS=2.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
C=$REPO/.carry
WORK=${WORK:-/tmp/allocmoe-gpu}
STEPS=${STEPS:-lib synth diag tests mem bench}
QWEN3_LAYERS=${QWEN3_LAYERS:-24}
NGL=${NGL:-99}
LIB=${LIB:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$WORK/logs
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
has() { [[ " $STEPS " == *" $1 "* ]]; }
# the device tool stops a command at 600 s: every step gets at most what is left before DEADLINE,
# less what the steps after it need (a bench rewrites its JSON after every round, so a stopped one
# still leaves its measured rounds)
DEADLINE=${DEADLINE:-570}
cap() {  # cap WANTED RESERVED -> seconds for a step
    local s=$(( DEADLINE - SECONDS - $2 ))
    (( s > $1 )) && s=$1
    (( s < 10 )) && s=10
    echo "$s"
}
say() { printf '[%4ds] %s\n' "$SECONDS" "$*" | tee -a "$SUMMARY"; }

# the H200 image segfaults when numpy is imported before a CUDA libllama: import llama_cpp first
mkdir -p "$WORK/site" && echo "import llama_cpp" >"$WORK/site/sitecustomize.py"
# the build cache (converter, library builds) lives on the machine, seeded from the carried one; the
# patched tree and a carried library build travel as .tar.xz (the device tool carries 64 MiB in all)
export ALLOCMOE_CACHE=$WORK/cache
mkdir -p "$ALLOCMOE_CACHE/lib" && cp -rn "$C/cache/." "$ALLOCMOE_CACHE/"
rm -rf "$WORK/llama.cpp" && tar -C "$WORK" -xJf "$C/llama.cpp.tar.xz"
for lib in "$C"/lib-*.tar.xz; do [[ -f $lib ]] && tar -C "$ALLOCMOE_CACHE/lib" --skip-old-files -xJf "$lib"; done
SRC=$WORK/llama.cpp
export PYTHONPATH="$REPO:$C/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export ALLOCMOE_COMMIT=${ALLOCMOE_COMMIT:-$(cat "$C/COMMIT" 2>/dev/null || git -C "$REPO" rev-parse --short HEAD 2>/dev/null)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
say "commit $ALLOCMOE_COMMIT, steps: $STEPS"

DSV2=$WORK/dsv2lite-q4_0${LAYERS:+-${LAYERS}l}.plans.gguf
QWEN3=$WORK/qwen3-30b-a3b-q4_0-${QWEN3_LAYERS}l.plans.gguf
synth_one() {  # shape layers output
    local raw=${3%.plans.gguf}.gguf
    [[ -f $3 ]] && return 0
    "$PY" -m allocmoe_edge synth --shape "$1" --type q4_0 ${2:+--layers "$2"} -o "$raw" &&
    "$PY" -c "import sys; from allocmoe_edge.allocate import stamp_uniform_split as s; s(sys.argv[1], sys.argv[2], (0.75, 0.5, 0.25), True)" \
        "$raw" "$3" && rm -f "$raw"
}

# CUDA's runtime libraries, for a library built elsewhere (its RPATH names only its own folder)
for d in /usr/local/cuda/lib64 $("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null); do
    [[ -d $d ]] && export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d
done
build_lib() {
    timeout 420 "$PY" -m allocmoe_edge build-runtime --backend cuda --cuda-arch 90 --no-cuda-fa --library-only \
        --source "$SRC" >"$LOGS/lib.out" 2>>"$LOGS/lib.log"
}
lib_loads() {  # a GPU build that loads here
    LLAMA_CPP_LIB_PATH=$1 "$PY" -c "import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" \
        >>"$LOGS/lib.log" 2>&1
}
if has lib && [[ -z $LIB ]]; then
    say "lib: CUDA sm_90 build of the patched tree (cached)"
    build_lib; rc=$?
    LIB=$(tail -1 "$LOGS/lib.out" 2>/dev/null)
    if [[ $rc -eq 0 ]] && ! lib_loads "$LIB"; then
        say "lib: the cached build does not load here; building it"
        rm -rf "$(dirname "$LIB")"; build_lib; rc=$?
    fi
    tail -2 "$LOGS/lib.log" | tee -a "$SUMMARY"
    [[ $rc -eq 0 ]] || { say "lib: FAILED (rc $rc)"; tail -30 "$LOGS/lib.log" >>"$SUMMARY"; exit 1; }
fi
if has synth || has diag || has tests || has mem || has bench; then
    LIB=${LIB:-$(tail -1 "$LOGS/lib.out" 2>/dev/null)}
    [[ -f $LIB/libllama.so ]] || { say "no library (run the lib step or set LIB)"; exit 1; }
    export LLAMA_CPP_LIB_PATH=$LIB PYTHONPATH="$WORK/site:$PYTHONPATH"
    "$PY" -m allocmoe_edge doctor >>"$SUMMARY" 2>&1
fi

# the synthetic models are stamped with decode thresholds calibrated by the library just built
synth_pid=
if has synth; then
    { synth_one deepseek-v2-lite "${LAYERS:-}" "$DSV2" && synth_one qwen3-30b-a3b "$QWEN3_LAYERS" "$QWEN3"; } >"$LOGS/synth.log" 2>&1 &
    synth_pid=$!
fi

# diag and tests check correctness, so they may share the GPU (and the 16 cores with synth)
diag_pid=
if has diag && [[ -f $C/gpu-diag/diag.sh ]]; then
    say "diag: started (.carry/gpu-diag/diag.sh)"
    (BUILD=$(dirname "$LIB") LLAMA_SRC=$SRC REPO=$REPO PYTHON=$PY timeout "$(cap 240 230)" \
        bash "$C/gpu-diag/diag.sh" "$WORK/diag" >"$LOGS/diag.out" 2>&1; echo "diag exit $?" >>"$LOGS/diag.out") &
    diag_pid=$!
fi
if has tests; then
    # CUDA_LAUNCH_BLOCKING: a fault names its kernel. test_gpu.py holds the decode rule over a 512-token ubatch
    # fully offloaded (mmq / mmf with skipped ids) and over 64- and 512-token ubatches with --cpu-moe (the
    # scheduler's host-side copy of the used experts); those run once more without CUDA graphs
    say "tests: started (all layers offloaded, CUDA_LAUNCH_BLOCKING=1)"
    CUDA_LAUNCH_BLOCKING=1 ALLOCMOE_TEST_NGL=$NGL ALLOCMOE_REQUIRE_RUNTIME=1 ALLOCMOE_GPU_BACKEND=CUDA \
        ALLOCMOE_GPU_REPORT=$LOGS/gpu-agreement.json timeout "$(cap 300 260)" "$PY" -m pytest -q \
        -p no:cacheprovider -ra tests/test_gpu.py tests/test_alloc_t.py tests/test_decode_rule.py \
        "tests/test_runtime.py::test_per_layer_counts_match_transformers" \
        "tests/test_runtime.py::test_full_budget_paths_are_bitwise_identical" >"$OUT/tests.log" 2>&1
    say "tests: exit $? ($(tail -1 "$OUT/tests.log"))"
    say "tests: the decode-rule ones again with GGML_CUDA_DISABLE_GRAPHS=1"
    GGML_CUDA_DISABLE_GRAPHS=1 CUDA_LAUNCH_BLOCKING=1 ALLOCMOE_REQUIRE_RUNTIME=1 timeout "$(cap 90 230)" "$PY" -m pytest -q \
        -p no:cacheprovider -ra tests/test_gpu.py -k "decode" >>"$OUT/tests.log" 2>&1
    say "tests (no CUDA graphs): exit $? ($(tail -1 "$OUT/tests.log"))"
fi
if [[ -n $diag_pid ]]; then
    wait "$diag_pid"
    cp "$WORK/diag/summary.txt" "$OUT/diag.txt" 2>/dev/null || tail -40 "$LOGS/diag.out" >"$OUT/diag.txt"
    say "diag: $(grep -cE '^PASS' "$OUT/diag.txt") PASS, $(grep -cE '^(ABORT|FAIL|TIMEOUT)' "$OUT/diag.txt") ABORT/FAIL/TIMEOUT, $(grep -c MISMATCH "$OUT/diag.txt") MISMATCH"
fi
if [[ -n $synth_pid ]]; then
    wait "$synth_pid" || { say "synth: FAILED"; tail -20 "$LOGS/synth.log" >>"$SUMMARY"; }
fi

bench() {  # name model budgets seconds reserved [bench options...]
    local name=$1 model=$2 budgets=$3 limit; limit=$(cap "$4" "$5"); shift 5
    [[ -f $model ]] || { say "bench $name: no model"; return; }
    say "bench $name ($limit s): $*"
    ALLOCMOE_GPU_ALLOC_T=1 timeout "$limit" "$PY" -m allocmoe_edge bench "$model" --budgets "$budgets" --reps "${REPS:-5}" \
        -p "${PROMPTS:-512,2048}" -n "${NGEN:-128}" -ngl "$NGL" --latency --timeout "$limit" --json "$OUT/bench-$name.json" \
        "$@" >"$OUT/bench-$name.md" 2>"$LOGS/bench-$name.log"
    say "bench $name: exit $?"
}
if has mem && [[ -f $DSV2 ]]; then
    say "mem: compute buffers reserved with and without Alloc-T (plan 50 %, all layers offloaded)"
    ALLOCMOE_GPU_ALLOC_T=1 timeout "$(cap 60 180)" "$PY" - "$DSV2" "$NGL" <<'EOF' 2>>"$LOGS/mem.log" | tee -a "$SUMMARY"
import sys
from allocmoe_edge.reserve import measure
from allocmoe_edge.runtime import LoadChoice
for ubatch in (512, 2048):
    with_t, without = (measure(sys.argv[1], LoadChoice(plan_index=1, token_k_max=k), n_ubatch=ubatch,
                               n_gpu_layers=int(sys.argv[2])) for k in (None, 0))
    mib = lambda r: ", ".join(f"{name} {v:.1f}" for name, v in r.compute_mib.items())
    print(f"  ubatch {ubatch}: with Alloc-T {mib(with_t)} MiB; without {mib(without)} MiB "
          f"(+{100 * (with_t.total_mib / without.total_mib - 1):.1f} %)")
EOF
fi
if has bench; then
    bench dsv2lite-gpu "$DSV2" 1,0.75,0.5,0.25 170 130
    bench qwen3-hybrid "$QWEN3" 1,0.5 150 30 --cpu-moe -t 16
    say "graph nodes per decoded token (DeepSeek-V2-Lite, all layers offloaded)"
    ALLOCMOE_GPU_ALLOC_T=1 timeout "$(cap 40 0)" "$PY" - "$DSV2" "$NGL" <<'EOF' 2>>"$LOGS/nodes.log" | tee -a "$SUMMARY"
import sys
from allocmoe_edge.graph_probe import kernel_nodes
from allocmoe_edge.runtime import LoadChoice, load
for name, choice in (("full", LoadChoice(full_budget=True)), ("plan 50%", LoadChoice(plan_index=1))):
    nodes = kernel_nodes(load(sys.argv[1], choice, n_gpu_layers=int(sys.argv[2]), n_ctx=64), [1])
    top = ", ".join(f"{op} {n}" for op, n in list(nodes.items())[:8])
    print(f"  {name}: {sum(nodes.values())} compute nodes per token ({top})")
EOF
fi
tar -C "$WORK" --exclude='*.npy' --exclude='*.gguf' --exclude=mmid_dup -czf "$OUT/logs.tgz" logs diag 2>/dev/null
say "done; $(ls "$OUT" | tr '\n' ' ')"
