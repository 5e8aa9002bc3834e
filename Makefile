# Two commands do all the set-up on a fresh machine:
#   make demo   - venv, patched runtime, then the whole pipeline on the bundled model
#   make test   - venv, patched runtime, then ruff, the test suite (all tiers) and its Vulkan tier on lavapipe
#                 (what CI runs; the Vulkan tier needs Debian packages, see scripts/test_vulkan.sh)
#   make test-vulkan - only the Vulkan tier: tests/test_gpu.py on the series' Vulkan library and lavapipe
#   make test-fast - venv, ruff and the tests not marked slow: no builds, no trainings, ~2 minutes (no runtime needed)
# Every pip they run (and pip's build environments, e.g. llama-cpp-python's scikit-build-core) installs
# the exact versions of requirements.lock; `make lock` refreshes it and prints the diff.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.allocmoe-installed
LOCK   := requirements.lock
export PIP_CONSTRAINT       := $(CURDIR)/$(LOCK)
export PIP_BUILD_CONSTRAINT := $(CURDIR)/$(LOCK)

.PHONY: venv runtime demo test test-fast test-vulkan lock clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	# server: llama-cpp-python's OpenAI-compatible server (a few small pure-Python packages)
	$(BIN)/python -m pip install -q -e '.[torch,plot,test,server]'
	touch $@

runtime: venv
	$(BIN)/allocmoe build-runtime

demo: runtime
	$(BIN)/allocmoe demo

test: runtime
	$(BIN)/ruff check .
	ALLOCMOE_REQUIRE_RUNTIME=1 $(BIN)/python -m pytest -q -ra --durations=15
	BIN=$(BIN) bash scripts/test_vulkan.sh

test-vulkan: venv
	BIN=$(BIN) bash scripts/test_vulkan.sh

test-fast: venv
	$(BIN)/ruff check .
	ALLOCMOE_REQUIRE_RUNTIME=0 $(BIN)/python -m pytest -q -ra -m "not slow" --durations=10

lock:
	$(PYTHON) scripts/lock.py

clean-venv:
	rm -rf $(VENV)
