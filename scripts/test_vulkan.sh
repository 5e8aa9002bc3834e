#!/usr/bin/env bash
# The Vulkan tier of `make test`: tests/test_gpu.py (budgeted MoE on a GPU backend against the CPU) on the
# series' Vulkan library, on Mesa's lavapipe (a conformant Vulkan device on the CPU; its speed means nothing).
# Needs the Debian packages mesa-vulkan-drivers glslc libvulkan-dev spirv-headers (.ci/run installs them).
# Without them the tier is skipped with the apt command to run; under CI=true it fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
missing=$("$BIN/python" -c '
from allocmoe_edge.vulkan import lavapipe_installed, missing_packages
print(" ".join(missing_packages() + ([] if lavapipe_installed() else ["mesa-vulkan-drivers"])))')
if [[ -n $missing ]]; then
    msg="the Vulkan tier needs Debian packages this machine lacks: apt-get install -y $missing (as root)"
    if [[ ${CI:-} == true ]]; then
        echo "FAILED: $msg" >&2
        exit 1
    fi
    echo "SKIPPED: $msg" >&2
    exit 0
fi
lib=$("$BIN/allocmoe" build-runtime --backend vulkan --library-only)
echo "Vulkan tier: $lib on lavapipe" >&2
GGML_VK_VISIBLE_DEVICES=0 LLAMA_CPP_LIB_PATH=$lib ALLOCMOE_GPU_BACKEND=Vulkan ALLOCMOE_REQUIRE_RUNTIME=1 \
    "$BIN/python" -m pytest -q -ra --durations=10 -p no:cacheprovider tests/test_gpu.py "$@"
