#!/usr/bin/env python3
"""Build and install the patched llama-cpp-python (same as `allocmoe build-runtime`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocmoe_edge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["build-runtime", *sys.argv[1:]])
