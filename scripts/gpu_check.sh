#!/usr/bin/env bash
# The device check, run on the GPU machine with `.carry` (from scripts/device_carry.py) carried:
# 1. CUDA (sm_90) libllama from the patched tree, while DeepSeek-V2-Lite q4_0 is synthesized;
# 2. the llama.cpp-vs-transformers logits and Alloc-T verification tests, fully offloaded;
# 3. the speed benchmark at 100/75/50/25 % budgets.
# usage: scripts/gpu_check.sh OUTDIR     (everything it reports lands in OUTDIR)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
C=$REPO/.carry
mkdir -p "$OUT"
# On the H200 image, importing numpy before a CUDA libllama is loaded makes the model load segfault;
# a sitecustomize that imports llama_cpp first avoids it.
mkdir -p /tmp/allocmoe-site && echo "import llama_cpp" > /tmp/allocmoe-site/sitecustomize.py
export PYTHONPATH=/tmp/allocmoe-site:$C/site ALLOCMOE_CACHE=$C/cache LLAMA_SRC=$C/llama.cpp PYTHONUNBUFFERED=1
export LLAMA_CPP_LIB_PATH=${WORK:-/tmp/allocmoe-gpu}/build-cuda90/bin
# Alloc-T is off on GPU layers by default (it aborted on the H200); this check runs it, each bench
# row in its own process, so an abort costs one row and its CUDA error text lands in the JSON.
export ALLOCMOE_GPU_ALLOC_T=1
cd "$REPO"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STEPS="build synth" bash scripts/bench_gpu.sh "$OUT" || exit 1
ALLOCMOE_TEST_NGL=99 ALLOCMOE_REQUIRE_RUNTIME=1 timeout 240 python3 -m pytest -q -p no:cacheprovider -ra \
    tests/test_alloc_t.py "tests/test_runtime.py::test_per_layer_counts_match_transformers" \
    "tests/test_runtime.py::test_full_budget_paths_are_bitwise_identical" 2>&1 | tee "$OUT/gpu-tests.log"
STEPS=bench bash scripts/bench_gpu.sh "$OUT"
