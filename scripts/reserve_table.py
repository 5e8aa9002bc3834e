#!/usr/bin/env python3
"""What Alloc-T costs in compute buffer memory: llama.cpp's reserved compute buffers with and without it.

For each shape (full depth, sparse synthetic file: no weight is written or read) and ubatch size, one plan of
K/2 experts per MoE layer with Alloc-T up to K candidates, measured by `reserve.measure` with the batch rule
and with Alloc-T off (token_k_max 0). Prints a markdown table and writes JSON. LLAMA_CPP_LIB_PATH selects
another build of the library (e.g. an older patch series) for a comparison.

    .venv/bin/python scripts/reserve_table.py --out results/reserve/reserve.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from allocmoe_edge.gguf_meta import copy_with_metadata, plan_fields, plan_for_counts, read_info  # noqa: E402
from allocmoe_edge.reserve import measure  # noqa: E402
from allocmoe_edge.runtime import LoadChoice, patch_version  # noqa: E402
from allocmoe_edge.synth import synthesize  # noqa: E402


def planned(shape: str, folder: Path) -> Path:
    src = synthesize(shape, "q4_0", folder / f"{shape}.gguf", weights=False)
    info = read_info(src)
    plan = plan_for_counts(info, [max(2, info.expert_used_count // 2)] * len(info.moe_layers), "half-k")
    out = folder / f"{shape}.plan.gguf"
    copy_with_metadata(src, out, plan_fields(info, [plan], k_min=1, k_max=info.expert_used_count),
                       drop=lambda key: False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="olmoe-1b-7b,qwen3-30b-a3b")
    ap.add_argument("--ubatch", default="512,2048")
    ap.add_argument("--out", type=Path, help="JSON to write")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="allocmoe-reserve-") as tmp:
        for shape in args.shapes.split(","):
            path = planned(shape, Path(tmp))
            for ubatch in map(int, args.ubatch.split(",")):
                with_t = measure(path, LoadChoice(), n_ubatch=ubatch)
                without = measure(path, LoadChoice(token_k_max=0), n_ubatch=ubatch)
                rows.append({"shape": shape, "ubatch": ubatch, "alloc_t_mib": with_t.total_mib,
                             "plain_mib": without.total_mib, "added": with_t.total_mib / without.total_mib - 1,
                             "graph_nodes": with_t.graph_nodes, "plain_graph_nodes": without.graph_nodes,
                             "max_nodes": with_t.max_nodes})
    print("| shape | ubatch | compute buffer, Alloc-T (MiB) | without (MiB) | added |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['ubatch']} | {r['alloc_t_mib']:.1f} | {r['plain_mib']:.1f} "
              f"| {100 * r['added']:+.1f} % |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        meta = {"commit": commit, "patch_version": patch_version(), "library": os.environ.get("LLAMA_CPP_LIB_PATH"),
                "backend": "CPU", "command": " ".join(sys.argv)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
