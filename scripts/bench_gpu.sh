#!/usr/bin/env bash
# Alloc-MoE speed on one CUDA GPU (made for an H200 with 16 cores and no network):
# build the patched libllama for sm_90 with cmake, synthesize DeepSeek-V2-Lite in q4_0
# (random weights, real shapes) and stamp "uniform-split" plans at 75/50/25 % while the
# build runs, then `allocmoe bench` at 100/75/50/25 % (full, uniform top-k, plans with
# Alloc-T on and off), pp512 / tg128, -ngl 99. Target: under 8 minutes in all.
#
# usage: LLAMA_SRC=/path/to/patched/llama.cpp PYTHONPATH=/tmp/site scripts/bench_gpu.sh OUTDIR
#
#   LLAMA_SRC   the pinned sdist's vendor/llama.cpp with patches/ applied (needs CMakeLists.txt,
#               cmake/, ggml/, src/, include/, vendor/); a tree without llama_allocmoe_version
#               is refused
#   PYTHONPATH  numpy, gguf (+ its pyyaml), click, rich and llama-cpp-python's Python package
#               with its dependencies; its bundled libllama is not used: LLAMA_CPP_LIB_PATH
#               points at this build
# optional:
#   CUDA_ARCH=90  JOBS=$(nproc)  REPS=3  PYTHON=python3
#   ALLOCMOE_COMMIT   the commit of this tree, recorded in the JSON when the copy has no .git
#   CUDA_FA=OFF   ON also compiles the flash-attention kernels (slower build; bench runs FA off)
#   WORK=/tmp/allocmoe-gpu   build tree and model files (kept out of OUTDIR, which is copied back)
#   LAYERS        truncate the synthetic model (quick checks); default: all 27 blocks
#   STEPS="build synth bench"   run a subset, e.g. STEPS=synth LAYERS=2 on a machine without a GPU
# writes OUTDIR/{build.log,synth.log,bench.md,bench-dsv2lite-q4_0.json,runtime-log.txt}
set -euo pipefail

OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/allocmoe-gpu}
STEPS=${STEPS:-build synth bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODEL=$WORK/dsv2lite-synth-q4_0${LAYERS:+-${LAYERS}l}.gguf
STAMPED=${MODEL%.gguf}.uniform-split.gguf
BUILD=$WORK/build-cuda${CUDA_ARCH:-90}
JSON=$OUT/bench-dsv2lite-q4_0.json

has() { [[ " $STEPS " == *" $1 "* ]]; }
say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
die() { echo "bench_gpu.sh: $*" >&2; exit 1; }

need=(numpy gguf click rich)
has bench && need+=(llama_cpp)
"$PY" - "${need[@]}" <<'EOF' || die "python modules missing (set PYTHONPATH)"
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)} ({sys.executable} {sys.version.split()[0]})")
EOF

synth() {
    "$PY" -m allocmoe_edge synth --shape deepseek-v2-lite --type q4_0 ${LAYERS:+--layers "$LAYERS"} -o "$MODEL"
    "$PY" - "$MODEL" "$STAMPED" <<'EOF'
import sys
from allocmoe_edge.bench import stamp_uniform_split
info = stamp_uniform_split(sys.argv[1], sys.argv[2], (0.75, 0.5, 0.25))
print(f"stamped {len(info.plans)} uniform-split plans into {sys.argv[2]}")
EOF
}

build() {
    [[ -n ${LLAMA_SRC:-} && -f $LLAMA_SRC/CMakeLists.txt ]] || die "set LLAMA_SRC to the patched llama.cpp tree"
    grep -q llama_allocmoe_version "$LLAMA_SRC/include/llama.h" || die "$LLAMA_SRC is not patched (no llama_allocmoe_version)"
    local gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    cmake -S "$LLAMA_SRC" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=OFF -DGGML_CUDA_FA="${CUDA_FA:-OFF}" \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    time cmake --build "$BUILD" -j "${JOBS:-$(nproc)}" --target llama
}

synth_pid=
if has synth; then
    say "synthesizing $MODEL (background)"
    synth >"$OUT/synth.log" 2>&1 &
    synth_pid=$!
fi
if has build; then
    say "building libllama (CUDA ${CUDA_ARCH:-90}, FA ${CUDA_FA:-OFF}) in $BUILD"
    build >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; die "build failed (log: $OUT/build.log)"; }
    grep -E '^(real|user|sys)' "$OUT/build.log" || true
fi
if [[ -n $synth_pid ]]; then
    wait "$synth_pid" || { cat "$OUT/synth.log"; die "synth failed"; }
    say "$(tail -2 "$OUT/synth.log" | tr '\n' ' ')"
fi
if has bench; then
    export LLAMA_CPP_LIB_PATH=$BUILD/bin
    [[ -f $LLAMA_CPP_LIB_PATH/libllama.so ]] || die "no $LLAMA_CPP_LIB_PATH/libllama.so; run the build step"
    [[ -f $STAMPED ]] || die "no $STAMPED; run the synth step"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -m allocmoe_edge doctor
    say "bench"
    "$PY" -m allocmoe_edge bench "$STAMPED" --budgets 1,0.75,0.5,0.25 --reps "${REPS:-3}" -p 512 -n 128 -ngl 99 \
        --timeout 150 --json "$JSON" | tee "$OUT/bench.md" || say "some configurations failed; their errors are in $JSON"
    # llama.cpp's lines on graph nodes/splits, offload, CUDA graphs and Alloc-T, per configuration
    "$PY" - "$JSON" <<'EOF' | tee "$OUT/runtime-log.txt"
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print(f"== {row['name']}")
    for line in row["log"]:
        print("  " + line)
EOF
fi
say "done; results in $OUT"
